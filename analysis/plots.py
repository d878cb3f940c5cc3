"""Figures of the inflection analysis, written as PNG files.

Each function takes plain arrays (numpy or torch) and an output path and returns the path. Figures are
built on `matplotlib.figure.Figure` with the Agg canvas directly, never through pyplot, so importing
or calling this module changes no global backend state (notebooks keep their inline backend; show a
written file with `IPython.display.Image(path)`).
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from vlm.errors import UserError

PathLike = Union[str, os.PathLike]
DPI = 120


class PlotError(UserError, ValueError):
    """Arrays of the wrong shape or an impossible figure request."""


def _array(name: str, values: Any, ndim: int) -> np.ndarray:
    """A float64 numpy array of `ndim` dimensions from an array or tensor."""
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != ndim:
        raise PlotError(f"{name} must have {ndim} dimensions, got shape {arr.shape}")
    return arr


def _save(fig: Figure, path: PathLike) -> Path:
    """Write the figure as PNG, creating the parent directory."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(out, dpi=DPI, format="png")
    return out


def _norm(values: np.ndarray, log: bool) -> Optional[LogNorm]:
    """A log colour scale over the positive values, or None for linear."""
    if not log:
        return None
    positive = values[values > 0]
    if positive.size == 0:
        return None
    return LogNorm(vmin=positive.min(), vmax=positive.max())


def grid_side(num_vision: int) -> int:
    """Side of the square patch grid of `num_vision` tokens (24 for 576); PlotError if not square."""
    side = math.isqrt(num_vision)
    if side * side != num_vision:
        raise PlotError(f"{num_vision} vision tokens do not form a square grid; grids need V = side**2 (e.g. 576)")
    return side


def t2v_heatmap(mean_t2v: Any, path: PathLike, title: str = "mean text-to-vision attention", log: bool = False) -> Path:
    """Heatmap of attention per layer (rows) and vision token (columns). mean_t2v [L, V]"""
    a = _array("mean_t2v", mean_t2v, 2)
    fig = Figure(figsize=(10, 4.5))
    ax = fig.add_subplot()
    im = ax.imshow(a, aspect="auto", origin="lower", interpolation="nearest", cmap="viridis", norm=_norm(a, log))
    ax.set_xlabel("vision token index")
    ax.set_ylabel("decoder layer")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="attention" + (" (log)" if log else ""))
    fig.tight_layout()
    return _save(fig, path)


