"""Schedule search: stage layers, keep counts and the scorer's text weighting that minimise an objective at a budget.

A candidate is (stage layers, keep counts, text_weight_blend). Its keep counts come from *shares*: the token-layers
the budget leaves after the layers up to the first stage see every vision token,
`C = L * budget - V * (l_1 + shift)` (shift 1 in the processed convention, 0 in the paper one), are split between the
stages, stage i getting `share_i * C` over its span (the layers it feeds: `l_{i+1} - l_i`, the last `L - l_s - shift`),
so `k_i = share_i * C / span_i`. Counts are rounded, then one stage absorbs the rounding residual so the budget is met
within one token; a share vector whose counts are not non-increasing or exceed V is not a candidate. Any
non-increasing allocation meeting the budget is reachable this way (shares are the allocation's token-layer split).

Search (`ScheduleSearch.run`), for one budget:

1. Seeds: for each stage count n in 1..n_stages, the given seed layers for n (the paper rule's layers) and n
   candidate layers spread evenly from the earliest (so low budgets stay reachable), each with the geometric keep
   rule's shares and the first blend; plus any extra seeds (e.g. the previous budget's best).
2. Local search from the best seed, first improvement: the incumbent's neighbours are scored in this order and
   the first better one becomes the incumbent (one round): another blend; `step` of share moved from one stage to
   another; one stage layer moved to the neighbouring candidate layer (order kept); a stage removed (its share to
   the neighbour before it, or after it for the first); a stage added at the middle candidate layer of a gap
   (share `step` taken evenly from the others). When no neighbour improves, `step` is halved, down to `min_step`;
   the search stops there, or after `max_rounds` rounds or `max_candidates` candidates looked at.

Every candidate is scored at most once: scores are kept in a `CandidateStore` (a JSON-lines file, appended as each
candidate is scored), so a search interrupted and rerun over the same file skips what it already scored and,
being deterministic, reaches the same result.

Several processes (`team`, analysis/search_workers.py): each runs this same search over one shared store; before
the search looks at candidates, the team scores them together: all the seeds at once, then the neighbours in
their order, in chunks holding up to `workers` candidates the team has not scored yet. The search then reads the
scores in its usual order and moves exactly as one process would (first improvement; the rest of a chunk after
the improving neighbour was scored in vain and stays in the store). `max_candidates` counts the candidates looked
at in that order, as with one process, so the moves, the count and the result are the same; with N workers, up
to N - 1 more candidates a round are scored.

Pass count: each scored candidate costs one pass over the calibration set from its first stage layer on (plus, once
per first-stage layer, the unpruned prefix that fills the hidden-state cache). With s stages at most n_stages, the
neighbourhood has at most `(|blends| - 1) + 2 s + s (s - 1) + s + (s + 1)` members, so one budget scores at most
`S + R * M` candidates, S = seeds <= 2 * n_stages + 1, R = rounds, M = that neighbourhood bound for s = n_stages,
and never more than `max_candidates` (the binding limit in practice: first improvement mostly stops a round
early).
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Protocol, Sequence

from pruning.schedule import CONVENTIONS, Schedule, ScheduleError, Stage, allocate_keep, round_half_up
from vlm.parallel import locked

log = logging.getLogger(__name__)

BLENDS = (1.0, 0.5, 0.0)


class SearchError(ValueError):
    """The search cannot run as configured; the message names the parameter and what would be right."""


@dataclass(frozen=True)
class Candidate:
    """Stage layers, the vision tokens kept after each, and the adaptinfer scorer's text_weight_blend."""

    layers: tuple[int, ...]
    keeps: tuple[int, ...]
    blend: float = 1.0

    @property
    def key(self) -> str:
        """A stable text key, e.g. '0:120,3:40|b=1.0'."""
        return ",".join(f"{l}:{k}" for l, k in zip(self.layers, self.keeps)) + f"|b={self.blend:g}"

    def schedule(self, num_layers: int, num_vision: int, name: Optional[str] = None) -> Schedule:
        """As a Schedule (counts) for a model with num_layers layers and num_vision vision tokens."""
        return Schedule(stages=[Stage(l, k) for l, k in zip(self.layers, self.keeps)], num_layers=num_layers,
                        vision_tokens=num_vision, name=name)

    def scorer_options(self) -> dict[str, float]:
        """The adaptinfer scorer's options for this candidate."""
        return {"text_weight_blend": float(self.blend)}


