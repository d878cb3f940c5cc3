"""Cost of collecting records: a forward inside `AttentionCollector` vs a plain SDPA forward vs eager attention.

    python benchmarks/collect_overhead.py --model tiny --batch-size 4 --repeats 5
    python benchmarks/collect_overhead.py --model llava-1.5-7b-arch --num-layers 2 --vision-layers 2 --batch-size 1
    python benchmarks/collect_overhead.py --model qwen2-vl-tiny --batch-size 2 --repeats 1

Random weights from the preset's `arch` (or the real checkpoint for presets with a `source`, given
--use-source) and synthetic left-padded prompts `[system][V image tokens][text]`, so no processor or
data is needed (presets that name a processor get their vocabulary and special ids from it, as when loaded). Any
family of vlm.arch: one synthetic image per row, of the family's fixed token grid or of --image-grid (Qwen). The modes
are timed round-robin after a warm-up round, median of `--repeats` rounds (CUDA synchronised);
per-sample milliseconds and the ratios to the plain forward are printed as JSON.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import sys

import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis.collector import AttentionCollector  # noqa: E402
from vlm.models import (LoadedModel, build_random_model, load_from_config, load_processor, match_processor,  # noqa: E402
                        resolve_device)

from vlm.arch import arch_class  # noqa: E402
from vlm.models import DEFAULT_FAMILY  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "model"
DEFAULT_GRID = (24, 24)  # the image's token grid where the family does not fix one (LLaVA-1.5's 576 tokens)


def synthetic_inputs(loaded: LoadedModel, batch: int, text_len: int, system_len: int = 5, seed: int = 0,
                     grid: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
    """Left-padded input_ids/attention_mask [B, N] and the family's image inputs (random pixels) for one image per
    row of the family's fixed token grid, else `grid` (default DEFAULT_GRID)."""
    cfg = loaded.config
    g = torch.Generator().manual_seed(seed)
    rows, cols = loaded.arch.image_grid(loaded.processor) or tuple(grid or DEFAULT_GRID)
    n_vision = rows * cols
    tc = cfg.get_text_config()
    vocab = tc.vocab_size
    pad = tc.pad_token_id or 0
    specials = {int(loaded.image_token_id), int(pad)}
    lengths = [max(1, text_len - (i % 3) * max(1, text_len // 4)) for i in range(batch)]
    width = system_len + n_vision + max(lengths)
    ids = torch.full((batch, width), pad, dtype=torch.long)
    mask = torch.zeros(batch, width, dtype=torch.long)
    for row, t in enumerate(lengths):
        seq = torch.randint(0, vocab, (system_len + n_vision + t,), generator=g)
        for s in specials:
            seq[seq == s] = (s + 1) % vocab if (s + 1) % vocab not in specials else (s + 2) % vocab
        seq[system_len:system_len + n_vision] = int(loaded.image_token_id)
        ids[row, width - len(seq):] = seq
        mask[row, width - len(seq):] = 1
    ids = ids.to(loaded.device)
    images = loaded.arch.random_image_inputs(ids, (rows, cols), generator=g, dtype=loaded.dtype)
    return {"input_ids": ids, "attention_mask": mask.to(loaded.device), **images}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(loaded: LoadedModel, batch: int, text_len: int, repeats: int, reducer: str,
          grid: tuple[int, int] | None = None) -> dict[str, Any]:
    """Per-sample ms of plain SDPA, collector, and eager output_attentions forwards, and their ratios.

    The modes are timed round-robin (one run of each per round, after a warm-up round) so that load
    from other processes affects them alike; each figure is the median over the rounds.
    """
    model = loaded.model
    inputs = synthetic_inputs(loaded, batch, text_len, grid=grid)
    n_vision = int((inputs["input_ids"][0] == loaded.image_token_id).sum())
    impl = model.config._attn_implementation

    def plain() -> None:
        with torch.inference_mode():
            model(**inputs, use_cache=False, logits_to_keep=1)

    def collect() -> None:
        with AttentionCollector(loaded, reducer=reducer) as collector:
            with torch.inference_mode():
                model(**inputs, use_cache=False, logits_to_keep=1)
            collector.consume()

    def eager() -> None:
        model.set_attn_implementation("eager")
        try:
            with torch.inference_mode():
                model(**inputs, use_cache=False, logits_to_keep=1, output_attentions=True)
        finally:
            model.set_attn_implementation(impl)

    modes: dict[str, Callable[[], None]] = {"sdpa": plain, "collector": collect, "eager_output_attentions": eager}
    device = loaded.device
    times: dict[str, list[float]] = {name: [] for name in modes}
    for round_ in range(repeats + 1):
        for name, fn in modes.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            if round_ > 0:  # round 0 is the warm-up
                times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(ts) for name, ts in times.items()}
    tc = loaded.config.get_text_config()
    n = int(inputs["input_ids"].shape[1])
    n_text = text_len
    eager_bytes = loaded.num_layers * tc.num_attention_heads * n * n * torch.finfo(loaded.dtype).bits // 8
    rows_bytes = tc.num_attention_heads * n_text * n * 4  # float32 text rows of one layer, freed after its reduction
    return {
        "model": loaded.name, "device": str(device), "dtype": str(loaded.dtype).replace("torch.", ""),
        "num_layers": loaded.num_layers, "vision_layers": loaded.arch.vision_depth(loaded.config),
        "num_vision": n_vision, "seq_len": int(inputs["input_ids"].shape[1]),
        "batch_size": batch, "repeats": repeats, "reducer": reducer,
        "ms_per_sample": {name: round(1000 * t / batch, 3) for name, t in median.items()},
        "ratio_to_sdpa": {name: round(t / median["sdpa"], 3) for name, t in median.items() if name != "sdpa"},
        "attention_mib_per_sample": {"collector_rows_one_layer": round(rows_bytes / 2**20, 2),
                                     "eager_output_attentions_all_layers": round(eager_bytes / 2**20, 2)},
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse arguments, build the model from its preset, time the three modes, print JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="a configs/model preset name or a YAML path")
    parser.add_argument("--use-source", action="store_true", help="load the preset's checkpoint instead of random weights")
    parser.add_argument("--num-layers", type=int, default=None, help="truncate the language model to this many layers")
    parser.add_argument("--vision-layers", type=int, default=None, help="truncate the vision tower to this many layers")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--text-len", type=int, default=48, help="text tokens after the image (longest row)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--reducer", default="adaptinfer")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default=None, help="override the preset's dtype (e.g. float32 on CPU)")
    parser.add_argument("--image-grid", type=int, nargs=2, default=list(DEFAULT_GRID), metavar=("ROWS", "COLS"),
                        help="vision-token grid of the synthetic image where the family does not fix one (Qwen)")
    args = parser.parse_args(argv)
    path = Path(args.model) if args.model.endswith(".yaml") else CONFIGS / f"{args.model}.yaml"
    preset = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    preset["device"] = args.device
    if args.dtype:
        preset["dtype"] = args.dtype
    if args.use_source and preset.get("source"):
        loaded = load_from_config(preset)
    else:
        if not preset.get("arch"):
            raise SystemExit(f"preset {path} has no `arch`; pass --use-source to time its checkpoint")
        arch = preset["arch"]
        family = arch_class(arch.get("model_type", DEFAULT_FAMILY))
        if args.num_layers:
            arch["text_config"]["num_hidden_layers"] = args.num_layers
        if args.vision_layers:
            arch["vision_config"][family.vision_depth_key] = args.vision_layers
        processor = load_processor(preset["processor"]) if preset.get("processor") else None
        if processor is not None:
            arch = match_processor(arch, processor)
        dtype = preset.get("dtype", "auto")
        if resolve_device(args.device).type == "cpu" and dtype in ("float16", "fp16") and not args.dtype:
            dtype = "float32"  # half precision matmuls are slow or missing on CPU
        loaded = build_random_model(arch, dtype=dtype, device=args.device, seed=int(preset.get("seed", 0)),
                                    name=preset.get("name", path.stem), processor=processor)
    result = bench(loaded, args.batch_size, args.text_len, args.repeats, args.reducer, tuple(args.image_grid))
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