def t2v_grids(
    mean_t2v: Any,
    layers: Sequence[int],
    path: PathLike,
    title: str = "mean text-to-vision attention on the patch grid",
    log: bool = False,
) -> Path:
    """One sqrt(V) x sqrt(V) image of the attention per chosen layer (24x24 for 576 tokens). mean_t2v [L, V]"""
    a = _array("mean_t2v", mean_t2v, 2)
    num_layers, num_vision = a.shape
    side = grid_side(num_vision)
    layers = [int(layer) for layer in layers]
    if not layers:
        raise PlotError("layers is empty; name at least one layer to draw")
    bad = [layer for layer in layers if not 0 <= layer < num_layers]
    if bad:
        raise PlotError(f"layers {bad} are outside 0..{num_layers - 1}")
    cols = min(4, len(layers))
    rows = math.ceil(len(layers) / cols)
    fig = Figure(figsize=(3.2 * cols, 3.0 * rows + 0.4))
    for i, layer in enumerate(layers):
        ax = fig.add_subplot(rows, cols, i + 1)
        img = a[layer].reshape(side, side)  # row-major patch order, as the vision tower emits it
        im = ax.imshow(img, cmap="magma", interpolation="nearest", norm=_norm(img, log))
        ax.set_title(f"layer {layer}")
        ax.set_xticks([])
        ax.set_yticks([])
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def inflection_histogram(
    histogram: Any,
    density: Any,
    path: PathLike,
    stage_layers: Sequence[int] = (),
    regions: Sequence[tuple[int, int]] = (),
    title: str = "inflection layers",
) -> Path:
    """Bars of shift-layer counts, the smoothed density, dense regions shaded, stage layers marked. [L], [L]"""
    h = _array("histogram", histogram, 1)
    d = _array("density", density, 1)
    if h.shape != d.shape:
        raise PlotError(f"histogram {h.shape} and density {d.shape} must have the same length L")
    layers = np.arange(h.size)
    fig = Figure(figsize=(9, 4))
    ax = fig.add_subplot()
    ax.bar(layers, h, color="#9ab", label="tokens with this shift layer")
    ax.set_xlabel("decoder layer (shift layer = last layer before the change)")
    ax.set_ylabel("count")
    for i, (start, end) in enumerate(regions):
        ax.axvspan(start - 0.5, end + 0.5, color="orange", alpha=0.18, label="dense region" if i == 0 else None)
    for i, layer in enumerate(stage_layers):
        ax.axvline(layer, color="crimson", ls="--", lw=1.5, label="pruning stage" if i == 0 else None)
    ax2 = ax.twinx()
    ax2.plot(layers, d, color="k", lw=1.5, label="smoothed density")
    ax2.set_ylabel("density")
    ax2.set_ylim(bottom=0)
    handles = ax.get_legend_handles_labels()
    handles2 = ax2.get_legend_handles_labels()
    ax.legend(handles[0] + handles2[0], handles[1] + handles2[1], loc="upper right", fontsize=8)
    ax.set_xlim(-0.5, h.size - 0.5)
    ax.set_title(title)
    fig.tight_layout()
    return _save(fig, path)


def mean_trajectories(
    trajectories: Any,
    path: PathLike,
    stage_layers: Sequence[int] = (),
    title: str = "mean trajectory of the selected tokens",
    ylabel: str = "cumulative attention",
) -> Path:
    """Per-sample mean trajectories (thin) and their mean (bold). trajectories [N, L]"""
    t = _array("trajectories", trajectories, 2)
    layers = np.arange(t.shape[1])
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    shown = t[: min(len(t), 200)]  # at most 200 thin lines
    for row in shown:
        ax.plot(layers, row, color="#789", alpha=0.25, lw=0.7)
    ax.plot(layers, t.mean(axis=0), color="k", lw=2.2, label=f"mean over {len(t)} samples")
    for i, layer in enumerate(stage_layers):
        ax.axvline(layer, color="crimson", ls="--", lw=1.2, label="pruning stage" if i == 0 else None)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


__all__ = [
    "PlotError",
    "grid_side",
    "inflection_histogram",
    "mean_trajectories",
    "t2v_grids",
    "t2v_heatmap",
]


def search_front(front: Sequence[dict], candidates: Sequence[dict], path: PathLike,
                 objective_name: str = "objective") -> Path:
    """Schedule-search figure: best objective per budget (left) and every scored candidate (right).

    front: [{"budget", "objective"}]; candidates: [{"budget_achieved", "objective", "n_stages"}].
    """
    fig = Figure(figsize=(10, 4))
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    pts = sorted((float(f["budget"]), float(f["objective"])) for f in front)
    if pts:
        left.plot([p[0] for p in pts], [p[1] for p in pts], "o-")
    left.set_xlabel("budget (mean vision tokens per layer)")
    left.set_ylabel(f"best {objective_name}")
    left.set_title("searched schedules: objective vs budget")
    stages = sorted({int(c["n_stages"]) for c in candidates})
    for n in stages:
        sel = [c for c in candidates if int(c["n_stages"]) == n]
        right.scatter([c["budget_achieved"] for c in sel], [c["objective"] for c in sel], s=12, alpha=0.7,
                      label=f"{n} stage{'s' if n > 1 else ''}")
    if stages:
        right.legend(fontsize=8)
    right.set_xlabel("budget")
    right.set_ylabel(objective_name)
    right.set_title(f"all {len(candidates)} scored candidates")
    fig.tight_layout()
    return _save(fig, path)
