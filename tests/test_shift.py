"""ShiftDetector on seeded synthetic records whose shift layers are known."""
from __future__ import annotations

import time
from typing import Sequence

import numpy as np
import pytest
import torch

from analysis.records import Records
from analysis.shift import (
    BadDetectorParameters,
    NotEnoughLayers,
    ShiftDetector,
    ShiftError,
    ShiftResult,
    select_tokens,
    smooth_histogram,
)

NUM_LAYERS = 32


def planted_t2v(
    shift_layers: Sequence[int],
    num_layers: int = NUM_LAYERS,
    num_vision: int = 64,
    num_planted: int = 8,
    kind: str = "burst",
    noise: float = 1e-3,
    seed: int = 0,
) -> np.ndarray:
    """Synthetic t2v [N, L, V]: per sample `num_planted` strong tokens whose attention shifts after layer s.

    kind="burst": the tokens' attention bursts at layer s + 1, so their cumulative trajectory steps
    between layers s and s + 1 (shift layer s under the paper's breakpoint - 1 convention).
    kind="level": the attention moves from a low to a high level between layers s and s + 1 (a step
    in the raw trajectory). Background tokens get weak unstructured attention.
    """
    rng = np.random.default_rng(seed)
    n = len(shift_layers)
    t2v = rng.uniform(0.0, 0.004, size=(n, num_layers, num_vision))
    for i, s in enumerate(shift_layers):
        tokens = rng.choice(num_vision, size=num_planted, replace=False)
        for v in tokens:
            if kind == "burst":
                curve = np.full(num_layers, 0.01)
                curve[s + 1] = 0.3
            else:
                curve = np.where(np.arange(num_layers) <= s, 0.01, 0.05)
            t2v[i, :, v] = np.clip(curve + rng.normal(0, noise, num_layers), 0, None)
    return t2v.astype(np.float32)


HALF_8_HALF_20 = [8] * 10 + [20] * 10


def assert_peaks_at(result: ShiftResult, layers: Sequence[int], share: float = 1.0) -> None:
    h = result.histogram
    top = set(np.argsort(-h, kind="stable")[: len(layers)].tolist())
    assert top == set(layers), f"histogram peaks at {sorted(top)}, planted {list(layers)}: {h.tolist()}"
    assert h[list(layers)].sum() >= share * h.sum(), h.tolist()


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(algorithm="binseg"),
        dict(algorithm="dynp"),
        dict(algorithm="bottomup", min_size=1),
        dict(algorithm="pelt", n_bkps=None, penalty=0.5, normalize=True),
        dict(algorithm="window", width=6),
        dict(algorithm="binseg", cost="l1"),
        dict(algorithm="binseg", cost="rbf"),
        dict(algorithm="binseg", n_bkps=None, penalty=0.5, normalize=True),
    ],
    ids=lambda kw: "-".join(f"{v}" for v in kw.values()),
)
def test_recovers_planted_layers(kwargs: dict) -> None:
    t2v = planted_t2v(HALF_8_HALF_20)
    result = ShiftDetector(**kwargs).fit(t2v).result_
    assert result.tokens_per_sample == 6  # round(0.1 * 64)
    assert_peaks_at(result, [8, 20])
    assert abs(int(result.histogram[8]) - int(result.histogram[20])) <= 2
    # per sample, each selected token is found at that sample's planted layer
    for s, found in zip(HALF_8_HALF_20, result.breakpoints):
        assert found.tolist() == [s] * 6


def test_raw_trajectory_finds_level_shift() -> None:
    t2v = planted_t2v(HALF_8_HALF_20, kind="level", noise=2e-3)
    result = ShiftDetector(trajectory="raw").fit(t2v).result_
    assert_peaks_at(result, [8, 20])


def test_jump_one_keeps_layer_seven() -> None:
    t2v = planted_t2v([7] * 6)
    exact = ShiftDetector(jump=1).fit(t2v).result_
    assert exact.histogram.argmax() == 7 and exact.histogram[7] == exact.histogram.sum()
    snapped = ShiftDetector(jump=5).fit(t2v).result_  # ruptures' default jump: breakpoints on multiples of 5
    assert snapped.histogram[7] == 0
    assert set(np.flatnonzero(snapped.histogram)) <= {4, 9}


def test_bottomup_min_size_grid_is_warned() -> None:
    """BottomUp starts from a bisection tree with leaves of min_size..2*min_size-1 layers: min_size=2 -> even breakpoints only."""
    with pytest.warns(UserWarning, match="min_size=1"):
        result = ShiftDetector(algorithm="bottomup", min_size=2).fit(planted_t2v([8] * 4)).result_
    # the planted breakpoint 9 is odd: unreachable
    assert result.histogram[8] == 0


def test_accepts_records_and_tensors_and_keeps_ids() -> None:
    t2v = planted_t2v([8, 20, 8])
    recs = Records(
        ids=["a", "b", "c"],
        t2v=torch.from_numpy(t2v),
        scalars={"vision_share": torch.zeros(3, NUM_LAYERS)},
    )
    r1 = ShiftDetector().fit(recs).result_
    r2 = ShiftDetector().fit(torch.from_numpy(t2v)).result_
    assert r1.sample_ids == ["a", "b", "c"] and r2.sample_ids is None
    assert np.array_equal(r1.histogram, r2.histogram)
    assert r1.mean_trajectories.shape == (3, NUM_LAYERS)
    assert r1.token_indices.shape == (3, 6)
    summary = r1.summary()
    assert summary["histogram"] == r1.histogram.tolist()
    assert summary["detector"]["algorithm"] == "binseg" and summary["detector"]["jump"] == 1


