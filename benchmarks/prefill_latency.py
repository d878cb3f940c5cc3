"""Prefill latency: unpruned vs pruning schedules, eager and compiled, beside the analytic FLOPs ratio.

Run by hand (not a test); writes a markdown table with the command that made it. Timed per forward: the vision
tower, the language model ("decoder", the ratio column) and the whole forward (time to first token), CUDA events
on GPU, perf_counter on CPU (`StageTimer`); warm-up, then the median of repeats, eager variants interleaved
round-robin so that background load affects them alike. The scorer's cost is the
extra time of a schedule that keeps every token at the same stage layers (it scores and gathers, drops
nothing), as a share of the unpruned time.

    python benchmarks/prefill_latency.py --models tiny mid --batch 1 --repeats 7 \
        --out benchmarks/results/prefill_latency_cpu.md
    python benchmarks/prefill_latency.py --models llava-1.5-7b-arch --batch 1 8 --compile --out benchmarks/results/prefill_latency_gpu.md
    python benchmarks/prefill_latency.py --models qwen2-vl-tiny --layers 4 --repeats 1 --warmup 0

Any family of vlm.arch: the model is reached through its seam (decoder, vision tower + projector, image inputs).
Families whose vision-token count follows the image (Qwen2-VL / Qwen2.5-VL) get one synthetic image of
--image-grid rows x cols merged tokens per row (default 24 x 24 = 576, LLaVA-1.5's count, so the 576-token presets
apply; a 672 x 672 px image on Qwen).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pruning.methods import scale_layers  # noqa: E402
from pruning.engine import PruningEngine  # noqa: E402
from pruning.flops import prefill_flops  # noqa: E402
from pruning.schedule import Schedule  # noqa: E402
from vlm.models import LoadedModel, build_random_model, load_processor, match_processor, resolve_device  # noqa: E402

PAPER_PRESETS = ("adaptinfer_7b_64", "adaptinfer_7b_128")
DEFAULT_GRID = (24, 24)  # the image's token grid where the family does not fix one: LLaVA-1.5's 576 tokens
MID_ARCH = {  # a quarter of LLaVA-1.5-7B's width, all 32 layers; a small vision tower (it is not timed)
    "image_token_id": 32000,
    "vision_feature_layer": -2,
    "vision_feature_select_strategy": "default",
    "text_config": {"model_type": "llama", "hidden_size": 1024, "intermediate_size": 2752, "num_hidden_layers": 32,
                    "num_attention_heads": 8, "num_key_value_heads": 8, "vocab_size": 32064, "pad_token_id": 32001},
    "vision_config": {"model_type": "clip_vision_model", "hidden_size": 64, "intermediate_size": 128,
                      "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": 336, "patch_size": 14},
}


def build(name: str, device: torch.device, attn: str = "sdpa", layers: int | None = None) -> LoadedModel:
    """The random-weight model a name stands for: a configs/model preset with `arch`, or 'mid' (`layers` overrides
    the decoder depth)."""
    if name == "mid":
        arch = {**MID_ARCH, "text_config": {**MID_ARCH["text_config"], **({"num_hidden_layers": layers} if layers else {})}}
        return build_random_model(arch, dtype="float32" if device.type == "cpu" else "float16", device=device,
                                  name="mid", attn_implementation=attn)
    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "model" / f"{name}.yaml"), resolve=True)
    arch = dict(cfg["arch"])
    if layers:
        arch["text_config"] = {**arch["text_config"], "num_hidden_layers": layers}
    if name == "tiny":  # no processor needed: the prompt is synthetic
        arch["text_config"] = {**arch["text_config"], "vocab_size": 64}
        arch["image_token_id"] = 7
    elif cfg.get("processor"):  # its vocabulary and special token ids come from its processor
        arch = match_processor(arch, load_processor(cfg["processor"]))
    dtype = cfg.get("dtype", "auto") if device.type == "cuda" else "float32"
    return build_random_model(arch, dtype=dtype, device=device, name=name, attn_implementation=attn)


def image_grid(loaded: LoadedModel, grid: tuple[int, int] | None = None) -> tuple[int, int]:
    """The token grid of one synthetic image: the family's fixed one (LLaVA: the tower's 24 x 24), else `grid`
    (default DEFAULT_GRID)."""
    return loaded.arch.image_grid(loaded.processor) or tuple(grid or DEFAULT_GRID)


def synthetic_inputs(loaded: LoadedModel, batch: int, text_len: int, system_len: int,
                     grid: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
    """[system][one image's tokens][text] with random ids, and the family's image inputs with random pixels
    (`vlm.arch`'s random_image_inputs) for an image of `image_grid(loaded, grid)` tokens."""
    rows, cols = image_grid(loaded, grid)
    n_vision = rows * cols
    vocab = loaded.config.get_text_config().vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, min(vocab, 32000) - 1, (batch, system_len + n_vision + text_len), generator=g)
    ids[ids == loaded.image_token_id] = 11
    ids[:, system_len:system_len + n_vision] = loaded.image_token_id
    ids = ids.to(loaded.device)
    images = loaded.arch.random_image_inputs(ids, (rows, cols), generator=g, dtype=loaded.dtype)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), **images}