def spans(layers: Sequence[int], num_layers: int, convention: str = "processed") -> list[int]:
    """Layers whose vision count each stage sets: l_{i+1} - l_i, and num_layers - l_s - shift for the last."""
    shift = 1 if convention == "processed" else 0
    return [b - a for a, b in zip(layers[:-1], layers[1:])] + [num_layers - layers[-1] - shift]


def prefix_cost(layers: Sequence[int], num_vision: int, convention: str = "processed") -> int:
    """Token-layers spent before the first stage takes effect: every vision token in layers 0..l_1 (+shift)."""
    return num_vision * (layers[0] + (1 if convention == "processed" else 0))


def keeps_from_shares(layers: Sequence[int], shares: Sequence[float], num_layers: int, num_vision: int,
                      budget: float, convention: str = "processed") -> Optional[tuple[int, ...]]:
    """Keep counts at `layers` splitting the budget by `shares` (module docstring); None when not a valid schedule."""
    sp = spans(layers, num_layers, convention)
    total = num_layers * budget - prefix_cost(layers, num_vision, convention)
    if total < -num_layers or any(s < 0 for s in shares) or min(sp) < 1:
        return None
    weight = sum(shares)
    if weight <= 0:
        return None
    raw = [max(total, 0.0) * s / weight / w for s, w in zip(shares, sp)]
    keeps = [round_half_up(x) for x in raw]
    best: Optional[tuple[float, list[int]]] = None
    for j in [len(keeps) - 1, *range(len(keeps) - 1)]:  # the last stage absorbs the residual first
        trial = list(keeps)
        residual = total - sum(k * w for k, w in zip(trial, sp))
        trial[j] += round_half_up(residual / sp[j]) if residual >= 0 else -round_half_up(-residual / sp[j])
        if not _valid(trial, num_vision):
            continue
        miss = abs(total - sum(k * w for k, w in zip(trial, sp))) / num_layers
        if miss <= 1.0 and (best is None or miss < best[0] - 1e-12):
            best = (miss, trial)
    return tuple(best[1]) if best is not None else None


def _valid(keeps: Sequence[int], num_vision: int) -> bool:
    return all(0 <= k <= num_vision for k in keeps) and all(a >= b for a, b in zip(keeps[:-1], keeps[1:]))


def shares_from_keeps(layers: Sequence[int], keeps: Sequence[int], num_layers: int,
                      convention: str = "processed") -> tuple[float, ...]:
    """The shares (summing to 1) that `keeps` spend at `layers`."""
    parts = [k * w for k, w in zip(keeps, spans(layers, num_layers, convention))]
    total = sum(parts)
    return tuple(p / total for p in parts) if total > 0 else tuple(1.0 / len(parts) for _ in parts)


def budget_of(candidate: Candidate, num_layers: int, num_vision: int, convention: str = "processed") -> float:
    """The candidate's budget in `convention`."""
    return candidate.schedule(num_layers, num_vision).budget(convention=convention)


