"""Feed the command lines bad inputs and tabulate what a user sees: the message, the exit status, and whether
anything was written. Every row must be a clear one-line error, a non-zero exit and nothing written.

    python benchmarks/bad_inputs.py [--out benchmarks/results/bad_inputs.md] [--only SUBSTRING]

Each case runs as a user would run it (`python -m ...` in a scratch directory) on the demo model with
`data.limit=4`; the files it needs (broken schedules, a truncated checkpoint, NaN weights, ...) are made first.
Prints the markdown table and writes it to --out; exits 1 if any case did not fail cleanly.
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "vlm" / "assets" / "shapes_llava"
QUICK = ["data.limit=4", "timing.warmup=0", "timing.repeats=1", "plots=false", "progress=false"]


@dataclass
class Case:
    what: str
    argv: list[str]
    written: str  # a path (relative to the scratch dir) that must not exist afterwards


def make_files(root: Path) -> dict[str, Path]:
    """The broken inputs the cases point at."""
    files: dict[str, Path] = {}
    schedules = {
        "not_increasing": "stages:\n- {layer: 3, keep: 300}\n- {layer: 1, keep: 100}\n",
        "keep_too_large": "stages:\n- {layer: 0, keep: 600}\n",
        "negative_keep": "stages:\n- {layer: 0, keep: -5}\n",
        "fraction_above_1": "stages:\n- {layer: 0, keep: 1.5}\n",
        "layer_past_model": "stages:\n- {layer: 9, keep: 100}\n",
        "missing_key": "stages:\n- {layer: 0}\n",
        "wrong_type": "stages:\n- {layer: zero, keep: 100}\n",
        "unknown_key": "stages:\n- {layer: 0, keep: 100, drop: 1}\n",
        "yaml_syntax": "stages: [ {layer: 0, keep: 100\n",
        "empty": "",
        "other_model": "num_layers: 32\nstages:\n- {layer: 1, keep: 100}\n",
    }
    for name, text in schedules.items():
        path = root / "schedules" / f"{name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        files[name] = path
    files["not_a_model"] = root / "not_a_model"
    files["not_a_model"].mkdir()
    (files["not_a_model"] / "notes.txt").write_text("hello")
    truncated = root / "truncated_model"
    shutil.copytree(DEMO, truncated)
    weights = truncated / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    files["truncated"] = truncated
    files["nan_model"] = _nan_model(root / "nan_model")
    files["a_file"] = root / "a_file.txt"
    files["a_file"].write_text("not a directory")
    return files


def _nan_model(target: Path) -> Path:
    """The demo model with NaN final-norm weights (a corrupted checkpoint that still loads)."""
    import torch

    from vlm.models import load_model

    loaded = load_model(str(DEMO), device="cpu")
    with torch.no_grad():
        loaded.arch.final_norm.weight.fill_(float("nan"))
    loaded.model.save_pretrained(target)
    loaded.processor.save_pretrained(target)
    return target


def cases(f: dict[str, Path]) -> list[Case]:
    bench = ["python", "-m", "pruning.benchmark"]
    out: list[Case] = []

    def b(what: str, *args: str, written: str = "r") -> None:
        out.append(Case(what, bench + QUICK + ["results_dir=r"] + list(args), written))

    for name, what in [
        ("not_increasing", "schedule layers not increasing"), ("keep_too_large", "keep > tokens present"),
        ("negative_keep", "negative keep"), ("fraction_above_1", "keep fraction > 1"),
        ("layer_past_model", "stage layer past the model"), ("missing_key", "stage without keep"),
        ("wrong_type", "layer of the wrong type"), ("unknown_key", "unknown stage key"),
        ("yaml_syntax", "YAML syntax error"), ("empty", "empty schedule file"),
        ("other_model", "schedule made for a 32-layer model"),
    ]:
        b(what, "method=adaptinfer_derived", f"method.schedule_path={f[name]}", "budgets=[150]")
    b("schedule_path that does not exist", "method=adaptinfer_derived", "method.schedule_path=nope/schedule.yaml")
    b("schedule_path that is a directory", "method=adaptinfer_derived", f"method.schedule_path={f['not_a_model']}")
    b("derived method without schedule_path", "methods=[adaptinfer_derived]")
    b("model path that does not exist", "model.source=/no/such/model", "method=fastv", "budgets=[192]")
    b("directory that is not a model", f"model.source={f['not_a_model']}", "method=fastv", "budgets=[192]")
    b("truncated safetensors file", f"model.source={f['truncated']}", "method=fastv", "budgets=[192]")
    b("weights that give NaN logits", f"model.source={f['nan_model']}", "method=fastv", "budgets=[192]")
    b("budgets=abc", "method=fastv", "budgets=abc")
    b("budgets=[]", "method=fastv", "budgets=[]")
    b("results_dir is a file", "method=fastv", "budgets=[192]", f"results_dir={f['a_file']}", written="r")
    b("data.path on the shapes task", "method=fastv", "budgets=[192]", "+data.path=/data/shapes")
    b("unknown scorer option", "method=adaptinfer", "budgets=[192]", "+method.scorer_options.text_weight_blnd=0")
    b("invalid positions", "method=adaptinfer", "budgets=[192]", "method.positions=sideways")
    b("unknown convention", "method=fastv", "budgets=[192]", "convention=tokens")
    b("unknown dtype", "method=fastv", "budgets=[192]", "model.dtype=float8")
    b("batch_size=0", "method=fastv", "budgets=[192]", "batch_size=0")
    b("timing.repeats=0", "method=fastv", "budgets=[192]", "timing.repeats=0")
    b("unknown split", "method=fastv", "budgets=[192]", "data.split=validation")
    b("unknown method", "method=nope", "budgets=[192]")
    derive = ["python", "-m", "analysis.derive"]
    out += [
        Case("derive: budget above the vision tokens", derive + ["input=calib", "budget=1000", "output=d"], "d"),
        Case("derive: budget=abc", derive + ["input=calib", "budget=abc", "output=d"], "d"),
        Case("derive: input that does not exist", derive + ["input=no_records", "budget=192", "output=d"], "d"),
        Case("derive: input missing", derive + ["budget=192", "output=d"], "d"),
        Case("collect: unknown reducer", ["python", "-m", "analysis.collect", "reducer=median", "output=c"], "c"),
        Case("collect: n_samples=0", ["python", "-m", "analysis.collect", "n_samples=0", "output=c"], "c"),
    ]
    return out


def run_case(case: Case, scratch: Path) -> dict[str, str]:
    work = scratch / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    if (scratch / "calib").exists():
        shutil.copytree(scratch / "calib", work / "calib")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, *case.argv[1:]], cwd=work, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HYDRA_FULL_ERROR": ""})
    lines = [l for l in proc.stderr.splitlines() if l.strip() and "Loading weights" not in l]
    hydra_hint = "Set the environment variable HYDRA_FULL_ERROR"
    message = next((l for l in lines if l.startswith("error:")), next((l for l in lines if hydra_hint not in l), ""))
    written = (work / case.written).exists()
    clean = proc.returncode != 0 and "Traceback" not in proc.stderr and not written
    return {"what": case.what, "command": shlex.join(case.argv).replace(str(scratch) + "/", ""),
            "message": message.strip(), "exit": str(proc.returncode), "written": "yes" if written else "nothing",
            "clean": "yes" if clean else "NO", "seconds": f"{time.perf_counter() - t0:.1f}"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "bad_inputs.md")
    ap.add_argument("--only", default="", help="run only the cases whose description contains this text")
    args = ap.parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix="bad_inputs_"))
    files = make_files(scratch)
    subprocess.run([sys.executable, "-m", "analysis.collect", "n_samples=16", f"output={scratch / 'calib'}"],
                   cwd=scratch, capture_output=True, check=True, timeout=600)
    rows = [run_case(c, scratch) for c in cases(files) if args.only in c.what]
    head = "| # | bad input | command | message | exit | written | clean |"
    lines = [head, "|---|---|---|---|---|---|---|"]
    for i, r in enumerate(rows, 1):
        cells = [str(i), r["what"], f"`{r['command']}`", r["message"].replace("|", "\\|"), r["exit"], r["written"],
                 r["clean"]]
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    if not args.only:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            "# Bad inputs and what a user sees\n\n"
            f"`python benchmarks/bad_inputs.py` ({len(rows)} cases; scratch files in a temporary directory, the demo "
            "model, `data.limit=4`). clean = non-zero exit, no traceback, nothing written.\n\n" + table + "\n")
    shutil.rmtree(scratch, ignore_errors=True)
    return 0 if all(r["clean"] == "yes" for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
