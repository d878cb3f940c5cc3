"""Where in the layer stack text-to-vision attention shifts: a changepoint estimator over ruptures.

The paper's procedure (the defaults): for each sample take the `round(token_fraction * V)` vision
tokens with the largest attention summed over layers (58 of 576), build each token's cumulative
attention trajectory over the L layers, and find one breakpoint per trajectory with ruptures
`Binseg(model="l2", jump=1, min_size=2).predict(n_bkps=1)`. A ruptures breakpoint `b` is the index of
the first layer of the new regime; the token's **shift layer** is `b - 1`, the last layer before the
change (a token whose attention bursts at layer 9 has its cumulative curve step between layers 8 and
9, so its shift layer is 8). The histogram counts shift layers over all selected tokens and samples.

Two properties of this procedure worth knowing when reading a histogram: with the l2 cost on a cumulative
trajectory, a token with no shift at all (a steady ramp) gets its breakpoint near the middle of the stack, so
a mid-stack peak can appear without any attention shift (tests/test_shift.py shows it); and a sustained level
change of the raw attention appears as a kink of the cumulative curve, which l2 places inside the high
regime rather than at its onset (use trajectory="raw" to locate level changes).

Records whose samples hold different numbers of vision tokens (Qwen2-VL's dynamic resolution) are analysed sample
by sample: each sample's top `round(token_fraction * V_i)` of its own V_i tokens, so a sample counts in the
histogram in proportion to its size, as in the paper's procedure applied to that sample alone.

`density` is the histogram smoothed with a Gaussian of `sigma` layers
(`scipy.ndimage.gaussian_filter1d`, `mode="constant"`, i.e. zero outside the layer range, truncated
at 4 sigma) and normalised to sum to 1; `sigma=0` means no smoothing.
"""
from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Union

import numpy as np
import ruptures as rpt
import torch
from ruptures.base import BaseCost
from ruptures.utils import sanity_check
from scipy.ndimage import gaussian_filter1d

from analysis.records import Records, count_range
from vlm.errors import UserError

ALGORITHMS = {
    "binseg": rpt.Binseg,
    "pelt": rpt.Pelt,
    "dynp": rpt.Dynp,
    "bottomup": rpt.BottomUp,
    "window": rpt.Window,
}
TRAJECTORIES = ("cumulative", "raw")
UNSUPPORTED_COSTS = {"linear": "it regresses on covariates that a 1-D attention trajectory does not have"}


class ShiftError(UserError, ValueError):
    """Base class of the shift detector's errors."""


class BadDetectorParameters(ShiftError):
    """A detector parameter has an invalid value or combination."""


class NotEnoughLayers(ShiftError):
    """The trajectories are too short for the requested segmentation."""


def cost_names() -> list[str]:
    """Names of ruptures costs usable on attention trajectories."""
    names = {cls.model for cls in BaseCost.__subclasses__()}
    return sorted(names - set(UNSUPPORTED_COSTS))


@dataclass
class ShiftResult:
    """Inflection layers found by `ShiftDetector.fit`."""

    histogram: np.ndarray  # [L] int64, count of shift layers over all selected tokens and samples
    density: np.ndarray  # [L] float64, smoothed histogram normalised to sum 1 (zeros if nothing found)
    breakpoints: list[np.ndarray]  # per sample: [n_found] int64 shift layers of its selected tokens
    token_indices: np.ndarray  # [N, K] int64, the selected vision tokens of each sample (by total, descending);
    # [N, Kmax] padded with -1 when the samples' V differ
    mean_trajectories: np.ndarray  # [N, L] float64, per sample the mean trajectory of its selected tokens
    num_layers: int
    num_vision: Optional[int]  # V of every sample; None when it differs per sample (see vision_counts)
    sample_ids: Optional[list[str]]
    params: dict[str, Any] = field(default_factory=dict)
    vision_counts: Optional[np.ndarray] = None  # [N] int64 each sample's V when it differs per sample

    @property
    def num_samples(self) -> int:
        """Number of samples N."""
        return len(self.breakpoints)

    @property
    def tokens_per_sample(self) -> int:
        """Selected tokens per sample K (the most of any sample when V differs per sample)."""
        return int(self.token_indices.shape[1])

    def summary(self) -> dict[str, Any]:
        """A JSON-friendly summary (histogram and density as lists, detector parameters)."""
        return {
            "num_samples": self.num_samples,
            "num_layers": self.num_layers,
            "num_vision": self.num_vision,
            "tokens_per_sample": self.tokens_per_sample,
            **({} if self.vision_counts is None else {"vision_counts": count_range(self.vision_counts)}),
            "histogram": [int(x) for x in self.histogram],
            "density": [float(x) for x in self.density],
            "detector": dict(self.params),
        }


