"""The evaluation loop of one benchmark run: batched greedy generation, prefill timing, FLOPs and peak memory.

One run = one model, one list of samples, one schedule + scorer (or none: the unpruned model). Measurements:

* predictions: greedy decoding (`do_sample=False`, one beam) on left-padded batches of `batch_size`, at most
  `max_new_tokens` new tokens, decoded without special tokens and stripped. A method whose engine takes one
  vision-token count per batch (`PruningEngine.mixed_counts_refusal`) runs a batch of images of different sizes in
  groups of rows that share a count; the predictions stay in sample order.
* `generate_ms`: wall time of all `generate` calls divided by the number of samples (per sample, batched).
* `prefill_ms`: a prefill-only forward (`use_cache=True, logits_to_keep=1`) on a fixed batch (the first
  `timing.batch_size` samples, or of `timing_samples` when given; where the vision count follows the image, the
  first of them that share the first one's count, the same batch for every method), `timing.warmup` untimed calls first (at least
  one: the first also checks that the logits are finite), then the
  median of `timing.repeats` timed calls; CUDA events with synchronisation on GPU, `time.perf_counter` on CPU.
  With `time_prefill=False` (the other workers of a split run) the batch runs once, untimed, and it is NaN.
  With `compile` the prefill (timed and generating, pruned or not) runs compiled (`pruning.compiled`), every batch
  left-padded to its `compile_buckets` length so that prompts of one bucket share a graph; `extras["execution"]`
  says whether the timed prefill really ran compiled ("compiled") or fell back ("eager", with the reason in
  `extras["compile_fallback"]`); where a CUDA-graph mode could not replay a graph, `extras["cudagraph_skip"]` says
  why (the row's note repeats it).
* `tflops`: analytic prefill TFLOPs per sample (`pruning.flops`, 4nd^2 + 2n^2d + 3ndm per layer) from each
  row's real (unpadded) token count and the vision tokens each layer processed (`engine.record.vision_per_layer`),
  averaged over the samples; padding does not count, so the number does not depend on batching. Each row counts
  its own vision tokens (`vision_counts`, read from its ids), so images of different sizes cost what they cost.
* `vision_counts`: each sample's vision-token count, in sample order (the same for every sample unless the
  model's count follows the image size); `vision_per_layer` is then the mean over the samples per layer.
* `peak_mem_mb`: on GPU `torch.cuda.max_memory_allocated` over the run (stats reset first); on CPU the process's
  peak resident set size over the run (Linux: VmHWM after resetting it through /proc/self/clear_refs; where that
  is not allowed, the lifetime peak `ru_maxrss`). On CPU it includes the weights and everything else the process
  holds, so compare it between runs of one process.
"""
from __future__ import annotations

import contextlib
import logging
import resource
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from pruning.compiled import active as active_compiled, check_buckets, compiled_prefill, pad_to_bucket
from pruning.engine import PruningEngine
from pruning.flops import prefill_flops, sequence_tokens_per_layer, to_tflops
from pruning.schedule import Schedule
from vlm.errors import UserError
from vlm.models import LoadedModel
from vlm.prompts import encode_batch
from vlm.tasks.base import VQASample

log = logging.getLogger(__name__)


class RunnerError(UserError, ValueError):
    """A run that cannot be evaluated as configured; the message names the setting and what would be right."""


