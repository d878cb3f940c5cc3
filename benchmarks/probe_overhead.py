"""Forward time with the attention probe on 3 layers vs none (tiny preset, 576 vision tokens), as a ratio.

    python benchmarks/probe_overhead.py --repeats 30 --out benchmarks/results/probe_overhead_cpu.md
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from prefill_latency import build, synthetic_inputs  # noqa: E402
from vlm.layout import TokenLayout  # noqa: E402
from vlm.probe import AttentionProbe  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 3, 5])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    loaded = build(args.model, torch.device("cpu"))
    lines = [f"# Attention probe overhead ({args.model}, CPU, {torch.get_num_threads()} threads)", "",
             f"Command: `python {' '.join(sys.argv)}`  ",
             f"Probed layers {args.layers}, query rows = the text tokens; full model forward (vision tower included), "
             "median of interleaved repeats after warm-up.", "",
             "| batch | plain ms | probed ms | ratio |", "|---|---|---|---|"]
    for batch in args.batch:
        inputs = synthetic_inputs(loaded, batch, text_len=40, system_len=35)
        layout = TokenLayout.from_batch(inputs["input_ids"], inputs["attention_mask"], loaded.image_token_id)
        plain, probed = [], []
        with torch.no_grad():
            for step in range(args.warmup + args.repeats):
                t0 = time.perf_counter()
                loaded.model(**inputs)
                t1 = time.perf_counter()
                with AttentionProbe(loaded.model, layers=args.layers, rows=layout.text_index, row_mask=layout.text_mask):
                    loaded.model(**inputs)
                t2 = time.perf_counter()
                if step >= args.warmup:
                    plain.append((t1 - t0) * 1e3)
                    probed.append((t2 - t1) * 1e3)
        a, b = statistics.median(plain), statistics.median(probed)
        lines.append(f"| {batch} | {a:.1f} | {b:.1f} | {b / a:.3f} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