def vision_tokens(loaded: LoadedModel, inputs: dict[str, torch.Tensor]) -> int:
    """Image tokens per row of synthetic `inputs`."""
    return int((inputs["input_ids"][0] == loaded.image_token_id).sum())


class StageTimer:
    """Times each forward's vision tower (tower + projector) and language model ("decoder": the decoder-layer loop
    with its mask/RoPE set-up and final norm), and the whole forward (time to first token's logits): CUDA events on
    GPU, perf_counter on CPU. Its hooks sit on the tower, projector and language-model modules, outside the graph a
    compiled prefill runs, so eager and compiled forwards are timed alike."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.sites = {"vision": loaded.arch.vision_sites().span, "decoder": (loaded.language_model,) * 2}
        self.cuda = loaded.device.type == "cuda"
        self.times_ms: dict[str, list[float]] = {"vision": [], "decoder": [], "ttft": []}
        self._marks: dict[str, Any] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> "StageTimer":
        for name, (first, last) in self.sites.items():
            self._handles.append(first.register_forward_pre_hook(lambda m, a, n=name: self._mark(f"{n}0")))
            self._handles.append(last.register_forward_hook(lambda m, a, o, n=name: self._mark(f"{n}1")))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()

    def _mark(self, key: str) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self._marks[key] = ev
        else:
            self._marks[key] = time.perf_counter()

    def _ms(self, a: str, b: str) -> float:
        if self.cuda:
            return float(self._marks[a].elapsed_time(self._marks[b]))
        return (self._marks[b] - self._marks[a]) * 1e3

    def run(self, fn) -> None:
        """Call fn (one forward) and record its three times."""
        self._mark("all0")
        fn()
        self._mark("all1")
        if self.cuda:
            torch.cuda.synchronize()
        self.times_ms["vision"].append(self._ms("vision0", "vision1"))
        self.times_ms["decoder"].append(self._ms("decoder0", "decoder1"))
        self.times_ms["ttft"].append(self._ms("all0", "all1"))


def preset_at_depth(preset: str, n_layers: int) -> Schedule:
    """A configs/schedule preset on an n_layers-deep model: made for another depth (its num_layers, e.g. LLaVA-1.5-7B's
    32), its stage layers scaled by the benchmark's rule (pruning.methods.scale_layers), the same keep counts."""
    sched = Schedule.from_yaml(ROOT / "configs" / "schedule" / f"{preset}.yaml")
    if sched.num_layers is None or sched.num_layers == n_layers:
        return sched
    layers = scale_layers(sched.layers, n_layers, sched.num_layers)
    return Schedule.from_dict({"stages": [{"layer": l, "keep": s.keep} for l, s in zip(layers, sched.stages)],
                               "positions": sched.positions, "rounding": sched.rounding, "name": sched.name})


def keep_all(schedule: Schedule) -> Schedule:
    """The same stage layers keeping every token: pays for scoring and gathering, drops nothing."""
    return Schedule.from_dict({"stages": [{"layer": s.layer, "keep": 1.0} for s in schedule.stages],
                               "positions": schedule.positions})


def _compiled_status(loaded: LoadedModel) -> str:
    """The `mode` cell of a compiled variant: compiled (with or without CUDA graph replay), or the eager fallback."""
    from pruning.compiled import active

    prefill = active(loaded.model)
    if not prefill.compiled:
        return f"eager (fallback: {prefill.fallback_reason})"
    if prefill.cudagraphs is None:
        return "compiled"
    return "compiled, CUDA graphs" if prefill.cudagraphs else f"compiled, no CUDA graphs ({prefill.cudagraph_skip})"