@dataclass
class TimingSpec:
    """How prefill latency is measured: the fixed batch size, untimed warm-up calls and timed repeats."""

    batch_size: int = 1
    warmup: int = 2
    repeats: int = 5

    def check(self) -> "TimingSpec":
        """Validate; raise RunnerError naming the bad field."""
        for name, low in (("batch_size", 1), ("warmup", 0), ("repeats", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise RunnerError(f"timing.{name}={value!r} must be an int >= {low}")
        return self


@dataclass
class RunOutput:
    """What one run measured (see the module docstring for each number's definition)."""

    predictions: list[str]
    prefill_ms: float
    generate_ms: float
    tflops: float
    peak_mem_mb: float
    vision_per_layer: list[int]
    tokens_per_layer: list[int]  # sequence length each decoder layer processed, timing batch (incl. padding)
    n_samples: int
    timing_batch: int
    device: str
    extras: dict[str, Any] = field(default_factory=dict)
    flops_total: int = 0  # analytic prefill FLOPs summed over the samples (exact; parts of a split run add up)
    vision_counts: list[int] = field(default_factory=list)  # each sample's vision tokens, in sample order


# -- memory ------------------------------------------------------------------------------------------------------
_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def _reset_rss_peak() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux); False where that is not possible."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def _rss_peak_mb() -> float:
    """This process's peak RSS in MiB: VmHWM from /proc/self/status, else ru_maxrss."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class PeakMemory:
    """Context manager: peak memory (MiB) of the enclosed code on `device` (see the module docstring)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.mb = float("nan")
        self.source = ""

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.source = "cuda.max_memory_allocated"
        else:
            self.source = "rss_peak (VmHWM, reset)" if _reset_rss_peak() else "ru_maxrss (process lifetime)"
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self.mb = _rss_peak_mb()


# -- timing ------------------------------------------------------------------------------------------------------
def time_call(fn: Callable[[], Any], device: torch.device) -> float:
    """Milliseconds one call of `fn` takes: CUDA events (synchronised) on GPU, perf_counter on CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return float(start.elapsed_time(end))
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def median_ms(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> float:
    """Median milliseconds over `repeats` timed calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return statistics.median(time_call(fn, device) for _ in range(repeats))


# -- engine ------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def pruning(
    loaded: LoadedModel, schedule: Schedule | None, scorer: str | None, scorer_options: dict | None = None, seed: int = 0,
    compile: bool | str = False,
) -> Iterator[PruningEngine | None]:
    """The PruningEngine for this schedule and scorer, or nothing (the plain model) when schedule is None/empty.
    With `compile` (True or a torch.compile mode) the prefill runs compiled, the plain model's too."""
    if schedule is None or not schedule.stages:
        if compile:
            with compiled_prefill(loaded.model, None if compile is True else compile):
                yield None
        else:
            yield None
        return
    if not scorer:
        raise RunnerError(f"schedule {schedule.name!r} has stages but no scorer was named; give the method a `scorer`")
    with PruningEngine(loaded.model, schedule, scorer=scorer, scorer_options=scorer_options, seed=seed,
                       compile=compile) as engine:
        yield engine


def _execution(loaded: LoadedModel) -> dict[str, Any]:
    """How the last prefill ran: {"execution": "compiled" | "eager"}, the fallback reason and why CUDA graphs were
    skipped, if so."""
    ctx = active_compiled(loaded.model)
    if ctx is None:
        return {"execution": "eager"}
    out = {"execution": "compiled" if ctx.compiled else "eager"}
    if ctx.fallback_reason:
        out["compile_fallback"] = ctx.fallback_reason
    if ctx.cudagraph_skip:
        out["cudagraph_skip"] = ctx.cudagraph_skip
    return out


def check_finite(logits: Tensor, loaded: LoadedModel) -> None:
    """Raise RunnerError naming the model when the logits [B, N, vocab] hold NaN or inf (corrupted weights would
    otherwise score 0.0 everywhere without a word)."""
    if not bool(torch.isfinite(logits).all()):
        bad = int((~torch.isfinite(logits)).sum())
        raise RunnerError(
            f"model {loaded.name!r} (source {loaded.source!r}, dtype {str(loaded.dtype).replace('torch.', '')}) gives "
            f"non-finite logits ({bad} NaN/inf values in the first batch): its weights are corrupted or overflow in "
            "this dtype; check the checkpoint files, or load it in float32 / bfloat16"
        )


def _batches(items: Sequence[VQASample], size: int) -> Iterator[list[VQASample]]:
    for i in range(0, len(items), size):
        yield list(items[i:i + size])


