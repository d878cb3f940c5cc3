"""Prefill latency of the decoder-layer loop: unpruned vs pruning schedules, beside the analytic FLOPs ratio.

Run by hand (not a test); writes a markdown table with the command that made it. The timed region is the
language model's decoder-layer loop (pre-hook of layer 0 to the output of the last layer), as in the
AdaptInfer code: CUDA events on GPU, perf_counter on CPU; warm-up, then the median of repeats, with the
variants interleaved round-robin so that background load affects them alike. The scorer's cost is the
extra time of a schedule that keeps every token at the same stage layers (it scores and gathers, drops
nothing), as a share of the unpruned time.

    python benchmarks/prefill_latency.py --models tiny mid --batch 1 --repeats 7 \
        --out benchmarks/results/prefill_latency_cpu.md
    python benchmarks/prefill_latency.py --models llava-1.5-7b-arch --batch 1 8 --out benchmarks/results/prefill_latency_gpu.md
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pruning.benchmark import scale_layers  # noqa: E402
from pruning.engine import PruningEngine  # noqa: E402
from pruning.flops import prefill_flops  # noqa: E402
from pruning.schedule import Schedule  # noqa: E402
from vlm.models import LoadedModel, build_random_model, resolve_device  # noqa: E402

PAPER_PRESETS = ("adaptinfer_7b_64", "adaptinfer_7b_128")
MID_ARCH = {  # a quarter of LLaVA-1.5-7B's width, all 32 layers; a small vision tower (it is not timed)
    "image_token_id": 32000,
    "vision_feature_layer": -2,
    "vision_feature_select_strategy": "default",
    "text_config": {"model_type": "llama", "hidden_size": 1024, "intermediate_size": 2752, "num_hidden_layers": 32,
                    "num_attention_heads": 8, "num_key_value_heads": 8, "vocab_size": 32064, "pad_token_id": 32001},
    "vision_config": {"model_type": "clip_vision_model", "hidden_size": 64, "intermediate_size": 128,
                      "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": 336, "patch_size": 14},
}


def build(name: str, device: torch.device, attn: str = "sdpa") -> LoadedModel:
    """The random-weight model a name stands for: a configs/model preset with `arch`, or 'mid'."""
    if name == "mid":
        return build_random_model(MID_ARCH, dtype="float32" if device.type == "cpu" else "float16", device=device,
                                  name="mid", attn_implementation=attn)
    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "model" / f"{name}.yaml"), resolve=True)
    arch = dict(cfg["arch"])
    if name == "tiny":  # no processor needed: the prompt is synthetic
        arch["text_config"] = {**arch["text_config"], "vocab_size": 64}
        arch["image_token_id"] = 7
    dtype = cfg.get("dtype", "auto") if device.type == "cuda" else "float32"
    return build_random_model(arch, dtype=dtype, device=device, name=name, attn_implementation=attn)


def synthetic_inputs(loaded: LoadedModel, batch: int, text_len: int, system_len: int) -> dict[str, torch.Tensor]:
    """[system][576 image tokens][text] with random ids; pixel values of the tower's size."""
    cfg = loaded.config
    vocab = cfg.text_config.vocab_size
    n_vision = loaded.vision_tokens_per_image
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, min(vocab, 32000) - 1, (batch, system_len + n_vision + text_len), generator=g)
    ids[:, system_len:system_len + n_vision] = loaded.image_token_id
    size = cfg.vision_config.image_size
    pix = torch.randn(batch, 3, size, size, generator=g)
    return {"input_ids": ids.to(loaded.device), "pixel_values": pix.to(loaded.device, loaded.dtype),
            "attention_mask": torch.ones_like(ids).to(loaded.device)}


