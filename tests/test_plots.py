"""analysis.plots: each figure is written as a non-blank PNG; bad shapes raise PlotError; no pyplot state."""
from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.image as mpimg
import numpy as np
import pytest
import torch

from analysis import plots


def check_png(path: Path) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert img[..., :3].std() > 0.01  # something was drawn


@pytest.fixture
def mean_t2v() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.random((32, 576)) * np.linspace(0.1, 1.0, 32)[:, None]  # [L, V]


def test_every_figure(tmp_path: Path, mean_t2v: np.ndarray) -> None:
    backend = matplotlib.get_backend()
    hist = np.zeros(32)
    hist[[8, 20]] = [40, 60]
    density = np.convolve(hist, [0.25, 0.5, 0.25], mode="same") / hist.sum()
    written = [
        plots.t2v_heatmap(mean_t2v, tmp_path / "heat.png"),
        plots.t2v_heatmap(torch.from_numpy(mean_t2v), tmp_path / "heat_log.png", log=True),
        plots.t2v_grids(mean_t2v, [0, 10, 20, 31], tmp_path / "grids.png"),
        plots.inflection_histogram(hist, density, tmp_path / "sub" / "hist.png", stage_layers=[10, 22],
                                   regions=[(7, 9), (19, 21)]),
        plots.mean_trajectories(np.cumsum(mean_t2v[None, :, :5].mean(-1).repeat(3, 0), 1), tmp_path / "traj.png",
                                stage_layers=[10]),
    ]
    for path in written:
        check_png(path)
    assert matplotlib.get_backend() == backend


def test_grid_is_the_patch_layout(tmp_path: Path) -> None:
    assert plots.grid_side(576) == 24 and plots.grid_side(64) == 8
    with pytest.raises(plots.PlotError, match="577 vision tokens do not form a square grid"):
        plots.t2v_grids(np.zeros((4, 577)), [0], tmp_path / "x.png")


def test_bad_inputs(tmp_path: Path, mean_t2v: np.ndarray) -> None:
    with pytest.raises(plots.PlotError, match="mean_t2v must have 2 dimensions"):
        plots.t2v_heatmap(mean_t2v[0], tmp_path / "x.png")
    with pytest.raises(plots.PlotError, match=r"layers \[32\] are outside 0..31"):
        plots.t2v_grids(mean_t2v, [0, 32], tmp_path / "x.png")
    with pytest.raises(plots.PlotError, match="same length"):
        plots.inflection_histogram(np.zeros(32), np.zeros(31), tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
