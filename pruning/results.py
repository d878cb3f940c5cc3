"""The benchmark's results: one tidy CSV table (append, dedupe, retention), a markdown summary and trade-off plots.

Layout of a results directory (shared by every run and every Hydra multirun job that points at it)::

    results.csv          one row per (model, task, split, limit, setup_id, convention, method, budget, variant_id)
    results.csv.lock     advisory lock held while the table is rewritten (parallel jobs)
    config.yaml          the resolved config of the latest run
    configs/<id>.yaml    the resolved config of every run; rows name theirs in `config_id`
    summary.md           pivots per (model, task, split): method x budget accuracy / retention / latency / TFLOPs
    plots/*.png          metric vs budget, latency vs budget, accuracy vs TFLOPs

Rows are keyed by KEY_COLUMNS; writing a row whose key is already in the table replaces the old row. `setup_id`
and `variant_id` (pruning/benchmark.py) hash every setting that can change a number, so two variants of a method
(other positions, scorer options, schedule file, dtype, ...) never share a row; `variant` and `model_settings` say
the same in words. `retention` is recomputed on every write from the unpruned row of the same GROUP_COLUMNS.
A row with status `infeasible` holds no numbers and never counts as present (`has_row`): a later run recomputes it.

Summaries and plots compare methods at equal *processed* budget (`budget_processed`, the mean vision tokens each
decoder layer really processes, which is what a method costs); a run's `budget` column is the target in its own
`convention`, and `budget_paper` is kept beside for comparison with published tables. `budget_fraction` is the
processed budget as a fraction of each sample's vision tokens (mean over samples): the comparable figure when the
vision-token count follows the image size; `budget_unit` says what the `budget` column (the target) counts:
"tokens" (mean vision tokens per decoder layer) or "fraction" (of each image's vision tokens, for such models).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd

from vlm.errors import UserError
from vlm.parallel import atomic_write, locked

RESULTS_NAME = "results.csv"
SUMMARY_NAME = "summary.md"
PLOTS_DIR = "plots"
BASELINE_METHOD = "unpruned"
GROUP_COLUMNS: tuple[str, ...] = ("model", "task", "split", "limit", "setup_id")
KEY_COLUMNS: tuple[str, ...] = GROUP_COLUMNS + ("convention", "method", "budget", "variant_id")
# Leading columns, in this order; metric_* and any others follow.
COLUMNS: tuple[str, ...] = (
    "model", "task", "split", "limit", "setup_id", "convention", "method", "budget", "variant_id", "status",
    "variant", "scorer", "schedule", "positions", "budget_processed", "budget_paper", "budget_fraction", "budget_unit",
    "accuracy", "retention",
    "prefill_ms", "generate_ms", "tflops", "peak_mem_mb", "n_samples", "batch_size", "timing_batch",
    "vision_per_layer", "tokens_per_layer", "device", "execution", "model_settings", "config_id", "timestamp", "note",
)
# Two rows whose processed budgets differ by at most this many vision tokens per layer are ranked together.
EQUAL_COST_TOLERANCE = 1.0
STATUS_OK = "ok"
STATUS_INFEASIBLE = "infeasible"
RETENTION_TARGET = 0.95  # the summary names the methods that keep this share of the unpruned accuracy


class ResultsError(UserError, ValueError):
    """A results table or row that cannot be used; the message says what is wrong and what would be right."""


def key_value(value: Any) -> str:
    """Canonical string of a key cell, so that 64, 64.0, '64' and None/NaN/'' compare as they should."""
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        if value.is_integer():
            return str(int(value))
        return repr(round(value, 6))
    if isinstance(value, str):
        text = value.strip()
        try:
            number = float(text)
        except ValueError:
            return text
        return key_value(number) if text.lower() not in ("nan", "") else ""
    return str(value)


def row_key(row: Mapping[str, Any]) -> tuple[str, ...]:
    """The dedupe key of a row (KEY_COLUMNS as canonical strings)."""
    missing = [c for c in KEY_COLUMNS if c not in row]
    if missing:
        raise ResultsError(f"result row lacks key columns {missing}; every row needs {list(KEY_COLUMNS)}")
    return tuple(key_value(row[c]) for c in KEY_COLUMNS)


def read_table(results_dir: str | Path) -> pd.DataFrame:
    """The results table in `results_dir` (empty, with the leading columns, when there is none yet)."""
    path = Path(results_dir) / RESULTS_NAME
    if not path.exists():
        return pd.DataFrame(columns=list(COLUMNS))
    try:
        table = pd.read_csv(path, keep_default_na=True)
    except pd.errors.EmptyDataError:
        return pd.DataFrame(columns=list(COLUMNS))
    missing = [c for c in KEY_COLUMNS if c not in table.columns]
    if missing:
        raise ResultsError(f"{path} lacks the key columns {missing}; it is not a results table of this toolkit")
    return _with_columns(table)


def _with_columns(table: pd.DataFrame) -> pd.DataFrame:
    """The table with every leading column present (missing ones empty)."""
    missing = [c for c in COLUMNS if c not in table.columns]
    if missing:
        table = table.assign(**{c: float("nan") for c in missing})
    return table


def _ordered(table: pd.DataFrame) -> pd.DataFrame:
    lead = [c for c in COLUMNS if c in table.columns]
    metrics = sorted(c for c in table.columns if c.startswith("metric_"))
    rest = [c for c in table.columns if c not in lead and c not in metrics]
    return table[lead + metrics + rest]


def with_retention(table: pd.DataFrame) -> pd.DataFrame:
    """`retention` = accuracy / the unpruned accuracy of the same GROUP_COLUMNS; NaN without one."""
    table = table.copy()
    if table.empty:
        table["retention"] = pd.Series(dtype=float)
        return table
    keys = table[list(GROUP_COLUMNS)].map(key_value).apply(tuple, axis=1)
    accuracy = pd.to_numeric(table["accuracy"], errors="coerce")
    baseline: dict[tuple, float] = {}
    for k, method, acc in zip(keys, table["method"], accuracy):
        if method == BASELINE_METHOD and not math.isnan(acc):
            baseline[k] = acc
    retention = []
    for k, acc in zip(keys, accuracy):
        base = baseline.get(k)
        retention.append(acc / base if base not in (None, 0.0) and not math.isnan(acc) else float("nan"))
    table["retention"] = retention
    return table


def upsert_rows(results_dir: str | Path, rows: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """Add `rows` to the table, replacing rows with the same key; recompute retention; write atomically."""
    path = Path(results_dir) / RESULTS_NAME
    new = pd.DataFrame([dict(r) for r in rows])
    with locked(path):
        table = read_table(results_dir)
        if not new.empty:
            new_keys = {row_key(r) for r in rows}
            if not table.empty:
                old_keys = table[list(KEY_COLUMNS)].apply(lambda r: row_key(r.to_dict()), axis=1)
                table = table[[k not in new_keys for k in old_keys]]
            frames = [f for f in (table, new) if not f.empty]
            table = pd.concat(frames, ignore_index=True) if frames else new
        table = _ordered(with_retention(_with_columns(table)))
        atomic_write(path, lambda tmp: table.to_csv(tmp, index=False))
    return table


def has_row(table: pd.DataFrame, key: Mapping[str, Any]) -> bool:
    """True when the table holds a computed row with this key (KEY_COLUMNS); infeasible rows do not count."""
    if table.empty:
        return False
    wanted = row_key(key)
    keys = table[list(KEY_COLUMNS)].apply(lambda r: row_key(r.to_dict()), axis=1)
    computed = table["status"].astype(str) != STATUS_INFEASIBLE
    return bool(((keys == wanted) & computed).any())


def find_baseline(table: pd.DataFrame, group: Mapping[str, Any]) -> pd.Series | None:
    """The unpruned row for this group (GROUP_COLUMNS), or None."""
    if table.empty:
        return None
    wanted = tuple(key_value(group[c]) for c in GROUP_COLUMNS)
    for _, row in table[table["method"] == BASELINE_METHOD].iterrows():
        if tuple(key_value(row[c]) for c in GROUP_COLUMNS) == wanted and str(row.get("status")) == STATUS_OK:
            return row
    return None


# -- summary ----------------------------------------------------------------------------------------------------
def _fmt(value: Any, digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, (int, float)):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(frame: pd.DataFrame, digits: int = 3, index_name: str = "") -> str:
    """A pipe table of a (pivoted) frame; NaN shows as an em dash."""
    header = [index_name or (frame.index.name or "")] + [_fmt(c, 0) if isinstance(c, float) else str(c) for c in frame.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for idx, row in frame.iterrows():
        lines.append("| " + " | ".join([str(idx)] + [_fmt(v, digits) for v in row.tolist()]) + " |")
    return "\n".join(lines)


def _budget_label(budget: Any) -> str:
    try:
        value = float(budget)
    except (TypeError, ValueError):
        return str(budget)
    return str(int(value)) if value.is_integer() else f"{value:.1f}"


def labels(sub: pd.DataFrame) -> pd.Series:
    """Row labels that tell variants apart: the method name, plus `[variant]` when it differs from its config file."""
    variant = sub["variant"] if "variant" in sub.columns else pd.Series("", index=sub.index)
    variant = variant.map(lambda v: "" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v).strip())
    variant = variant.map(lambda v: " ".join(_short_setting(s) for s in v.split()))
    return pd.Series([f"{m} [{v}]" if v else str(m) for m, v in zip(sub["method"], variant)], index=sub.index)


def _short_setting(setting: str) -> str:
    """'schedule_path=/long/dir/run/schedule.yaml' -> 'schedule_path=.../run/schedule.yaml' (labels stay short)."""
    key, _, value = setting.partition("=")
    parts = value.split("/")
    return f"{key}=.../{'/'.join(parts[-2:])}" if len(parts) > 3 else setting


def pivot(sub: pd.DataFrame, value: str, budget: str = "budget") -> pd.DataFrame:
    """Label x budget pivot of one column (budgets descending, labels in first-seen order; see `labels`)."""
    sub = sub.copy()
    sub["_label"] = labels(sub)
    sub["_budget"] = pd.to_numeric(sub[budget], errors="coerce")
    sub[value] = pd.to_numeric(sub[value], errors="coerce")
    table = sub.pivot_table(index="_label", columns="_budget", values=value, aggfunc="first", dropna=False)
    order = [m for m in dict.fromkeys(sub["_label"]) if m in table.index]
    table = table.loc[order, sorted(table.columns, reverse=True)]
    table.columns = [_budget_label(c) for c in table.columns]
    table.index.name = None
    return table


def _heading(group: tuple[str, ...], sub: pd.DataFrame) -> str:
    model, task, split, limit, setup = group
    settings = sub["model_settings"].dropna().astype(str) if "model_settings" in sub.columns else pd.Series([], dtype=str)
    how = f"{settings.iloc[0]}; " if len(settings) else ""
    return f"## {task} ({split}, limit {limit or 'all'}) on {model} ({how}setup {setup or '?'})"


def summary_markdown(table: pd.DataFrame) -> str:
    """The markdown summary: per GROUP_COLUMNS the baseline, label x budget pivots and equal-cost rankings."""
    lines = ["# Benchmark summary", ""]
    if table.empty:
        return "\n".join(lines + ["(no results yet)", ""])
    table = table.copy()
    groups = table[list(GROUP_COLUMNS)].map(key_value).apply(tuple, axis=1)
    for group in dict.fromkeys(groups):
        sub = table[groups == group]
        lines += [_heading(group, sub), ""]
        base = sub[sub["method"] == BASELINE_METHOD]
        pruned = sub[(sub["method"] != BASELINE_METHOD)]
        fractions = _fraction_budgets(sub)
        if not base.empty:
            b = base.iloc[0]
            tokens = f"{int(float(b['budget']))} vision tokens per layer" if not fractions else \
                f"{_fmt(float(b['budget_processed']), 1)} vision tokens per layer (mean; each image its own count)"
            lines.append(
                f"Unpruned: accuracy {_fmt(float(b['accuracy']), 4)}, prefill {_fmt(float(b['prefill_ms']), 1)} ms, "
                f"{_fmt(float(b['tflops']), 4)} TFLOPs/sample, {tokens}."
            )
        else:
            lines.append("Unpruned: not in the table (retention cannot be computed).")
        if pruned.empty:
            lines.append("")
            continue
        for conv in sorted({key_value(c) for c in pruned["convention"]} - {""}):
            rows = pruned[pruned["convention"].map(key_value) == conv]
            unit = "fraction of each image's vision tokens (mean over decoder layers; the model's count follows " \
                "the image size)" if fractions else "mean vision tokens per decoder layer"
            lines += [
                "",
                f"Budget = {unit}, target in the **{conv}** convention (results.csv holds both conventions in "
                "budget_processed and budget_paper, in vision tokens, and budget_fraction). — = not run or infeasible.",
                "",
            ]
            if fractions:
                lines += ["### Processed budget (vision tokens each layer really processes, mean over samples)", "",
                          markdown_table(pivot(rows, "budget_processed"), 1, f"method \\ {conv} budget"), ""]
            lines += ["### Processed budget as a fraction of each sample's vision tokens (mean over samples)", "",
                      markdown_table(pivot(rows, "budget_fraction"), 3, f"method \\ {conv} budget"), ""]
            if conv != "processed" and not fractions:
                lines += [
                    f"Equal {conv}-convention budgets are not equal cost: the processed budget each run really had "
                    "is below; the rankings compare runs at equal processed budget.", "",
                    "### Processed budget (vision tokens each layer really processes, mean)", "",
                    markdown_table(pivot(rows, "budget_processed"), 1, f"method \\ {conv} budget"), "",
                ]
            for value, title, digits in (
                ("accuracy", "Accuracy", 4), ("retention", "Retention (accuracy / unpruned)", 3),
                ("prefill_ms", "Prefill latency (ms, median)", 1), ("tflops", "TFLOPs per sample (analytic)", 4),
            ):
                lines += [f"### {title}", "", markdown_table(pivot(rows, value), digits, f"method \\ {conv} budget"), ""]
        lines += ranking_lines(pruned)
        infeasible = pruned[pruned["status"] == STATUS_INFEASIBLE]
        if not infeasible.empty:
            lines += ["Infeasible (budget out of reach of the method's stage layers):", ""]
            for label, (_, row) in zip(labels(infeasible), infeasible.iterrows()):
                lines.append(f"- {label} at {_budget_label(row['budget'])} ({row['convention']}): {row.get('note', '')}")
            lines.append("")
    return "\n".join(lines)


def _fraction_budgets(rows: pd.DataFrame) -> bool:
    """Whether these rows' budgets are fractions of each image's vision tokens (budget_unit 'fraction')."""
    return "budget_unit" in rows.columns and bool((rows["budget_unit"].astype(str) == "fraction").any())


def equal_cost_groups(budgets: Sequence[float], tolerance: float = EQUAL_COST_TOLERANCE) -> list[list[int]]:
    """Indices of `budgets` grouped so that each group's budgets lie within `tolerance` of its largest, descending."""
    order = sorted((i for i, b in enumerate(budgets) if not math.isnan(b)), key=lambda i: -budgets[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and budgets[groups[-1][0]] - budgets[i] <= tolerance:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def ranking_lines(pruned: pd.DataFrame, target: float = RETENTION_TARGET) -> list[str]:
    """Markdown lines: the runs ranked by accuracy at equal processed budget (within EQUAL_COST_TOLERANCE tokens),
    and which keep `target` of the unpruned accuracy."""
    ok = pruned[pruned["status"] == STATUS_OK].copy()
    if ok.empty:
        return []
    ok["_label"] = labels(ok)
    ok["_processed"] = pd.to_numeric(ok["budget_processed"], errors="coerce")
    ok["accuracy"] = pd.to_numeric(ok["accuracy"], errors="coerce")
    ok["retention"] = pd.to_numeric(ok["retention"], errors="coerce")
    lines = ["### Ranking by accuracy at equal processed budget", "",
             "Runs whose processed budgets (mean vision tokens each decoder layer really processes) lie within "
             f"{EQUAL_COST_TOLERANCE:g} token of each other are ranked together; a run alone at its cost is listed alone.",
             ""]
    processed = ok["_processed"].tolist()
    for members in equal_cost_groups(processed):
        rows = ok.iloc[members].sort_values("accuracy", ascending=False, kind="stable")
        ranked = ", ".join(f"{m} {_fmt(a, 4)}" for m, a in zip(rows["_label"], rows["accuracy"]))
        keep = [m for m, r in zip(rows["_label"], rows["retention"]) if not math.isnan(r) and r >= target]
        low, high = rows["_processed"].min(), rows["_processed"].max()
        cost = _budget_label(round(rows["_processed"].median()))
        cost += "" if high - low < 0.05 else f" ({low:.1f}-{high:.1f})"
        lines.append(f"- processed budget {cost}: {ranked}; retention >= {target:.0%}: "
                     f"{', '.join(keep) if keep else 'none'}")
    return lines + [""]


def write_summary(results_dir: str | Path, table: pd.DataFrame | None = None) -> Path:
    """Write summary.md from the table in `results_dir`; returns its path."""
    table = read_table(results_dir) if table is None else table
    path = Path(results_dir) / SUMMARY_NAME
    text = summary_markdown(table)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))  # workers of a split run may write it at once
    return path


