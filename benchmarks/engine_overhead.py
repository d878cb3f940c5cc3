"""The pruning engine's own cost where the host dominates: a CPU proxy of batch-1 GPU prefill.

A 32-layer LLaVA-1.5 structure of tiny width (configs/model/tiny.yaml's widths, 32 layers, a 56 px image = 16 vision
tokens) at batch 1 with a 91-token prompt (35 system + 16 vision + 40 text): the arithmetic is negligible, so the
time is the host's (Python and op dispatch), as in a batch-1 forward of the 7B model on a GPU. Variants:
unpruned; keep-all (the "64" preset's stage layers 1, 10, 20 keeping every token: scoring and gathering, nothing
dropped); "64" (the adaptinfer_7b_64 preset's keep counts scaled to 16 vision tokens: 4, 1, 1). Reported per
variant: the aten ops one forward dispatches (and its host reads of tensor values), and the median wall time of the
full forward (interleaved repeats), as a ratio to unpruned: the ratio of the medians, and the median (with quartiles)
of each repeat's ratio to the unpruned forward of the same round (paired: steadier when the machine's speed drifts).
With --compile the same variants also run with the language model compiled (`PruningEngine(..., compile=True)`, and
`compiled_prefill` for unpruned), ratios taken compiled against compiled.

    python benchmarks/engine_overhead.py --repeats 30 --out benchmarks/results/engine_overhead_cpu.md
    python benchmarks/engine_overhead.py --repeats 30 --compile --out benchmarks/results/engine_overhead_cpu.md

With --parts, where keep-all's cost goes: the engine with parts switched off (a diagnostic, not a way to run it):
"start + steps" (the layout, the layer steps and the probe's dispatch, no attention rows), "+ rows" (the attention
rows too, no scoring), then the whole keep-all; the differences between the rows are each part's share.

    python benchmarks/engine_overhead.py --repeats 300 --parts

With --ops, where the extra ops come from (no timing): each aten op of one forward that this repository's code
dispatched (not transformers' or torch's), counted by the function that dispatched it, per engine variant; the model's
own ops are not listed, so the counts sum to the "extra ops" column.

    python benchmarks/engine_overhead.py --ops

By default one model runs every variant, each variant's engine entered around its forward (outside the clock); with
--kept-open each variant runs on its own copy of the model with its engine open for the whole run, as in a serving
loop (eager).

Targets (issue 17): keep-all <= 1.05x, "64" <= 1.00x unpruned (eager); the engine's extra ops <= 150 (pinned at 110 by
tests/test_engine.py).
"""
from __future__ import annotations

import argparse
import collections
import copy
import statistics
import sys
import sysconfig
import time
from contextlib import ExitStack, nullcontext
from pathlib import Path

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from prefill_latency import variant_context, write_table  # noqa: E402
from pruning.engine import PruningEngine  # noqa: E402
from pruning.schedule import Schedule  # noqa: E402
from vlm.models import build_random_model  # noqa: E402

IMAGE_TOKEN_ID = 3
CLOCK = time.perf_counter  # --clock process: this process's CPU time (steadier on a machine shared with other jobs)
SYSTEM_LEN, TEXT_LEN = 35, 40


def proxy_model(layers: int = 32) -> torch.nn.Module:
    """configs/model/tiny.yaml's architecture with `layers` decoder layers and a 56 px image (16 vision tokens)."""
    arch = OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "model" / "tiny.yaml"), resolve=True)["arch"]
    arch["text_config"]["num_hidden_layers"] = layers
    arch["vision_config"]["image_size"] = 56
    arch["image_token_id"] = IMAGE_TOKEN_ID
    return build_random_model(arch, dtype="float32", device="cpu", seed=0, name="proxy").model


def proxy_inputs(model: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """[35 system][16 image tokens][40 text] with random ids, one random image."""
    n_vision = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, model.config.text_config.vocab_size, (1, SYSTEM_LEN + n_vision + TEXT_LEN), generator=g)
    ids[:, SYSTEM_LEN:SYSTEM_LEN + n_vision] = IMAGE_TOKEN_ID
    size = model.config.vision_config.image_size
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.randn(1, 3, size, size, generator=g)}


def schedules(n_vision: int = 16) -> dict[str, Schedule]:
    """keep-all and "64" at the adaptinfer_7b_64 preset's stage layers (a 32-layer preset: no depth scaling)."""
    preset = Schedule.from_yaml(ROOT / "configs" / "schedule" / "adaptinfer_7b_64.yaml")
    keeps = [max(1, round(s.keep * n_vision / preset.vision_tokens)) for s in preset.stages]
    return {
        "keep-all": Schedule.from_dict({"stages": [{"layer": s.layer, "keep": 1.0} for s in preset.stages]}),
        '"64"': Schedule.from_dict({"stages": [{"layer": s.layer, "keep": k} for s, k in zip(preset.stages, keeps)]}),
    }


class OpCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the aten ops a forward dispatches, and those that read a tensor value on the host."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.host_reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        self.host_reads += func.overloadpacket is torch.ops.aten._local_scalar_dense  # .item(), int(), bool()
        return func(*args, **(kwargs or {}))


def count_ops(model: torch.nn.Module, inputs: dict, schedule: Schedule | tuple | None, scorer: str = "adaptinfer"):
    """(aten ops, host reads) of one eager forward, unpruned (schedule None) or under the engine (a schedule, or
    (schedule, PartialEngine options))."""
    counter = watched_forward(model, inputs, schedule, OpCounter(), scorer)
    return counter.ops, counter.host_reads


def watched_forward(model: torch.nn.Module, inputs: dict, variant: Schedule | tuple | None, mode,
                    scorer: str = "adaptinfer"):
    """One eager forward of `variant` (see `open_variant`) under the dispatch mode `mode`, after a warm-up forward
    (lazy initialisation is not the engine's cost); returns `mode`."""
    with torch.no_grad(), open_variant(model, variant, scorer):
        model(**inputs)
        with mode:
            model(**inputs)
    return mode


_TORCH_DIR = str(Path(torch.__file__).parent) + "/"
_STDLIB_DIR = str(Path(sysconfig.get_paths()["stdlib"])) + "/"


def _passes_through(filename: str) -> bool:
    """Whether a frame of this file only passes a call on (torch's own code, Python's standard library), so that the
    function that dispatched an op is further out. Packages installed beside the standard library are callers."""
    return filename.startswith(_TORCH_DIR) or (filename.startswith(_STDLIB_DIR) and "-packages/" not in filename)