class DecoderLoopTimer:
    """Times the decoder-layer loop of each forward: CUDA events on GPU, perf_counter on CPU."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.layers = loaded.decoder_layers
        self.cuda = loaded.device.type == "cuda"
        self.times_ms: list[float] = []
        self._handles: list[Any] = []

    def __enter__(self) -> "DecoderLoopTimer":
        self._handles.append(self.layers[0].register_forward_pre_hook(lambda m, a: self._start()))
        self._handles.append(self.layers[-1].register_forward_hook(lambda m, a, o: self._stop()))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()

    def _start(self) -> None:
        if self.cuda:
            self._ev0 = torch.cuda.Event(enable_timing=True)
            self._ev0.record()
        else:
            self._t0 = time.perf_counter()

    def _stop(self) -> None:
        if self.cuda:
            ev1 = torch.cuda.Event(enable_timing=True)
            ev1.record()
            torch.cuda.synchronize()
            self.times_ms.append(self._ev0.elapsed_time(ev1))
        else:
            self.times_ms.append((time.perf_counter() - self._t0) * 1e3)


def keep_all(schedule: Schedule) -> Schedule:
    """The same stage layers keeping every token: pays for scoring and gathering, drops nothing."""
    return Schedule.from_dict({"stages": [{"layer": s.layer, "keep": 1.0} for s in schedule.stages],
                               "positions": schedule.positions})


def measure(loaded: LoadedModel, batch: int, repeats: int, warmup: int, text_len: int, system_len: int,
            scorer: str) -> list[dict[str, Any]]:
    """Median decoder-loop time per variant (interleaved), with the analytic FLOPs of each."""
    inputs = synthetic_inputs(loaded, batch, text_len, system_len)
    n_layers = loaded.num_layers
    schedules: dict[str, Schedule] = {}
    for preset in PAPER_PRESETS:
        sched = Schedule.from_yaml(ROOT / "configs" / "schedule" / f"{preset}.yaml")
        if n_layers != 32:  # the 32-layer preset's layers at this depth (the benchmark's rule), same keep counts
            layers = scale_layers(sched.layers, n_layers, 32)
            sched = Schedule.from_dict({"stages": [{"layer": l, "keep": s.keep} for l, s in zip(layers, sched.stages)],
                                        "positions": sched.positions})
        schedules[preset] = sched
    schedules[f"keep-all@{PAPER_PRESETS[0]} layers"] = keep_all(schedules[PAPER_PRESETS[0]])
    times: dict[str, list[float]] = {name: [] for name in ["unpruned", *schedules]}
    tokens: dict[str, list[int]] = {}
    tc = loaded.config.text_config
    seq = inputs["input_ids"].shape[1]
    tokens["unpruned"] = [seq] * n_layers
    with torch.no_grad():
        for step in range(warmup + repeats):
            for name in times:
                with DecoderLoopTimer(loaded) as timer:
                    if name == "unpruned":
                        loaded.model(**inputs)
                    else:
                        with PruningEngine(loaded.model, schedules[name], scorer) as engine:
                            loaded.model(**inputs)
                        tokens[name] = list(engine.record.tokens_per_layer)
                if step >= warmup:
                    times[name].append(timer.times_ms[-1])
    base_ms = statistics.median(times["unpruned"])
    base_flops = prefill_flops(tokens["unpruned"], tc.hidden_size, tc.intermediate_size)
    rows = []
    for name, ts in times.items():
        ms = statistics.median(ts)
        flops = prefill_flops(tokens[name], tc.hidden_size, tc.intermediate_size)
        rows.append({"variant": name, "ms": ms, "spread_ms": max(ts) - min(ts), "latency_ratio": ms / base_ms,
                     "tflops_per_sample": flops / 1e12, "flops_ratio": flops / base_flops,
                     "budget_processed": schedules[name].budget(n_layers, loaded.vision_tokens_per_image)
                     if name in schedules else float(loaded.vision_tokens_per_image)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny", "mid"])
    parser.add_argument("--batch", nargs="+", type=int, default=[1])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--text-len", type=int, default=40)
    parser.add_argument("--system-len", type=int, default=35)
    parser.add_argument("--scorer", default="adaptinfer")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--attn", nargs="+", default=["sdpa"], help="attention implementations, e.g. sdpa flash_attention_2")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = resolve_device(args.device)
    lines = [
        f"# Prefill latency ({device.type}, {torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'})",
        "",
        f"Command: `python {' '.join(sys.argv)}`  ",
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, scorer `{args.scorer}`, "
        f"prompt = {args.system_len} system + 576 vision + {args.text_len} text tokens, random weights.  ",
        "Timed region: the decoder-layer loop (median of repeats after warm-up, variants interleaved). "
        "Budgets in the processed convention (mean vision tokens per decoder layer). "
        "keep-all = the same stage layers keeping every token: its extra time is the scorer's cost.",
        "",
        "| model | attention | batch | variant | budget | decoder ms | spread ms | latency ratio | TFLOPs/sample | "
        "FLOPs ratio |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in args.models:
        for attn in args.attn:
            loaded = build(name, device, attn)
            for batch in args.batch:
                for row in measure(loaded, batch, args.repeats, args.warmup, args.text_len, args.system_len,
                                   args.scorer):
                    line = (f"| {name} | {attn} | {batch} | {row['variant']} | {row['budget_processed']:.1f} | "
                            f"{row['ms']:.1f} | {row['spread_ms']:.1f} | {row['latency_ratio']:.3f} | "
                            f"{row['tflops_per_sample']:.4f} | {row['flops_ratio']:.3f} |")
                    print(line, flush=True)
                    lines.append(line)
            del loaded
            if device.type == "cuda":
                torch.cuda.empty_cache()
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