# -- the store of scored candidates -------------------------------------------------------------------------------
class CandidateStore:
    """Scored candidates, kept in memory and appended to a JSON-lines file (when a path is given) as each is scored.

    Each line: {"budget", "key", "layers", "keeps", "blend", "budget_achieved", "score": {...}, "settings"}. Lines
    from other `settings` (objective, calibration data, model) are ignored, so one file never mixes objectives.
    Several processes may share the file (the workers of one search): appends happen under a file lock
    (`vlm.parallel.locked`), each one whole line; `refresh` reads what the others appended; a line cut by a killed
    writer is skipped (the next append starts a new line). A candidate stored twice keeps its first line.
    """

    def __init__(self, path: Optional[Path] = None, settings: Optional[Mapping[str, Any]] = None) -> None:
        self.path = Path(path) if path is not None else None
        self.settings = json.loads(json.dumps(dict(settings or {}), sort_keys=True, default=str))
        self.rows: dict[tuple[float, str], dict[str, Any]] = {}
        self._offset = 0  # bytes of the file read so far (whole lines only)
        self.refresh()

    def refresh(self) -> int:
        """Read the lines appended to the file since the last read (by this or another process); returns how many
        rows of these settings were new."""
        if self.path is None or not self.path.is_file():
            return 0
        with self.path.open("rb") as fh:
            fh.seek(self._offset)
            data = fh.read()
        end = data.rfind(b"\n") + 1  # a last line without its newline is still being written (or was cut)
        self._offset += end
        new = 0
        for line in data[:end].splitlines():
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):  # a line cut by an interruption
                continue
            if isinstance(row, dict) and row.get("settings") == self.settings:
                key = (float(row["budget"]), row["key"])
                if key not in self.rows:
                    self.rows[key] = row
                    new += 1
        return new

    def get(self, budget: float, candidate: Candidate) -> Optional[dict[str, Any]]:
        """The stored row of `candidate` at `budget`, or None."""
        return self.rows.get((float(budget), candidate.key))

    def add(self, budget: float, candidate: Candidate, score: Mapping[str, Any], achieved: float) -> dict[str, Any]:
        """Store a scored candidate (and append it to the file); the row already stored when another process
        stored it first."""
        row = {"budget": float(budget), "key": candidate.key, "layers": list(candidate.layers),
               "keeps": list(candidate.keeps), "blend": candidate.blend, "budget_achieved": round(achieved, 4),
               "score": dict(score), "settings": self.settings}
        if self.path is None:
            self.rows[(float(budget), candidate.key)] = row
            return row
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with locked(self.path):
            self.refresh()
            stored = self.get(budget, candidate)
            if stored is not None:
                return stored
            with self.path.open("ab") as fh:
                # a writer killed mid-line left bytes without a newline: start a new line
                cut = os.fstat(fh.fileno()).st_size > self._offset
                fh.write((b"\n" if cut else b"") + json.dumps(row).encode() + b"\n")
                fh.flush()
            self.refresh()
        return self.get(budget, candidate) or row

    def for_budget(self, budget: float) -> list[dict[str, Any]]:
        """Rows at `budget`, best objective first."""
        rows = [r for (b, _), r in self.rows.items() if b == float(budget)]
        return sorted(rows, key=lambda r: (r["score"]["objective"], r["key"]))


# -- the search ----------------------------------------------------------------------------------------------------
Objective = Callable[[Candidate], Mapping[str, Any]]  # candidate -> {"objective": float, ...}


@dataclass
class SearchResult:
    """The best candidate at one budget, its score, and what the search did."""

    budget: float
    best: Candidate
    score: dict[str, Any]
    scored: int  # candidates scored in this call (not found in the store)
    visited: int  # candidates looked at (scored now or found in the store)
    rounds: int
    history: list[dict[str, Any]] = field(default_factory=list)  # incumbent after each round
    looked_at: list[str] = field(default_factory=list)  # keys of the candidates looked at, first look first