def variant_context(model: torch.nn.Module, schedule: Schedule | None, scorer: str, compiled: bool):
    """The engine for a schedule (compiled or not), or, unpruned, the compiled prefill / nothing."""
    from contextlib import nullcontext

    from pruning.compiled import compiled_prefill

    if schedule is not None:
        return PruningEngine(model, schedule, scorer, compile=compiled)
    return compiled_prefill(model) if compiled else nullcontext()


def measure(loaded: LoadedModel, batch: int, repeats: int, warmup: int, text_len: int, system_len: int,
            scorer: str, modes: tuple[str, ...] = ("eager",),
            compile_variants: tuple[str, ...] | None = None,
            grid: tuple[int, int] | None = None) -> Iterator[dict[str, Any]]:
    """Median vision-tower, decoder and time-to-first-token per variant and execution mode, with analytic FLOPs.

    Eager variants are interleaved round-robin (each repeat enters each variant's engine anew); compiled ones run
    in blocks, each variant's engine open for its warm-up and repeats (a compiled graph is built once per engine
    and, with CUDA graphs, recorded during the warm-up, at least 3 calls). Rows are yielded as they are measured:
    the eager ones together, each compiled one after its block (unpruned first: the ratios' base), so that a run
    stopped partway keeps the rows it finished."""
    inputs = synthetic_inputs(loaded, batch, text_len, system_len, grid)
    n_layers, n_vision = loaded.num_layers, vision_tokens(loaded, inputs)
    schedules: dict[str, Schedule | None] = {"unpruned": None}
    for preset in PAPER_PRESETS:
        schedules[preset] = preset_at_depth(preset, n_layers)
    schedules[f"keep-all@{PAPER_PRESETS[0]} layers"] = keep_all(schedules[PAPER_PRESETS[0]])
    if "compiled" in modes and compile_variants and "unpruned" not in compile_variants:
        raise SystemExit("--compile-variants must include unpruned (the ratios' base)")
    hidden, intermediate = loaded.text_widths
    seq = inputs["input_ids"].shape[1]
    tokens: dict[str, list[int]] = {"unpruned": [seq] * n_layers}
    base_flops = prefill_flops(tokens["unpruned"], hidden, intermediate)

    last: dict[str, torch.Tensor] = {}  # the last forward's next-token logits per variant
    eager_logits: dict[str, torch.Tensor] = {}

    def forward(name: str):
        def run() -> None:
            last[name] = loaded.model(**inputs, use_cache=True, logits_to_keep=1).logits[:, -1]
        return run

    def row(name: str, ts: dict[str, list[float]], base: dict[str, float], status: str, compiled: bool) -> dict:
        med = {k: statistics.median(v) for k, v in ts.items()}
        flops = prefill_flops(tokens[name], hidden, intermediate)
        check = {}
        if compiled and name in eager_logits:  # the compiled forward against the eager one, same inputs
            got, want = last[name].float(), eager_logits[name]
            check = {"max_logit_diff": float((got - want).abs().max()),
                     "same_argmax": float((got.argmax(-1) == want.argmax(-1)).float().mean())}
        return {**check, "mode": status, "variant": name, "vision_ms": med["vision"], "ms": med["decoder"],
                "ttft_ms": med["ttft"], "spread_ms": max(ts["decoder"]) - min(ts["decoder"]),
                "latency_ratio": med["decoder"] / base["decoder"], "ttft_ratio": med["ttft"] / base["ttft"],
                "tflops_per_sample": flops / 1e12,
                "flops_ratio": flops / base_flops,
                "budget_processed": schedules[name].budget(n_layers, n_vision)
                if schedules[name] is not None else float(n_vision)}

    for mode in modes:
        if mode != "compiled":
            timers = {name: StageTimer(loaded) for name in schedules}
            with torch.no_grad():
                for step in range(warmup + repeats):
                    for name, schedule in schedules.items():
                        with variant_context(loaded.model, schedule, scorer, False) as engine, timers[name]:
                            if step < warmup:
                                forward(name)()
                            else:
                                timers[name].run(forward(name))
                        if engine is not None:
                            tokens[name] = list(engine.record.tokens_per_layer)
            eager_logits = {name: logits.float().clone() for name, logits in last.items()}
            base = {k: statistics.median(v) for k, v in timers["unpruned"].times_ms.items()}
            for name, timer in timers.items():
                yield row(name, timer.times_ms, base, "eager", False)
            continue
        base = None
        for name, schedule in schedules.items():
            if compile_variants and name.split("@")[0] not in compile_variants:
                continue
            timer = StageTimer(loaded)
            with torch.no_grad(), variant_context(loaded.model, schedule, scorer, True), timer:
                for _ in range(max(warmup, 3)):
                    forward(name)()
                for _ in range(repeats):
                    timer.run(forward(name))
                status = _compiled_status(loaded)
            if base is None:  # unpruned, first
                base = {k: statistics.median(v) for k, v in timer.times_ms.items()}
            yield row(name, timer.times_ms, base, status, True)


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
    parser.add_argument("--compile", action="store_true", help="also time compiled prefill (CUDA graphs on a GPU)")
    parser.add_argument("--compile-variants", nargs="+", default=None,
                        help="compiled variants to time (default all): unpruned adaptinfer_7b_64 adaptinfer_7b_128 keep-all")
    parser.add_argument("--layers", type=int, default=None, help="override the decoder depth (a quick dry run)")
    parser.add_argument("--image-grid", type=int, nargs=2, default=list(DEFAULT_GRID), metavar=("ROWS", "COLS"),
                        help="vision-token grid of the synthetic image where the family does not fix one (Qwen)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    modes = ("eager", "compiled") if args.compile else ("eager",)
    device = resolve_device(args.device)
    lines = [
        f"# Prefill latency ({device.type}, {torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'})",
        "",
        f"Command: `python {' '.join(sys.argv)}`  ",
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, scorer `{args.scorer}`, "
        f"prompt = {args.system_len} system + V vision (one image: 576 on LLaVA-1.5, {args.image_grid[0]} x "
        f"{args.image_grid[1]} merged patches on Qwen) + {args.text_len} text tokens, random weights.  ",
        "Timed per forward (`model(**inputs, use_cache=True, logits_to_keep=1)`): the vision tower + projector "
        "(vision ms), the language model (decoder ms: the decoder layers with their mask/RoPE set-up and final norm; "
        "the latency ratio is of this column) and the whole forward (TTFT ms: time to the first token's logits). "
        "Medians of repeats after warm-up; eager variants interleaved, compiled ones in blocks (one graph each, "
        "compiled against compiled). Budgets in the processed convention (mean vision tokens per decoder layer). "
        "keep-all = the same stage layers keeping every token: its extra time is the scorer's cost. Compiled rows "
        "also compare their next-token logits with the eager forward of the same variant (max abs difference, "
        "share of rows with the same next token).",
        "",
        "| model | attention | batch | execution | variant | budget | vision ms | decoder ms | spread ms | TTFT ms | "
        "latency ratio | TTFT ratio | TFLOPs/sample | FLOPs ratio | vs eager: max abs logit diff, same next token |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in args.models:
        for attn in args.attn:
            loaded = build(name, device, attn, args.layers)
            for batch in args.batch:
                for row in measure(loaded, batch, args.repeats, args.warmup, args.text_len, args.system_len,
                                   args.scorer, modes, tuple(args.compile_variants or ()), tuple(args.image_grid)):
                    line = (f"| {name} | {attn} | {batch} | {row['mode']} | {row['variant']} | "
                            f"{row['budget_processed']:.1f} | {row['vision_ms']:.1f} | {row['ms']:.1f} | "
                            f"{row['spread_ms']:.1f} | {row['ttft_ms']:.1f} | {row['latency_ratio']:.3f} | "
                            f"{row['ttft_ratio']:.3f} | {row['tflops_per_sample']:.4f} | {row['flops_ratio']:.3f} | "
                            + (f"{row['max_logit_diff']:.2e}, {row['same_argmax']:.0%} |" if "max_logit_diff" in row
                               else "- |"))
                    print(line, flush=True)
                    lines.append(line)
                    if args.out:  # the table so far: a run stopped partway keeps its finished rows
                        save_table(lines, args.out)
            del loaded
            if device.type == "cuda":
                torch.cuda.empty_cache()
    write_table(lines, args.out)


def write_table(lines: list[str], out: Path | None) -> None:
    """Print the markdown lines and, with `out`, write them there (folders made as needed)."""
    print("\n".join(lines) + "\n")
    if out:
        save_table(lines, out)


def save_table(lines: list[str], out: Path) -> None:
    """Write the markdown lines to `out` whole or not at all (a temporary file renamed over it), so that a run
    stopped while writing leaves the previous table, not a cut one."""
    out.parent.mkdir(parents=True, exist_ok=True)
    part = out.with_name(out.name + ".part")
    part.write_text("\n".join(lines) + "\n")
    part.replace(out)


if __name__ == "__main__":
    main()