def test_token_selection_is_paper_count_and_top_by_total() -> None:
    rng = np.random.default_rng(1)
    t2v = rng.random((2, 4, 576))
    t2v[0, :, 100] = 10.0
    tokens = select_tokens(t2v, 58)
    assert tokens.shape == (2, 58)
    assert tokens[0, 0] == 100
    totals = t2v.sum(1)
    assert np.all(totals[1, tokens[1]].min() >= np.delete(totals[1], tokens[1]).max())
    # the detector uses round(0.1 * 576) = 58
    result = ShiftDetector().fit(rng.random((1, 8, 576))).result_
    assert result.tokens_per_sample == 58


def test_density_is_documented_gaussian_smoothing() -> None:
    h = np.zeros(32)
    h[10] = 4
    d = smooth_histogram(h, sigma=1.0)
    assert d.sum() == pytest.approx(1.0)
    assert d.argmax() == 10 and d[9] == pytest.approx(d[11])
    assert d[11] / d[10] == pytest.approx(np.exp(-0.5), rel=1e-3)
    assert np.array_equal(smooth_histogram(h, 0.0), h / 4)
    assert not smooth_histogram(np.zeros(5), 1.0).any()


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(algorithm="kernel"), "algorithm"),
        (dict(cost="l3"), "cost"),
        (dict(cost="linear"), "cost"),
        (dict(n_bkps=1, penalty=1.0), "exactly one of n_bkps and penalty"),
        (dict(n_bkps=None), "exactly one of n_bkps and penalty"),
        (dict(algorithm="pelt"), "pelt.*penalty"),
        (dict(algorithm="dynp", n_bkps=None, penalty=1.0), "dynp.*n_bkps"),
        (dict(n_bkps=0), "n_bkps"),
        (dict(n_bkps=None, penalty=-1.0), "penalty"),
        (dict(jump=0), "jump"),
        (dict(jump=1.5), "jump"),
        (dict(min_size=0), "min_size"),
        (dict(token_fraction=0.0), "token_fraction"),
        (dict(token_fraction=1.5), "token_fraction"),
        (dict(trajectory="log"), "trajectory"),
        (dict(algorithm="window"), "width"),
        (dict(algorithm="window", width=3), "width"),
        (dict(width=6), "width"),
        (dict(sigma=-1), "sigma"),
    ],
)
def test_bad_parameters(kwargs: dict, field: str) -> None:
    with pytest.raises(BadDetectorParameters, match=field):
        ShiftDetector(**kwargs)


def test_not_enough_layers() -> None:
    t2v = np.random.default_rng(0).random((2, 3, 10))
    with pytest.raises(NotEnoughLayers, match="3 layers cannot hold 1 breakpoint"):
        ShiftDetector(min_size=2).fit(t2v)
    with pytest.raises(NotEnoughLayers, match="2 layers cannot hold 2 breakpoint"):
        ShiftDetector(n_bkps=2, min_size=1).fit(t2v[:, :2])
    with pytest.raises(NotEnoughLayers, match="width=6"):
        ShiftDetector(algorithm="window", width=6).fit(np.random.default_rng(0).random((1, 6, 10)))


def test_bad_input() -> None:
    with pytest.raises(ShiftError, match=r"\[N, L, V\]"):
        ShiftDetector().fit(np.zeros((4, 32)))
    bad = np.ones((1, 8, 10))
    bad[0, 3, 2] = np.nan
    with pytest.raises(ShiftError, match="NaN"):
        ShiftDetector().fit(bad)


@pytest.mark.slow
def test_paper_scale_runs_well_under_a_minute() -> None:
    """256 samples x 58 tokens (10% of 576) x 32 layers with the paper's defaults."""
    shifts = [8 if i % 2 else 20 for i in range(256)]
    t2v = planted_t2v(shifts, num_vision=576, num_planted=64)
    start = time.perf_counter()
    result = ShiftDetector().fit(t2v).result_
    elapsed = time.perf_counter() - start
    assert result.histogram.sum() == 256 * 58
    assert_peaks_at(result, [8, 20])
    assert elapsed < 60, f"{elapsed:.1f}s on this machine (16 s measured on one shared core)"


def test_structureless_attention_lands_mid_stack() -> None:
    """A property of the paper's procedure worth knowing: on a cumulative trajectory with no shift (a noisy
    ramp) the single l2 breakpoint falls near the middle of the stack, so a mid-stack histogram peak is
    expected even without any attention shift."""
    t2v = np.random.default_rng(3).uniform(0, 1, size=(20, NUM_LAYERS, 64))
    h = ShiftDetector().fit(t2v).result_.histogram
    assert 13 <= h.argmax() <= 17
    assert h[12:19].sum() >= 0.6 * h.sum()


def test_cumulative_l2_places_a_level_change_inside_the_high_regime() -> None:
    """The other documented property: a sustained level change after layer 8 is a kink of the cumulative
    curve, and one l2 breakpoint lands well inside the high regime (layers 16-17), not at 8; the raw
    trajectory finds 8 (test_raw_trajectory_finds_level_shift)."""
    t2v = planted_t2v([8] * 6, kind="level", noise=2e-3)
    h = ShiftDetector(trajectory="cumulative").fit(t2v).result_.histogram
    assert h[8] == 0 and 14 <= h.argmax() <= 19
