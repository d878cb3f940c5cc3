"""Evaluate the demo model on the shapes test split: unpruned accuracy per family and an offline pruning check.

The pruning check (deliberately independent of `pruning.engine`, so it also cross-checks it): after layer `layer`, keep
`keep` of the 576 vision tokens, chosen either by the last prompt token's head-mean attention at that layer
or at random. Dropping is emulated exactly for the text tokens: forward pre-hooks on the decoder layers
after `layer` mask the dropped vision columns out of their attention mask, so no later layer lets any
token read a dropped vision token. Attention weights come from a forward with eager attention and
`output_attentions`, used only for this check.

    python -m vlm.shapes.evaluate --model vlm/assets/shapes_llava --n-per-family 200 --out benchmarks/results/x.json
"""
from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import nn
from transformers import AutoProcessor, LlavaForConditionalGeneration

from vlm.models import ModelConfigError, resolve_device
from vlm.shapes.world import RELATIONS, WorldOptions
from vlm.tasks.base import VQASample, build_task
from vlm.tasks.metrics import exact_match


def load_local(model_dir: str | Path, attn_implementation: str = "sdpa") -> tuple[LlavaForConditionalGeneration, object]:
    """Model (eval mode, fp32) and processor from a save_pretrained directory, offline."""
    model = LlavaForConditionalGeneration.from_pretrained(model_dir, attn_implementation=attn_implementation,
                                                          local_files_only=True).eval()
    processor = AutoProcessor.from_pretrained(model_dir, local_files_only=True)
    return model, processor


def prompt_inputs(processor, samples: Sequence[VQASample]) -> dict[str, torch.Tensor]:
    """Left-padded LLaVA-1.5 inputs for a batch: input_ids / attention_mask [B, T], pixel_values [B, 3, 336, 336]."""
    texts = [f"USER: <image>\n{s.prompt} ASSISTANT:" for s in samples]
    return dict(processor(text=texts, images=[s.image for s in samples], padding=True, return_tensors="pt"))


def answers_from_logits(processor, logits: torch.Tensor) -> list[str]:
    """Greedy first answer word from the last position's logits [B, vocab] (answers are one word)."""
    return processor.tokenizer.batch_decode(logits.argmax(-1)[:, None].cpu(), skip_special_tokens=True)