def select_tokens(t2v: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k vision tokens with the largest attention summed over layers. t2v [N, L, V] -> [N, K]"""
    totals = t2v.sum(axis=1)  # [N, V]
    # stable sort on the negated totals: ties go to the lower token index
    return np.argsort(-totals, axis=1, kind="stable")[:, :k]


def smooth_histogram(histogram: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian-smoothed histogram normalised to sum 1 (zeros for an empty histogram). [L] -> [L]"""
    h = np.asarray(histogram, dtype=np.float64)
    smoothed = gaussian_filter1d(h, sigma=sigma, mode="constant", cval=0.0) if sigma > 0 else h.copy()
    total = smoothed.sum()
    return smoothed / total if total > 0 else smoothed


@dataclass
class _Params:
    algorithm: str
    cost: str
    n_bkps: Optional[int]
    penalty: Optional[float]
    jump: int
    min_size: int
    token_fraction: float
    trajectory: str
    width: Optional[int]
    normalize: bool
    sigma: float
    cost_params: Optional[dict]


class ShiftDetector:
    """Per-token changepoints of attention trajectories, pooled into a histogram of shift layers."""

    def __init__(
        self,
        algorithm: str = "binseg",
        cost: str = "l2",
        n_bkps: Optional[int] = 1,
        penalty: Optional[float] = None,
        jump: int = 1,
        min_size: int = 2,
        token_fraction: float = 0.1,
        trajectory: str = "cumulative",
        width: Optional[int] = None,
        normalize: bool = False,
        sigma: float = 1.0,
        cost_params: Optional[dict] = None,
    ) -> None:
        """Set and check the parameters; `penalty` replaces `n_bkps` (give exactly one).

        Args:
            algorithm: ruptures search method: binseg, pelt (needs penalty), dynp (needs n_bkps),
                bottomup (use min_size=1: its initial bisection tree puts breakpoints on a grid of
                min_size..2*min_size-1 layers), window (needs width).
            cost: ruptures cost name (l2, l1, rbf, normal, ...).
            n_bkps: breakpoints per token trajectory.
            penalty: ruptures `pen`, instead of n_bkps; its scale follows the trajectory's scale.
            jump: breakpoints are searched on multiples of `jump`; keep 1 (ruptures' 5 snaps layers).
            min_size: minimum layers per segment.
            token_fraction: share of vision tokens per sample that is analysed (top by total attention).
            trajectory: "cumulative" (paper) or "raw" per-layer attention.
            width: window length in layers for algorithm="window".
            normalize: divide each token's attention by its total over layers first, so that a
                penalty means the same for every model (cumulative trajectories then end at 1).
            sigma: Gaussian smoothing of the density in layers (0 = none).
            cost_params: extra keyword arguments of the ruptures cost (e.g. {"gamma": 1.0} for rbf).
        """
        self.algorithm = algorithm
        self.cost = cost
        self.n_bkps = n_bkps
        self.penalty = penalty
        self.jump = jump
        self.min_size = min_size
        self.token_fraction = token_fraction
        self.trajectory = trajectory
        self.width = width
        self.normalize = normalize
        self.sigma = sigma
        self.cost_params = cost_params
        self.sanity_check()

    def get_params(self) -> dict[str, Any]:
        """The constructor parameters as a dict."""
        return asdict(
            _Params(
                self.algorithm, self.cost, self.n_bkps, self.penalty, self.jump, self.min_size,
                self.token_fraction, self.trajectory, self.width, self.normalize, self.sigma, self.cost_params,
            )
        )

    def sanity_check(self) -> None:
        """Raise BadDetectorParameters naming the first invalid parameter."""

        def bad(msg: str) -> BadDetectorParameters:
            return BadDetectorParameters(msg)

        def is_int(x: Any) -> bool:
            return isinstance(x, (int, np.integer)) and not isinstance(x, bool)

        if self.algorithm not in ALGORITHMS:
            raise bad(f"algorithm={self.algorithm!r} is not one of {sorted(ALGORITHMS)}")
        if self.cost in UNSUPPORTED_COSTS:
            raise bad(f"cost={self.cost!r} is not supported: {UNSUPPORTED_COSTS[self.cost]}; use one of {cost_names()}")
        if self.cost not in cost_names():
            raise bad(f"cost={self.cost!r} is not a ruptures cost; use one of {cost_names()}")
        if self.cost_params is not None and not isinstance(self.cost_params, dict):
            raise bad(f"cost_params must be a dict of the cost's keyword arguments or None, got {self.cost_params!r}")
        if (self.n_bkps is None) == (self.penalty is None):
            raise bad(
                f"give exactly one of n_bkps and penalty (got n_bkps={self.n_bkps!r}, penalty={self.penalty!r})"
            )
        if self.algorithm == "pelt" and self.penalty is None:
            raise bad("algorithm='pelt' needs penalty=<float > 0> (ruptures Pelt has no n_bkps); set n_bkps=None")
        if self.algorithm == "dynp" and self.n_bkps is None:
            raise bad("algorithm='dynp' needs n_bkps=<int >= 1> (ruptures Dynp has no penalty); set penalty=None")
        if self.n_bkps is not None and (not is_int(self.n_bkps) or self.n_bkps < 1):
            raise bad(f"n_bkps must be an int >= 1, got {self.n_bkps!r}")
        if self.penalty is not None:
            if isinstance(self.penalty, bool) or not isinstance(self.penalty, (int, float, np.floating)):
                raise bad(f"penalty must be a positive float, got {self.penalty!r}")
            if not (np.isfinite(self.penalty) and self.penalty > 0):
                raise bad(f"penalty must be a positive finite float, got {self.penalty!r}")
        if not is_int(self.jump) or self.jump < 1:
            raise bad(f"jump must be an int >= 1 (1 keeps every layer a candidate), got {self.jump!r}")
        if not is_int(self.min_size) or self.min_size < 1:
            raise bad(f"min_size must be an int >= 1, got {self.min_size!r}")
        if isinstance(self.token_fraction, bool) or not isinstance(self.token_fraction, (int, float, np.floating)):
            raise bad(f"token_fraction must be a float in (0, 1], got {self.token_fraction!r}")
        if not 0 < self.token_fraction <= 1:
            raise bad(f"token_fraction must be in (0, 1], got {self.token_fraction!r}")
        if self.trajectory not in TRAJECTORIES:
            raise bad(f"trajectory={self.trajectory!r} is not one of {list(TRAJECTORIES)}")
        if self.algorithm == "window":
            if self.width is None:
                raise bad("algorithm='window' needs an explicit width in layers (e.g. width=6 for 32 layers); "
                          "ruptures' default of 100 finds nothing on a 32-layer trajectory")
            if not is_int(self.width) or self.width < 2 * self.min_size:
                raise bad(f"width must be an int >= 2 * min_size = {2 * self.min_size}, got {self.width!r}")
        elif self.width is not None:
            raise bad(f"width={self.width!r} is only used by algorithm='window', not {self.algorithm!r}; set width=None")
        if self.algorithm == "bottomup" and self.min_size > 1:
            warnings.warn(
                f"algorithm='bottomup' with min_size={self.min_size} can only place breakpoints on the grid of its "
                "initial bisection tree (with min_size=2: even layers only); use min_size=1 for every layer",
                UserWarning,
                stacklevel=3,
            )
        if not isinstance(self.normalize, bool):
            raise bad(f"normalize must be True or False, got {self.normalize!r}")
        if isinstance(self.sigma, bool) or not isinstance(self.sigma, (int, float, np.floating)) or self.sigma < 0:
            raise bad(f"sigma must be a float >= 0 (layers), got {self.sigma!r}")

    # ---- fitting -----------------------------------------------------------------------------------
    def _estimator(self) -> Any:
        """A fresh ruptures estimator for these parameters."""
        kwargs: dict[str, Any] = {"model": self.cost, "min_size": self.min_size, "jump": self.jump}
        if self.cost_params:
            kwargs["params"] = dict(self.cost_params)
        if self.algorithm == "window":
            kwargs["width"] = self.width
        return ALGORITHMS[self.algorithm](**kwargs)

    def _check_layers(self, num_layers: int, estimator: Any) -> None:
        """Raise NotEnoughLayers if no segmentation of `num_layers` points fits the parameters."""
        min_size = max(self.min_size, getattr(estimator, "min_size", self.min_size))
        if self.algorithm == "window" and estimator.width >= num_layers:
            raise NotEnoughLayers(
                f"width={self.width} needs more than {estimator.width} layers, the trajectories have {num_layers}; "
                f"use width <= {num_layers - 1}"
            )
        n_bkps = self.n_bkps if self.n_bkps is not None else 1
        if not sanity_check(n_samples=num_layers, n_bkps=n_bkps, jump=self.jump, min_size=min_size):
            raise NotEnoughLayers(
                f"{num_layers} layers cannot hold {n_bkps} breakpoint(s) with min_size={min_size} and "
                f"jump={self.jump}; need at least {(n_bkps + 1) * min_size} layers (or a smaller min_size/n_bkps)"
            )

    def trajectories(self, t2v: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """Trajectories of the selected tokens. t2v [N, L, V], tokens [N, K] -> [N, K, L]"""
        picked = np.take_along_axis(t2v, tokens[:, None, :], axis=2).transpose(0, 2, 1)  # [N, K, L]
        picked = picked.astype(np.float64)
        if self.normalize:
            totals = picked.sum(axis=2, keepdims=True)
            picked = np.divide(picked, totals, out=np.zeros_like(picked), where=totals > 0)
        return np.cumsum(picked, axis=2) if self.trajectory == "cumulative" else picked

    def fit(self, records: Union[Records, torch.Tensor, np.ndarray]) -> "ShiftDetector":
        """Find each selected token's shift layers; sets `result_`. records: Records (V may differ per sample) or
        t2v [N, L, V]."""
        self.sanity_check()
        sample_ids = None
        counts = None
        if isinstance(records, Records):
            sample_ids = list(records.ids)
            t2v = records.t2v
            if records.ragged:
                counts = records.counts().numpy().astype(np.int64)
        else:
            t2v = records
        if isinstance(t2v, torch.Tensor):
            t2v = t2v.detach().cpu().double().numpy()
        t2v = np.asarray(t2v, dtype=np.float64)
        if t2v.ndim != 3 or 0 in t2v.shape:
            raise ShiftError(f"t2v must have shape [N, L, V] with N, L, V >= 1, got {t2v.shape}")
        if not np.isfinite(t2v).all():
            raise ShiftError("t2v holds NaN or inf values; check the records")
        n, num_layers, num_vision = t2v.shape
        self._check_layers(num_layers, self._estimator())

        if counts is None:
            k = self._tokens(num_vision)
            tokens = select_tokens(t2v, k)  # [N, K]
            traj_all = self.trajectories(t2v, tokens)  # [N, K, L]
            traj, mean_traj = list(traj_all), traj_all.mean(axis=1)
            per_sample = [k] * n
        else:  # each sample its own V_i: its top round(fraction * V_i) tokens
            per_sample = [self._tokens(int(v)) for v in counts]
            picks = [select_tokens(t2v[i:i + 1, :, : int(v)], k)[0] for i, (v, k) in enumerate(zip(counts, per_sample))]
            traj = [self.trajectories(t2v[i:i + 1], pick[None])[0] for i, pick in enumerate(picks)]  # N x [K_i, L]
            tokens = np.full((n, max(per_sample)), -1, dtype=np.int64)
            for i, pick in enumerate(picks):
                tokens[i, : len(pick)] = pick
            k = max(per_sample)
            mean_traj = np.stack([t.mean(axis=0) for t in traj])  # [N, L]

        histogram = np.zeros(num_layers, dtype=np.int64)
        breakpoints: list[np.ndarray] = []
        for i in range(n):
            layers: list[int] = []
            for j in range(per_sample[i]):
                # a fresh estimator per trajectory: ruptures 1.1.10's CostRbf/CostCosine keep the Gram matrix
                # (and rbf's median-heuristic gamma) of the first signal they were fitted on, so a reused
                # estimator segments every later token wrongly (ruptures issue #372, fix proposed in PR #373)
                estimator = self._estimator().fit(traj[i][j])
                if self.penalty is not None:
                    bkps = estimator.predict(pen=self.penalty)
                else:
                    bkps = estimator.predict(n_bkps=self.n_bkps)
                layers.extend(b - 1 for b in bkps[:-1])  # last entry is always L; b is the new regime's start
            arr = np.asarray(layers, dtype=np.int64)
            np.add.at(histogram, arr, 1)
            breakpoints.append(arr)

        self.result_ = ShiftResult(
            histogram=histogram,
            density=smooth_histogram(histogram, self.sigma),
            breakpoints=breakpoints,
            token_indices=tokens.astype(np.int64),
            mean_trajectories=mean_traj,
            num_layers=num_layers,
            num_vision=num_vision if counts is None else None,
            sample_ids=sample_ids,
            params={**self.get_params(),
                    "tokens_per_sample": k if counts is None else f"round({self.token_fraction} * V) per sample "
                                                                  f"({count_range(per_sample)})"},
            vision_counts=counts,
        )
        return self

    def _tokens(self, num_vision: int) -> int:
        """Tokens analysed of a sample with `num_vision` vision tokens."""
        return max(1, int(np.floor(self.token_fraction * num_vision + 0.5)))  # round half up: 0.1 * 576 -> 58

    def fit_result(self, records: Union[Records, torch.Tensor, np.ndarray]) -> ShiftResult:
        """fit(records) and return its ShiftResult."""
        return self.fit(records).result_


__all__ = [
    "ALGORITHMS",
    "BadDetectorParameters",
    "NotEnoughLayers",
    "ShiftDetector",
    "ShiftError",
    "ShiftResult",
    "cost_names",
    "select_tokens",
    "smooth_histogram",
]