# -- plots ------------------------------------------------------------------------------------------------------
def _slug(*parts: Any) -> str:
    text = "_".join(key_value(p) or "all" for p in parts)
    return "".join(ch if ch.isalnum() or ch in "-." else "_" for ch in text)


def plot_tradeoffs(table: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    """Per group (GROUP_COLUMNS): accuracy and latency vs processed budget, accuracy vs TFLOPs; one line per label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if table.empty:
        return written
    table = table.copy()
    for col in ("budget", "budget_processed", "accuracy", "prefill_ms", "tflops"):
        table[col] = pd.to_numeric(table[col], errors="coerce")
    groups = table[list(GROUP_COLUMNS)].map(key_value).apply(tuple, axis=1)
    for group in dict.fromkeys(groups):
        sub = table[(groups == group) & (table["status"] == STATUS_OK)]
        if sub.empty:
            continue
        model, task, split, limit, setup = group
        base = sub[sub["method"] == BASELINE_METHOD]
        pruned = sub[sub["method"] != BASELINE_METHOD].assign(_label=lambda f: labels(f))
        xbudget = "processed budget (mean vision tokens each layer processes)"
        specs = (
            ("budget_processed", "accuracy", xbudget, "accuracy", "accuracy_vs_budget"),
            ("budget_processed", "prefill_ms", xbudget, "prefill latency (ms)", "latency_vs_budget"),
            ("tflops", "accuracy", "TFLOPs per sample (analytic prefill)", "accuracy", "accuracy_vs_tflops"),
        )
        for x, y, xlabel, ylabel, name in specs:
            fig, ax = plt.subplots(figsize=(6, 4))
            for method, rows in pruned.groupby(["_label", "convention"], sort=False):
                method = method[0] if pruned["convention"].nunique() < 2 else f"{method[0]} ({method[1]})"
                rows = rows.sort_values(x)
                ax.plot(rows[x], rows[y], marker="o", label=method)
            if not base.empty:
                if x == "budget_processed":
                    ax.axhline(float(base[y].iloc[0]), color="k", ls="--", lw=1, label="unpruned")
                else:
                    ax.scatter(base[x], base[y], color="k", marker="*", s=120, label="unpruned", zorder=3)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.set_title(f"{task} ({split}) on {model}", fontsize=10)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
            fig.tight_layout()
            path = out_dir / f"{_slug(model, task, split, limit, setup)}_{name}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    return written


__all__ = [
    "BASELINE_METHOD", "COLUMNS", "KEY_COLUMNS", "RESULTS_NAME", "ResultsError", "STATUS_INFEASIBLE", "STATUS_OK",
    "equal_cost_groups", "find_baseline", "has_row", "key_value", "labels", "markdown_table", "pivot",
    "plot_tradeoffs", "read_table", "row_key", "summary_markdown", "upsert_rows", "with_retention", "write_summary",
]