def _row_flops(loaded: LoadedModel, attention_mask: torch.Tensor, vision_per_layer: Sequence[Sequence[int]],
               vision_counts: Sequence[int]) -> int:
    """Analytic prefill FLOPs summed over the rows of a batch, each from its real (unpadded) token count, its own
    vision tokens per layer (vision_per_layer[b]) and its vision-token count."""
    hidden, intermediate = loaded.text_widths
    total = 0
    for real, row_vision, n_vision in zip(attention_mask.sum(dim=1).tolist(), vision_per_layer, vision_counts):
        per_layer = sequence_tokens_per_layer(row_vision, int(real) - n_vision)
        total += prefill_flops(per_layer, hidden, intermediate)
    return total


def _vision_counts(loaded: LoadedModel, inputs: dict[str, Any]) -> list[int]:
    """Vision tokens of each row of a batch, read from its ids (the real image tokens)."""
    ids, mask = inputs["input_ids"], inputs.get("attention_mask")
    image = ids == loaded.image_token_id
    if mask is not None:
        image = image & mask.bool()
    return [int(c) for c in image.sum(dim=1).tolist()]


def count_groups(counts: Sequence[int]) -> list[list[int]]:
    """Indices of the rows that share a vision count, in order of first appearance: [[0, 2], [1]] for [16, 24, 16]."""
    groups: dict[int, list[int]] = {}
    for i, c in enumerate(counts):
        groups.setdefault(c, []).append(i)
    return list(groups.values())


def _timing_rows(loaded: LoadedModel, samples: Sequence[VQASample], n: int, count_of) -> list[VQASample]:
    """The fixed prefill batch: the first `n` samples, or, where the vision count follows the image, the first `n`
    sharing the first sample's count, so that every method (those that take one count per batch too) times the
    same batch."""
    if loaded.fixed_vision_tokens is not None:
        return list(samples[:n])
    first, rows = count_of(samples[0]), []
    for sample in samples:
        if len(rows) == n:
            break
        if count_of(sample) == first:
            rows.append(sample)
    return rows


def _vision_per_layer(loaded: LoadedModel, engine: PruningEngine | None, counts: Sequence[int]) -> list[list[int]]:
    """Vision tokens each decoder layer processed, per row of the last batch: [B][L]."""
    if engine is None:
        return [[v] * loaded.num_layers for v in counts]
    if engine.record.row_vision_per_layer:  # rows with different vision counts: each its own
        return [list(r) for r in engine.record.row_vision_per_layer]
    return [list(engine.record.vision_per_layer)] * len(counts)


def mean_per_layer(rows: Sequence[Sequence[int]]) -> list[int] | list[float]:
    """Per layer: the count every row shares, or the mean over the rows (rounded to 0.1) when they differ."""
    if all(list(r) == list(rows[0]) for r in rows):
        return list(rows[0])
    return [round(sum(col) / len(col), 1) for col in zip(*rows)]


