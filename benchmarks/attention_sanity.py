"""Attention sanity check of the demo model: per layer, the share of the last prompt token's vision attention
that falls on the patches of the object(s) the question names, against the share those patches would get
under uniform attention. Writes a markdown report.

    python benchmarks/attention_sanity.py --model vlm/assets/shapes_llava --n-per-family 60 \
        --out benchmarks/results/attention_sanity.md
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlm.shapes.evaluate import answers_from_logits, load_local, prompt_inputs  # noqa: E402
from vlm.shapes.world import make_scene, patch_coverage  # noqa: E402
from vlm.tasks import build_task  # noqa: E402

FAMILIES_NAMING_OBJECTS = ("color", "shape", "exist", "count", "relative")


def named_patch_mask(seed: int, objects: list[int]) -> np.ndarray:
    """Bool [576]: patches touched by any of the named objects of scene `seed`."""
    cov = patch_coverage(make_scene(seed))  # [n_objects, 24, 24]
    return (cov[objects] > 0).any(axis=0).reshape(-1)


@torch.no_grad()
def attention_shares(model_dir: Path, n_per_family: int, batch: int) -> dict:
    """Per family and layer: mean share of the last token's vision attention on the named objects' patches."""
    model, processor = load_local(model_dir, attn_implementation="eager")
    task = build_task("shapes", split="calibration", n_per_family=n_per_family)
    # questions that name at least one object present in the image (exist-"no" and zero counts name none)
    samples = [s for s in task.samples() if s.meta["objects"] and s.meta["family"] in FAMILIES_NAMING_OBJECTS]
    n_layers = model.config.text_config.num_hidden_layers
    shares: dict[str, list[np.ndarray]] = {}
    uniform: dict[str, list[float]] = {}
    correct: dict[str, list[bool]] = {}
    for i in range(0, len(samples), batch):
        chunk = samples[i:i + batch]
        inputs = prompt_inputs(processor, chunk)
        out = model(**inputs, output_attentions=True)
        preds = answers_from_logits(processor, out.logits[:, -1])
        is_img = inputs["input_ids"] == model.config.image_token_id  # [B, T]
        cols = is_img.nonzero()[:, 1].view(len(chunk), -1)  # [B, 576]
        att = torch.stack([a[:, :, -1, :].mean(1) for a in out.attentions], 1)  # [B, L, T]
        vis = att.gather(2, cols[:, None, :].expand(-1, n_layers, -1))  # [B, L, 576]
        for b, s in enumerate(chunk):
            m = torch.from_numpy(named_patch_mask(s.meta["seed"], s.meta["objects"]))
            share = (vis[b][:, m].sum(-1) / vis[b].sum(-1)).numpy()  # [L]
            fam = s.meta["family"]
            shares.setdefault(fam, []).append(share)
            uniform.setdefault(fam, []).append(float(m.float().mean()))
            correct.setdefault(fam, []).append(preds[b].strip() == s.answers[0])
        vision_mass = vis.sum(-1).mean(0)  # [L]
        shares.setdefault("_vision_mass", []).append(vision_mass.numpy())
    return {"shares": shares, "uniform": uniform, "correct": correct, "n": len(samples), "n_layers": n_layers}


def report(res: dict, model_dir: Path, seconds: float) -> str:
    """Markdown: one row per layer, one column per family, plus the uniform-attention baseline."""
    fams = [f for f in FAMILIES_NAMING_OBJECTS if f in res["shares"]]
    mean = {f: np.mean(res["shares"][f], axis=0) for f in fams}
    mass = np.mean(res["shares"]["_vision_mass"], axis=0)
    all_rows = np.concatenate([np.stack(res["shares"][f]) for f in fams])
    all_uniform = np.mean([u for f in fams for u in res["uniform"][f]])
    lines = [
        "# Attention sanity: where the last prompt token looks in the image",
        "",
        f"Model `{model_dir}`, calibration split, {res['n']} questions naming at least one object present "
        "(counts: the counted objects; relative: both objects; exist: only questions answered yes).",
        "Each cell: mean over questions of (last prompt token's head-mean attention on the patches touched by the "
        "named object(s)) / (its attention on all 576 vision tokens), in %. "
        "`uniform` is what uniform attention over the vision tokens would give (the patches' share of the image). "
        "`vision mass` is the share of the last token's total attention that goes to vision tokens at all.",
        "",
        "| layer | all | " + " | ".join(fams) + " | vision mass |",
        "|---|---|" + "---|" * len(fams) + "---|",
    ]
    for layer in range(res["n_layers"]):
        lines.append(f"| {layer} | {100 * all_rows[:, layer].mean():.1f} | "
                     + " | ".join(f"{100 * mean[f][layer]:.1f}" for f in fams) + f" | {100 * mass[layer]:.1f} |")
    lines.append(f"| uniform | {100 * all_uniform:.1f} | "
                 + " | ".join(f"{100 * np.mean(res['uniform'][f]):.1f}" for f in fams) + " | |")
    acc = " ".join(f"{f} {100 * np.mean(res['correct'][f]):.0f}%" for f in fams)
    lines += ["", f"Accuracy on these questions: {acc}. Run time {seconds:.0f} s on CPU.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Command line: compute the shares and write the markdown report."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=Path("vlm/assets/shapes_llava"))
    ap.add_argument("--n-per-family", type=int, default=60)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/attention_sanity.md"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    res = attention_shares(args.model, args.n_per_family, args.batch)
    text = report(res, args.model, time.time() - t0)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