def _vision_columns(input_ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """Positions of the vision tokens per row: [B, V] (every row holds one image of V tokens)."""
    is_img = input_ids == image_token_id
    counts = is_img.sum(-1)
    if not bool((counts == counts[0]).all()):
        raise ValueError(f"rows hold different numbers of image tokens {counts.tolist()}; expected one image per row")
    return is_img.nonzero()[:, 1].view(input_ids.shape[0], -1)


@contextlib.contextmanager
def drop_vision_after(model: LlavaForConditionalGeneration, layer: int, dropped_cols: torch.Tensor) -> Iterator[None]:
    """Hide `dropped_cols` [B, D] (sequence positions) from every decoder layer after `layer`; hooks always removed."""
    layers = model.model.language_model.layers
    handles = []

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        hidden = args[0] if args else kwargs["hidden_states"]  # [B, T, D]
        b, t = hidden.shape[:2]
        mask = kwargs.get("attention_mask")
        if mask is None:  # no padding and SDPA: the causal part is implicit, so build it here
            mask = torch.full((t, t), torch.finfo(hidden.dtype).min, dtype=hidden.dtype, device=hidden.device).triu(1)
            mask = mask[None, None].expand(b, 1, t, t)
        mask = mask.clone()  # [B, 1, T, T]
        rows = torch.arange(b, device=dropped_cols.device)[:, None].expand_as(dropped_cols)
        if mask.dtype == torch.bool:
            mask[rows, :, :, dropped_cols] = False
        else:
            mask[rows, :, :, dropped_cols] = torch.finfo(mask.dtype).min
        kwargs["attention_mask"] = mask
        return args, kwargs

    try:
        for i in range(layer + 1, len(layers)):
            handles.append(layers[i].register_forward_pre_hook(hook, with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def vision_attention_of_last_token(model: LlavaForConditionalGeneration, inputs: dict[str, torch.Tensor],
                                   layers: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Head-mean attention of the last prompt token to each vision token at `layers`: [B, len(layers), V].

    Needs a model loaded with eager attention (output_attentions). Returns (attention, vision columns [B, V]).
    """
    out = model(**inputs, output_attentions=True)
    cols = _vision_columns(inputs["input_ids"], model.config.image_token_id)  # [B, V]
    rows = []
    for l in layers:
        att = out.attentions[l][:, :, -1, :].mean(1)  # [B, T]
        rows.append(att.gather(1, cols))  # [B, V]
    return torch.stack(rows, 1), cols


@torch.no_grad()
def pruning_check(model_eager: LlavaForConditionalGeneration, processor, samples: Sequence[VQASample],
                  layer: int = 2, keep: int = 64, random_seeds: Sequence[int] = (0, 1, 2), batch: int = 16,
                  log_every: int = 0) -> dict[str, list[str]]:
    """Predictions with all vision tokens, with the top-`keep` by attention, and with `keep` random ones per seed."""
    preds: dict[str, list[str]] = {"unpruned": [], "attention": []} | {f"random/{s}": [] for s in random_seeds}
    gens = {s: torch.Generator().manual_seed(s) for s in random_seeds}
    for i in range(0, len(samples), batch):
        chunk = samples[i:i + batch]
        inputs = {k: v.to(model_eager.device) for k, v in prompt_inputs(processor, chunk).items()}
        out = model_eager(**inputs, output_attentions=True)
        preds["unpruned"] += answers_from_logits(processor, out.logits[:, -1])
        cols = _vision_columns(inputs["input_ids"], model_eager.config.image_token_id)  # [B, V]
        score = out.attentions[layer][:, :, -1, :].mean(1).gather(1, cols)  # [B, V]
        v = cols.shape[1]
        choices = {"attention": score.argsort(-1, descending=True)[:, keep:]}
        for s in random_seeds:
            perm = torch.stack([torch.randperm(v, generator=gens[s]) for _ in range(len(chunk))])
            choices[f"random/{s}"] = perm[:, keep:].to(cols.device)
        for name, drop_idx in choices.items():
            with drop_vision_after(model_eager, layer, cols.gather(1, drop_idx)):
                logits = model_eager(**inputs).logits[:, -1]
            preds[name] += answers_from_logits(processor, logits)
        if log_every and (i // batch + 1) % log_every == 0:
            print(f"[check] {i + len(chunk)}/{len(samples)}", flush=True)
    return preds


@torch.no_grad()
def single_prompt_forward_ms(model_dir: str | Path, sample: VQASample, repeats: int = 20) -> float:
    """Median wall time (ms) of one full forward (vision tower + projector + language model) of one prompt, SDPA."""
    model, processor = load_local(model_dir, attn_implementation="sdpa")
    inputs = prompt_inputs(processor, [sample])
    model(**inputs)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(**inputs)
        times.append(1000 * (time.perf_counter() - t0))
    return float(np.median(times))


def accuracy_table(preds: Sequence[str], samples: Sequence[VQASample]) -> dict[str, float]:
    """Exact match overall and per family (fractions)."""
    hits = np.array([exact_match(p, s.answers) for p, s in zip(preds, samples)])
    fams = np.array([s.meta["family"] for s in samples])
    return {"overall": float(hits.mean())} | {f: float(hits[fams == f].mean()) for f in sorted(set(fams))}


def relative_split(preds: Sequence[str], samples: Sequence[VQASample]) -> dict[str, dict[str, float]]:
    """Accuracy and count of the relative family by axis: "left or right of" and "above or below" questions."""
    hits: dict[str, list[bool]] = {}
    for p, s in zip(preds, samples):
        if s.meta["family"] == "relative":
            kind = next((r for r in RELATIONS if f" {r} " in s.question), "other")
            hits.setdefault(kind, []).append(exact_match(p, s.answers))
    return {k: {"accuracy": float(np.mean(hits[k])), "n": len(hits[k])} for k in sorted(hits)}


def main(argv: list[str] | None = None) -> None:
    """Command line: unpruned accuracy and the pruning check on the test split, as JSON and markdown."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=Path("vlm/assets/shapes_llava"))
    ap.add_argument("--split", default="test")
    ap.add_argument("--n-per-family", type=int, default=200)
    ap.add_argument("--min-objects", type=int, default=None, help="world option (default: the full world)")
    ap.add_argument("--max-objects", type=int, default=None, help="world option (default: the full world)")
    ap.add_argument("--layer", type=int, default=2)
    ap.add_argument("--keep", type=int, default=64)
    ap.add_argument("--random-seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="'cpu', 'cuda' or 'auto'; the one-prompt forward time is taken "
                                                    "on the CPU only (it is the CPU target of the demo)")
    ap.add_argument("--out", type=Path, default=None, help="JSON file for the numbers (markdown beside it)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    task = build_task("shapes", split=args.split, n_per_family=args.n_per_family, min_objects=args.min_objects,
                      max_objects=args.max_objects)
    samples = list(task.samples())
    try:
        device = resolve_device(args.device)
    except ModelConfigError as err:
        raise SystemExit(f"--device: {err}") from err
    model, processor = load_local(args.model, attn_implementation="eager")
    model.to(device)
    t0 = time.time()
    preds = pruning_check(model, processor, samples, args.layer, args.keep, args.random_seeds, args.batch,
                          log_every=10)
    tables = {name: accuracy_table(p, samples) for name, p in preds.items()}
    rand = [tables[f"random/{s}"]["overall"] for s in args.random_seeds]
    summary = {
        "model": str(args.model), "split": args.split, "min_objects": args.min_objects,
        "max_objects": args.max_objects, "n_questions": len(samples), "layer": args.layer,
        "keep": args.keep, "random_seeds": args.random_seeds, "tables": tables,
        "relative_split": {name: relative_split(p, samples) for name, p in preds.items()},
        "attention_retention": tables["attention"]["overall"] / tables["unpruned"]["overall"],
        "random_mean": float(np.mean(rand)), "random_std": float(np.std(rand)),
        "random_drop_points": 100 * (tables["unpruned"]["overall"] - float(np.mean(rand))),
        "seconds": time.time() - t0, "device": str(device), "threads": args.threads,
    }
    if device.type == "cpu":
        summary["forward_ms_one_prompt"] = single_prompt_forward_ms(args.model, samples[0])
    print(json.dumps(summary, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=1) + "\n")
        args.out.with_suffix(".md").write_text(markdown(summary))


def markdown(summary: dict) -> str:
    """The accuracy table (rows: unpruned, attention top-k, each random draw; columns: families) in markdown."""
    tables = summary["tables"]
    fams = [k for k in tables["unpruned"] if k != "overall"]
    full = WorldOptions()
    lo, hi = summary.get("min_objects") or full.min_objects, summary.get("max_objects") or full.max_objects
    world = (f"full world ({lo}-{hi} objects)" if summary.get("min_objects") is None
             and summary.get("max_objects") is None else f"objects {lo}-{hi}")
    lines = [f"# Shapes demo model: accuracy and pruning check ({summary['split']} split, {world}, "
             f"{summary['n_questions']} questions)", "", f"Model `{summary['model']}`.", "",
             f"Keep {summary['keep']} of 576 vision tokens after layer {summary['layer']}: by the last prompt token's "
             "head-mean attention at that layer, or at random (one row per seed). Exact match, %.", "",
             "| selection | overall | " + " | ".join(fams) + " |", "|---|---|" + "---|" * len(fams)]
    for name, t in tables.items():
        lines.append(f"| {name} | {100 * t['overall']:.1f} | " + " | ".join(f"{100 * t[f]:.1f}" for f in fams) + " |")
    lines += ["", f"Attention top-{summary['keep']} keeps {100 * summary['attention_retention']:.1f}% of the unpruned "
              f"accuracy; random-{summary['keep']} loses {summary['random_drop_points']:.1f} points "
              f"(mean of {len(summary['random_seeds'])} draws, std {100 * summary['random_std']:.1f}).", ""]
    split = summary.get("relative_split", {})
    if split:
        first = next(iter(split.values()))  # every selection answered the same questions
        lines += ["Relative family by axis (\"Is the X left or right of the Y?\", \"Is the X above or below the Y?\"), "
                  "%:", "",
                  "| selection | " + " | ".join(f"{k} (n={v['n']})" for k, v in first.items()) + " |",
                  "|---|" + "---|" * len(first)]
        for name, v in split.items():
            lines.append(f"| {name} | " + " | ".join(f"{100 * v[k]['accuracy']:.1f}" for k in first) + " |")
        lines.append("")
    if "forward_ms_one_prompt" in summary:
        lines += [f"One prompt's full forward (SDPA, fp32, {summary.get('threads', '?')} CPU threads): "
                  f"{summary['forward_ms_one_prompt']:.1f} ms (median of 20).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