class ScheduleSearch:
    """Local search over candidates at a budget (module docstring); `objective(candidate)` scores one."""

    def __init__(self, num_layers: int, num_vision: int, candidate_layers: Sequence[int], *, n_stages: int = 3,
                 blends: Sequence[float] = BLENDS, convention: str = "processed", step: float = 0.2,
                 min_step: float = 0.05, max_rounds: int = 30, max_candidates: int = 24) -> None:
        self.num_layers = int(num_layers)
        self.num_vision = int(num_vision)
        self.candidate_layers = sorted({int(l) for l in candidate_layers if 0 <= l <= num_layers - 2})
        if not self.candidate_layers:
            raise SearchError(f"candidate_layers={list(candidate_layers)} holds no layer in 0..{num_layers - 2}")
        if n_stages < 1:
            raise SearchError(f"n_stages must be >= 1, got {n_stages}")
        if convention not in CONVENTIONS:
            raise SearchError(f"convention={convention!r} must be one of {list(CONVENTIONS)}")
        if not blends or any(not 0 <= b <= 1 for b in blends):
            raise SearchError(f"blends={list(blends)} must be a non-empty list of values in [0, 1]")
        if not 0 < min_step <= step <= 1:
            raise SearchError(f"need 0 < min_step <= step <= 1, got step={step} min_step={min_step}")
        self.n_stages = int(n_stages)
        self.blends = tuple(float(b) for b in blends)
        self.convention = convention
        self.step = float(step)
        self.min_step = float(min_step)
        self.max_rounds = int(max_rounds)
        self.max_candidates = int(max_candidates)

    def max_neighbours(self, stages: Optional[int] = None) -> int:
        """The neighbourhood bound M for `stages` stages (module docstring)."""
        s = self.n_stages if stages is None else stages
        return (len(self.blends) - 1) + 2 * s + s * (s - 1) + (s if s > 1 else 0) + (s + 1 if s < self.n_stages else 0)

    def max_scored(self) -> int:
        """Upper bound on candidates scored per budget: min(S + R * M, max_candidates)."""
        return min(2 * self.n_stages + 1 + self.max_rounds * self.max_neighbours(), self.max_candidates)

    # candidates -----------------------------------------------------------------------------------------------
    def make(self, layers: Sequence[int], shares: Sequence[float], blend: float, budget: float) -> Optional[Candidate]:
        """The candidate with these layers and shares at `budget`, or None when that is no valid schedule."""
        layers = tuple(int(l) for l in layers)
        if not layers or list(layers) != sorted(set(layers)) or layers[0] < 0 or layers[-1] > self.num_layers - 2:
            return None
        keeps = keeps_from_shares(layers, shares, self.num_layers, self.num_vision, budget, self.convention)
        return Candidate(layers, keeps, float(blend)) if keeps is not None else None

    def seed_candidates(self, budget: float, seed_layers: Mapping[int, Sequence[int]],
                        extra: Iterable[Candidate] = ()) -> list[Candidate]:
        """Geometric-rule candidates at each stage count's seed layers, with every blend, plus `extra` re-fitted."""
        out: list[Candidate] = []
        layer_sets: list[list[int]] = []
        for n in range(1, self.n_stages + 1):
            for layers in (seed_layers.get(n), self._spread(n)):
                if layers and list(layers) not in layer_sets:
                    layer_sets.append(list(layers))
        for layers in layer_sets:
            try:
                geo = allocate_keep(layers, self.num_layers, self.num_vision, float(budget), self.convention)
            except ScheduleError:
                continue
            shares = shares_from_keeps(layers, geo.keep_counts(), self.num_layers, self.convention)
            cand = self.make(layers, shares, self.blends[0], budget)  # other blends: the incumbent's first moves
            if cand is not None and cand not in out:
                out.append(cand)
        for cand in extra:
            shares = shares_from_keeps(cand.layers, cand.keeps, self.num_layers, self.convention)
            refit = self.make(cand.layers, shares, cand.blend, budget)
            if refit is not None and refit not in out:
                out.append(refit)
        return out

    def _spread(self, n: int) -> list[int]:
        """n candidate layers spread evenly over the candidate list (a seed when no rule layers are given)."""
        c = self.candidate_layers
        idx = sorted({round(i * (len(c) - 1) / max(n, 1)) for i in range(n)})
        return [c[i] for i in idx]

    def neighbours(self, cand: Candidate, budget: float, step: float) -> list[Candidate]:
        """The incumbent's neighbourhood (module docstring), valid candidates only, without duplicates."""
        layers, blend = list(cand.layers), cand.blend
        shares = list(shares_from_keeps(layers, cand.keeps, self.num_layers, self.convention))
        s = len(layers)
        proposals: list[tuple[Sequence[int], Sequence[float], float]] = []
        proposals += [(layers, shares, b) for b in self.blends if b != blend]
        for i in range(s):
            for j in range(s):
                if i != j and shares[i] > 0:
                    delta = min(step, shares[i])
                    new = list(shares)
                    new[i] -= delta
                    new[j] += delta
                    proposals.append((layers, new, blend))
        c = self.candidate_layers
        for i in range(s):
            pos = c.index(layers[i]) if layers[i] in c else None
            for d in (-1, 1):
                if pos is None or not 0 <= pos + d < len(c):
                    continue
                moved = layers[:i] + [c[pos + d]] + layers[i + 1:]
                proposals.append((moved, shares, blend))
        if s > 1:
            for i in range(s):
                new = list(shares)
                new[i - 1 if i > 0 else 1] += new[i]
                proposals.append((layers[:i] + layers[i + 1:], new[:i] + new[i + 1:], blend))
        if s < self.n_stages:
            bounds = [-1] + layers + [self.num_layers - 1]
            for g, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
                inside = [l for l in c if a < l < b]
                if not inside:
                    continue
                mid = inside[(len(inside) - 1) // 2]
                new = [x * (1 - step) for x in shares]
                new.insert(g, step)
                proposals.append((layers[:g] + [mid] + layers[g:], new, blend))
        out: list[Candidate] = []
        for lay, sh, b in proposals:
            nb = self.make(lay, sh, b, budget)
            if nb is not None and nb != cand and nb not in out:
                out.append(nb)
        return out

    # the loop -----------------------------------------------------------------------------------------------------
    def run(self, budget: float, objective: Objective, *, seed_layers: Mapping[int, Sequence[int]] | None = None,
            extra_seeds: Iterable[Candidate] = (), store: Optional[CandidateStore] = None,
            progress: Any = None, team: Optional["Team"] = None) -> SearchResult:
        """Search at `budget`; `store` holds (and receives) scores; `progress` (a tqdm bar) is updated per scoring.

        `team` (one of several processes sharing `store`, see `Team`): the candidates the search is about to look
        at are scored by the team first (the seeds at once, then each round's neighbours in chunks of up to
        `team.workers` not yet scored, in their order); the search then reads them from the store, so it takes the
        same moves, and returns the same result, as one process alone.
        """
        store = store if store is not None else CandidateStore()
        scored = visited = 0
        known: set[str] = set()  # keys the team has scored at this budget (the same set in every worker)
        looked: dict[str, None] = {}  # keys looked at, in order

        def score_here(cand: Candidate) -> dict[str, Any]:
            nonlocal scored
            result = dict(objective(cand))
            if "objective" not in result or not math.isfinite(float(result["objective"])):
                raise SearchError(f"the objective returned {result} for {cand.key}; it needs a finite 'objective'")
            row = store.add(budget, cand, result, budget_of(cand, self.num_layers, self.num_vision, self.convention))
            scored += 1
            if progress is not None:
                progress.update(1)
                progress.set_postfix_str(f"budget {budget:g} best so far {best_value:.4f}")
            return row

        def score(cand: Candidate) -> float:
            nonlocal visited
            visited += 1
            if cand.key not in looked:
                looked[cand.key] = None
            row = store.get(budget, cand)
            if row is None:
                row = score_here(cand)
            return float(row["score"]["objective"])

        def spent() -> bool:
            return visited >= self.max_candidates

        def prefetch(cands: Sequence[Candidate], start: int, chunk: Optional[int]) -> int:
            """Have the team score cands[start:end] (end returned): the ones looked at next in this order, within
            max_candidates, holding at most `chunk` (None: any number) candidates the team has not scored."""
            if team is None:
                return len(cands)
            end, new = start, []
            room = self.max_candidates - visited
            while end < len(cands) and end - start < room and (chunk is None or len(new) < chunk):
                if cands[end].key not in known:
                    known.add(cands[end].key)
                    new.append(cands[end])
                end += 1
            if new:
                team.score(store, budget, new, score_here)
            return end

        seeds = self.seed_candidates(budget, seed_layers or {}, extra_seeds)
        if not seeds:
            raise SearchError(
                f"budget {budget} is out of reach of every seed (stages at layers {self.candidate_layers[:1]}.. and "
                f"{self.num_vision} vision tokens, {self.num_layers} layers, {self.convention} convention); the "
                f"lowest reachable budget is {prefix_cost(self.candidate_layers[:1], self.num_vision, self.convention) / self.num_layers:.1f}"
            )
        best, best_value = seeds[0], math.inf
        prefetch(seeds, 0, None)
        for cand in seeds:
            if spent():
                break
            value = score(cand)
            if value < best_value:
                best, best_value = cand, value
        history = [{"round": 0, "key": best.key, "objective": best_value}]
        step, rounds = self.step, 0
        while rounds < self.max_rounds and not spent():
            rounds += 1
            improved = False
            neighbours = self.neighbours(best, budget, step)
            ready = 0  # neighbours[:ready] are in the store
            for i, nb in enumerate(neighbours):
                if spent():
                    break
                if i >= ready:
                    ready = prefetch(neighbours, i, team.workers if team is not None else None)
                value = score(nb)
                if value < best_value - 1e-12:  # first improvement: move there and look around it
                    best, best_value, improved = nb, value, True
                    break
            history.append({"round": rounds, "step": step, "key": best.key, "objective": best_value})
            if not improved:
                if step / 2 < self.min_step - 1e-12:
                    break
                step /= 2
        return SearchResult(budget=float(budget), best=best, score=dict(store.get(budget, best)["score"]),
                            scored=scored, visited=visited, rounds=rounds, history=history, looked_at=list(looked))


class Team(Protocol):
    """One of `workers` processes that search together over one shared `CandidateStore` (analysis.search_workers)."""

    workers: int

    def score(self, store: CandidateStore, budget: float, candidates: Sequence[Candidate],
              score_here: Callable[[Candidate], Mapping[str, Any]]) -> None:
        """Return once every one of `candidates` (the same list in every worker) is in `store`, having scored
        this worker's share with `score_here` (and any share whose worker is gone)."""


def candidate_layers_from_regions(regions: Sequence[Any], num_layers: int, rule_layers: Iterable[int] = (),
                                  min_layer: int = 0, every_layer_up_to: int = 12) -> list[int]:
    """Stage-layer candidates: each dense region's bounds and the layers just outside them, the paper rule's layers
    and `min_layer`; every layer in min_layer..L-2 when the model has at most `every_layer_up_to` layers (or the
    analysis proposes fewer than two layers)."""
    lo, hi = int(min_layer), num_layers - 2
    if num_layers <= every_layer_up_to:
        return list(range(lo, hi + 1))
    found = {lo, *map(int, rule_layers)}
    for r in regions:
        found |= {r.start - 1, r.start, r.end, r.end + 1}
    out = sorted(l for l in found if lo <= l <= hi)
    return out if len(out) >= 2 else list(range(lo, hi + 1))


__all__ = ["BLENDS", "Candidate", "CandidateStore", "ScheduleSearch", "SearchError", "SearchResult", "Team",
           "budget_of", "candidate_layers_from_regions", "keeps_from_shares", "prefix_cost", "shares_from_keeps",
           "spans"]