class OpSites(torch.utils._python_dispatch.TorchDispatchMode):
    """Which function dispatched each aten op: the innermost frame outside torch and the standard library. Ops whose
    caller is in this repository (outside benchmarks/) are the engine's; the model's own come from transformers."""

    def __init__(self) -> None:
        super().__init__()
        self.sites: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        frame = sys._getframe(1)
        while frame is not None and _passes_through(frame.f_code.co_filename):
            frame = frame.f_back
        path = Path(frame.f_code.co_filename) if frame is not None else None
        if path is not None and path.is_relative_to(ROOT) and not path.is_relative_to(ROOT / "benchmarks") \
                and not {"site-packages", "dist-packages"} & set(path.parts):  # a virtualenv inside the checkout
            self.sites[f"{path.relative_to(ROOT)}:{frame.f_code.co_name}"][func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def engine_op_sites(model: torch.nn.Module, inputs: dict, schedule: Schedule) -> dict[str, collections.Counter]:
    """The engine's aten ops in one eager forward under `schedule`: function -> Counter of op names."""
    return dict(watched_forward(model, inputs, schedule, OpSites()).sites)


def op_site_lines(name: str, sites: dict[str, collections.Counter]) -> list[str]:
    """A markdown table of `engine_op_sites`: each function, its op count, and the ops by name."""
    lines = [f"### {name}: {sum(sum(c.values()) for c in sites.values())} engine ops", "",
             "| function | ops | aten ops |", "|---|---|---|"]
    for site, ops in sites.items():
        names = ", ".join(f"{op} x{n}" if n > 1 else op for op, n in ops.items())
        lines.append(f"| {site} | {sum(ops.values())} | {names} |")
    return lines + [""]


class PartialEngine(PruningEngine):
    """A diagnostic for --parts: the engine with its attention rows (`rows=False`) or its scoring, selection and drop
    (`score=False`) switched off, the rest as it is."""

    def __init__(self, *args, rows: bool = True, score: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.rows_on, self.score_on = rows, score

    def _probe_rows(self, call):
        return super()._probe_rows(call) if self.rows_on else None

    def _on_rows(self, call, rows, index, mask) -> None:
        if self.score_on:
            super()._on_rows(call, rows, index, mask)


def part_variants(keep_all: Schedule) -> dict[str, tuple[Schedule, dict]]:
    """--parts: keep-all with parts switched off, then whole (name -> (schedule, PartialEngine options))."""
    return {"keep-all: start + steps": (keep_all, {"rows": False}), "keep-all: + rows": (keep_all, {"score": False}),
            "keep-all": (keep_all, {})}


def open_variant(model, variant: Schedule | tuple | None, scorer: str = "adaptinfer", compile: bool = False):
    """The context a variant runs in: nothing (None: unpruned; compiled: `compiled_prefill`), the engine on a schedule,
    or (schedule, PartialEngine options) for --parts."""
    if isinstance(variant, tuple):
        return PartialEngine(model, variant[0], scorer, **variant[1])
    return variant_context(model, variant, scorer, compile)


def time_variants(model, inputs, variants: dict, repeats: int, warmup: int, compile: bool,
                  kept_open: bool = False) -> dict[str, list[float]]:
    """Wall ms of the full forward per variant, interleaved round-robin. By default on one model: each variant's engine
    is entered around its forward, outside the clock. kept_open: each variant on its own copy of the model, its engine
    entered once for the whole run, as in a serving loop. A variant is a schedule (None: unpruned) or (schedule,
    PartialEngine options)."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    with torch.no_grad(), ExitStack() as stack:
        models = {name: model for name in variants}
        if kept_open:
            for name, variant in variants.items():
                models[name] = copy.deepcopy(model)
                stack.enter_context(open_variant(models[name], variant, compile=compile))
        for step in range(warmup + repeats):
            for name, variant in variants.items():
                with nullcontext() if kept_open else open_variant(model, variant, compile=compile):
                    start = CLOCK()
                    models[name](**inputs)
                    elapsed = (CLOCK() - start) * 1e3
                if step >= warmup:
                    times[name].append(elapsed)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="also time the compiled forward (minutes on a CPU)")
    parser.add_argument("--clock", choices=["wall", "process"], default="wall",
                        help="wall (perf_counter) or process (this process's CPU time, steadier on a shared machine)")
    parser.add_argument("--parts", action="store_true",
                        help="only the breakdown of keep-all's cost (parts of the engine switched off), eager")
    parser.add_argument("--kept-open", action="store_true",
                        help="each variant on its own copy of the model with its engine open for the whole run (as in "
                             "a serving loop), instead of entering it around each forward; eager")
    parser.add_argument("--ops", action="store_true",
                        help="only where the engine's extra ops come from: its ops by function, per variant "
                             "(no timing)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.ops and (args.compile or args.parts or args.kept_open):
        parser.error("--ops lists the eager engine's ops, without timing; run it alone (with --layers / --out)")
    if args.parts and args.compile:
        parser.error("--parts breaks down the eager engine's cost; run it without --compile")
    if args.kept_open and args.compile:
        parser.error("--kept-open times the eager engine; run it without --compile")
    global CLOCK
    CLOCK = time.process_time if args.clock == "process" else time.perf_counter
    torch.set_num_threads(1)
    model = proxy_model(args.layers)
    inputs = proxy_inputs(model)
    variants = {"unpruned": None, **schedules()}
    if args.ops:
        lines = ["# The engine's extra aten ops by function, CPU proxy of batch-1 prefill", "",
                 f"Command: `python {' '.join(sys.argv)}`  ",
                 f"torch {torch.__version__}; {args.layers} layers, batch 1, "
                 f"{inputs['input_ids'].shape[1]}-token prompt; one eager forward, functions in dispatch order.", ""]
        for name, schedule in variants.items():
            if schedule is not None:
                lines += op_site_lines(name, engine_op_sites(model, inputs, schedule))
        write_table(lines, args.out)
        return
    if args.parts:
        variants = {"unpruned": None, **part_variants(variants["keep-all"])}
    lines = [
        "# Engine overhead, CPU proxy of batch-1 GPU prefill",
        "",
        f"Command: `python {' '.join(sys.argv)}`  ",
        f"torch {torch.__version__}, 1 thread; LLaVA-1.5 structure, tiny width, {args.layers} layers, batch 1, "
        f"{inputs['input_ids'].shape[1]}-token prompt (16 vision tokens); full forward, median of {args.repeats} "
        f"interleaved repeats after {args.warmup} warm-up rounds, {args.clock} clock"
        + ("; each variant on its own copy of the model, its engine open for the whole run." if args.kept_open else "."),
        "",
        "| execution | variant | stages (layer:keep) | aten ops | extra ops | host reads | ms | ratio to unpruned | "
        "paired ratio (IQR) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    ops = {name: count_ops(model, inputs, schedule) for name, schedule in variants.items()}
    modes = ["eager"] + (["compiled"] if args.compile else [])
    for mode in modes:
        times = time_variants(model, inputs, variants, args.repeats, args.warmup, compile=mode == "compiled",
                              kept_open=args.kept_open)
        base = statistics.median(times["unpruned"])
        for name, schedule in variants.items():
            ms = statistics.median(times[name])
            schedule = schedule[0] if isinstance(schedule, tuple) else schedule
            stages = " ".join(f"{s.layer}:{s.keep:g}" for s in schedule.stages) if schedule is not None else "-"
            n_ops, reads = ops[name] if mode == "eager" else ("-", "-")
            extra = n_ops - ops["unpruned"][0] if mode == "eager" else "-"
            paired = sorted(t / u for t, u in zip(times[name], times["unpruned"]))  # each repeat against its round's
            q1, q2, q3 = statistics.quantiles(paired, n=4) if len(paired) > 1 else paired * 3
            line = (f"| {mode} | {name} | {stages} | {n_ops} | {extra} | {reads} | {ms:.2f} | {ms / base:.3f} | "
                    f"{q2:.3f} ({q1:.3f}-{q3:.3f}) |")
            print(line, flush=True)
            lines.append(line)
    write_table(lines, args.out)


if __name__ == "__main__":
    main()