def evaluate(
    loaded: LoadedModel,
    samples: Sequence[VQASample],
    *,
    schedule: Schedule | None = None,
    scorer: str | None = None,
    scorer_options: dict | None = None,
    seed: int = 0,
    batch_size: int = 8,
    max_new_tokens: int = 8,
    timing: TimingSpec | None = None,
    progress: bool = True,
    desc: str = "run",
    timing_samples: Sequence[VQASample] | None = None,
    time_prefill: bool = True,
    compile: bool | str = False,
    compile_buckets: int | Sequence[int] | None = 64,
) -> RunOutput:
    """Generate answers for `samples` (pruned by `schedule` + `scorer`, or unpruned) and measure the run.

    `timing_samples` (default: the first `timing.batch_size` of `samples`) is the fixed prefill batch; a worker of
    a split run passes the run's first samples, so it times what the one-worker run times."""
    if not samples:
        raise RunnerError("no samples to evaluate; check data.split / data.limit")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise RunnerError(f"batch_size={batch_size!r} must be an int >= 1")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise RunnerError(f"max_new_tokens={max_new_tokens!r} must be an int >= 1")
    timing = (timing or TimingSpec()).check()
    processor, model, device = loaded.processor, loaded.model, loaded.device
    if processor is None:
        raise RunnerError(f"model {loaded.name!r} has no processor; give its preset a `processor` (e.g. 'demo')")
    tokenizer = processor.tokenizer
    gen_kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=tokenizer.pad_token_id)
    predictions: list[str] = []
    flops_total = 0
    generate_s = 0.0
    vision_rows: list[list[int]] = []  # [sample][layer]
    vision_counts: list[int] = []
    buckets = check_buckets(compile_buckets) if compile else None

    def encode(batch: Sequence[VQASample]) -> dict[str, Any]:
        return pad_to_bucket(encode_batch(processor, batch, device=device, dtype=loaded.dtype), buckets,
                             tokenizer.pad_token_id)

    def count_of(sample: VQASample) -> int:
        return _vision_counts(loaded, encode_batch(processor, [sample]))[0]

    with PeakMemory(device) as memory, pruning(loaded, schedule, scorer, scorer_options, seed, compile) as engine, \
            torch.inference_mode():
        timed = _timing_rows(loaded, samples if timing_samples is None else timing_samples, timing.batch_size,
                             count_of)
        timing_inputs = encode(timed)
        # an engine that takes one vision count per batch runs a batch of images of different sizes in groups
        one_count = engine is not None and engine.mixed_counts_refusal() is not None

        def prefill() -> Any:
            return model(**timing_inputs, use_cache=True, logits_to_keep=1)

        check_finite(prefill().logits, loaded)  # also the first warm-up call
        prefill_ms = median_ms(prefill, device, max(timing.warmup - 1, 0), timing.repeats) if time_prefill \
            else float("nan")
        execution = _execution(loaded)
        tokens_per_layer = list(engine.record.tokens_per_layer) if engine is not None else \
            [int(timing_inputs["input_ids"].shape[1])] * loaded.num_layers
        bar = tqdm(total=len(samples), desc=desc, unit="sample", disable=not progress, leave=False)
        for batch in _batches(samples, batch_size):
            inputs = encode(batch)
            counts = _vision_counts(loaded, inputs)
            groups = count_groups(counts) if one_count and len(set(counts)) > 1 else [list(range(len(batch)))]
            done: dict[int, tuple[str, list[int], int]] = {}  # row -> (prediction, vision per layer, vision count)
            for group in groups:
                if len(groups) > 1:
                    inputs = encode([batch[i] for i in group])
                    counts = _vision_counts(loaded, inputs)
                t0 = time.perf_counter()
                out = model.generate(**inputs, **gen_kwargs)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                generate_s += time.perf_counter() - t0
                new_tokens = out[:, inputs["input_ids"].shape[1]:]
                texts = [t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
                rows = _vision_per_layer(loaded, engine, counts)
                flops_total += _row_flops(loaded, inputs["attention_mask"], rows, counts)
                done.update({i: (text, row, c) for i, text, row, c in zip(group, texts, rows, counts)})
            for i in range(len(batch)):
                predictions.append(done[i][0])
                vision_rows.append(done[i][1])
                vision_counts.append(done[i][2])
            bar.update(len(batch))
        bar.close()
    n = len(samples)
    return RunOutput(
        predictions=predictions,
        prefill_ms=float(prefill_ms),
        generate_ms=generate_s * 1e3 / n,
        tflops=to_tflops(flops_total / n),
        peak_mem_mb=float(memory.mb),
        vision_per_layer=mean_per_layer(vision_rows),
        tokens_per_layer=tokens_per_layer,
        n_samples=n,
        timing_batch=len(timed),
        device=str(device),
        extras={"peak_mem_source": memory.source, **execution},
        flops_total=int(flops_total),
        vision_counts=vision_counts,
    )


__all__ = ["PeakMemory", "count_groups", "mean_per_layer", "RunOutput", "RunnerError", "TimingSpec", "check_finite", "evaluate", "median_ms", "pruning", "time_call"]
