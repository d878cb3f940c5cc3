"""The fidelity objective: how far a pruned model's answers move from the unpruned model's on calibration prompts.

Definition. For calibration prompt n let p_n be the unpruned model's next-token distribution at the answer position
(the last prompt token, whose next token is the first answer token) and q_n the pruned model's:

    kl        = mean_n KL(p_n || q_n)                           (nats)
    mismatch  = mean_n [argmax p_n != argmax q_n]               (greedy first answer token changed)
    objective = kl + mismatch_weight * mismatch                 (mismatch_weight = 1 by default)

Lower is better; 0 means the pruned model answers every calibration prompt as the unpruned one does, with the same
confidence. The unpruned log-probabilities are computed once per calibration set and cached on disk
(`reference.pt`), keyed by the model and the sample ids.

Reuse of hidden states. No pruning happens before a schedule's first stage layer f, so the input of decoder layer
f is the same for every candidate whose first stage is at f or later. `Calibration.states(f)` computes it once per
calibration batch (a forward pre-hook captures it; the forward is then stopped) and keeps the last
`max_cached_layers` such layers; a pass for a candidate then replays from it: decoder layers 0..f-1 are swapped for
pass-through modules, a pre-hook on layer f (registered first) hands it the cached input, and the model is called
without `pixel_values`, so the vision tower is skipped too. The swap is a context manager that always restores the
layers; the model's own forward runs unchanged (no copied forward).

Counting. `Calibration.counter` holds `prompts` (prompt forwards started) and `layers` (decoder layers run, summed
over prompts); `full_equivalents = layers / num_layers` is the cost in unpruned-depth passes over one prompt.
"""
from __future__ import annotations

import hashlib
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from pruning.engine import PruningEngine
from pruning.schedule import Schedule
from vlm.models import LoadedModel
from vlm.parallel import atomic_write, locked
from vlm.prompts import encode_batch
from vlm.tasks.base import VQASample

log = logging.getLogger(__name__)

OBJECTIVE_NAME = "kl+mismatch"
OBJECTIVE_DOC = (
    "mean over calibration prompts of KL(p_unpruned || p_pruned) of the next-token distribution at the answer "
    "position (nats), plus mismatch_weight times the fraction of prompts whose greedy first answer token changes"
)
REFERENCE_FILE = "reference.pt"


class ObjectiveError(ValueError):
    """The objective cannot be computed as asked; the message names the input and what would be right."""


class _StopForward(Exception):
    """Raised by a capture hook once it has what it needs, to end a forward early."""


@dataclass
class PassCounter:
    """Forward work done for the search: prompts started and decoder layers run (summed over prompts)."""

    num_layers: int
    prompts: int = 0
    layers: int = 0

    @property
    def full_equivalents(self) -> float:
        """Decoder work in units of one unpruned forward of one prompt."""
        return self.layers / max(self.num_layers, 1)

    def as_dict(self) -> dict[str, Any]:
        """Plain numbers for provenance and reports."""
        return {"prompts": self.prompts, "decoder_layers": self.layers,
                "full_pass_equivalents": round(self.full_equivalents, 2)}


@dataclass(frozen=True)
class Fidelity:
    """One schedule's fidelity on the calibration set (see the module docstring)."""

    objective: float
    kl: float
    mismatch: float
    n: int

    def as_dict(self) -> dict[str, float]:
        """Plain numbers."""
        return {"objective": self.objective, "kl": self.kl, "mismatch": self.mismatch, "n": self.n}


class _PassThrough(nn.Module):
    """Stands in for a skipped decoder layer: returns its hidden-state input unchanged."""

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        if hasattr(original, "attention_type"):  # some families pick the layer's mask by this attribute
            self.attention_type = original.attention_type

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return hidden_states


@contextmanager
def replay_from(layers: nn.ModuleList, start: int, hidden: Tensor) -> Iterator[None]:
    """Run a forward from decoder layer `start` with input `hidden` [B, N, D]: layers 0..start-1 pass through.

    Enter this before a PruningEngine so the engine's hooks land on the stand-ins and its layer-`start` hook sees
    the cached input (this context's hook on layer `start` is registered first).
    """
    originals = [layers[i] for i in range(start)]

    def inject(module: nn.Module, args: tuple, kwargs: dict):
        if args:
            return (hidden,) + tuple(args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    handle = layers[start].register_forward_pre_hook(inject, with_kwargs=True, prepend=True)
    try:
        for i, layer in enumerate(originals):
            layers[i] = _PassThrough(layer)
        yield
    finally:
        handle.remove()
        for i, layer in enumerate(originals):
            layers[i] = layer


def _kl_and_mismatch(ref_logp: Tensor, logits: Tensor) -> tuple[Tensor, Tensor]:
    """Per row KL(ref || pruned) and argmax disagreement. ref_logp [B, V], logits [B, V] -> ([B], [B])."""
    logq = torch.log_softmax(logits.float(), dim=-1)
    kl = (ref_logp.exp() * (ref_logp - logq)).sum(-1).clamp(min=0.0)
    return kl, (ref_logp.argmax(-1) != logq.argmax(-1)).float()


class Calibration:
    """Calibration prompts, the unpruned model's answer distribution on them, and cached layer inputs."""

    def __init__(self, loaded: LoadedModel, samples: Sequence[VQASample], *, batch_size: int = 32,
                 cache_dir: Optional[Path] = None, max_cached_layers: int = 4, mismatch_weight: float = 1.0,
                 progress: bool = False) -> None:
        if not samples:
            raise ObjectiveError("no calibration samples; check calibration (data preset) and n_calibration")
        if loaded.processor is None:
            raise ObjectiveError(f"model {loaded.name!r} has no processor to encode calibration prompts")
        self.loaded = loaded
        self.model = loaded.model
        self.layers = loaded.decoder_layers
        self.num_layers = len(self.layers)
        self.sample_ids = [s.sample_id for s in samples]
        self.mismatch_weight = float(mismatch_weight)
        self.max_cached_layers = int(max_cached_layers)
        self.counter = PassCounter(num_layers=self.num_layers)
        self.batches = [
            encode_batch(loaded.processor, list(samples[i:i + batch_size]), device=loaded.device, dtype=loaded.dtype)
            for i in range(0, len(samples), batch_size)
        ]
        self._states: dict[int, list[Tensor]] = {}  # layer -> per batch [B, N, D] input of that layer
        self.reference = self._reference(cache_dir, progress)  # per batch [B, vocab] log-probs

    @property
    def n(self) -> int:
        """Number of calibration prompts."""
        return len(self.sample_ids)

    def identity(self) -> dict[str, Any]:
        """What the cached reference depends on: the model's identity and the sample ids."""
        digest = hashlib.sha256("\n".join(self.sample_ids).encode()).hexdigest()[:16]
        return {"model": self.loaded.name, "source": str(self.loaded.source), "n": self.n, "sample_ids_sha256": digest}

    def _reference(self, cache_dir: Optional[Path], progress: bool) -> list[Tensor]:
        """Unpruned log-probs at the answer position per batch, from cache_dir/reference.pt when it matches.

        The file is read or made under a file lock, so the workers of a split search compute it once between them.
        """
        if cache_dir is None:
            return self._compute_reference(progress)
        path = Path(cache_dir) / REFERENCE_FILE
        ident = self.identity()
        with locked(path):
            if path.is_file():
                stored = torch.load(path, map_location="cpu")
                if stored.get("identity") == ident:
                    return [t.to(self.loaded.device) for t in stored["logp"]]
                log.info("%s was made for %s, not %s: recomputing", path, stored.get("identity"), ident)
            out = self._compute_reference(progress)
            atomic_write(path, lambda tmp: torch.save({"identity": ident, "logp": [t.cpu() for t in out]}, tmp))
        return out

    def _compute_reference(self, progress: bool) -> list[Tensor]:
        out = []
        with torch.inference_mode():
            for inputs in self._progress(self.batches, progress, "reference"):
                logits = self.model(**inputs, use_cache=False, logits_to_keep=1).logits[:, -1]
                self._count(inputs, [self.num_layers])
                out.append(torch.log_softmax(logits.float(), dim=-1))
        return out

    @staticmethod
    def _progress(items: Sequence[Any], enabled: bool, desc: str) -> Sequence[Any]:
        if not enabled:
            return items
        from tqdm.auto import tqdm

        return tqdm(items, desc=desc, leave=False)

    def _count(self, inputs: Mapping[str, Tensor], layers_run: Sequence[int]) -> None:
        rows = int(inputs["input_ids"].shape[0])
        self.counter.prompts += rows
        self.counter.layers += rows * sum(layers_run)

    def states(self, layer: int) -> list[Tensor]:
        """Per batch the input [B, N, D] of decoder `layer` in the unpruned model (computed once, then cached)."""
        if layer in self._states:
            self._states[layer] = self._states.pop(layer)  # most recently used last
            return self._states[layer]
        below = [c for c in self._states if c < layer]
        base = max(below) if below else None
        captured: list[Tensor] = []

        def capture(module: nn.Module, args: tuple, kwargs: dict) -> None:
            captured.append((args[0] if args else kwargs["hidden_states"]).detach())
            raise _StopForward

        with torch.inference_mode():
            for i, inputs in enumerate(self.batches):
                handle = self.layers[layer].register_forward_pre_hook(capture, with_kwargs=True)
                try:
                    if base is None:
                        self._forward(inputs, None)
                    else:
                        with replay_from(self.layers, base, self._states[base][i]):
                            self._forward(inputs, base)
                except _StopForward:
                    pass
                finally:
                    handle.remove()
                self._count(inputs, [layer - (base or 0)])
        self._states[layer] = captured
        while len(self._states) > max(self.max_cached_layers, 1):
            self._states.pop(next(iter(self._states)))
        return captured

    def _forward(self, inputs: Mapping[str, Tensor], start: Optional[int]) -> Tensor:
        """Logits [B, vocab] at the last position; from cached states (no vision tower) when start is given."""
        if start is None:
            out = self.model(**inputs, use_cache=False, logits_to_keep=1)
        else:
            out = self.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False,
                             logits_to_keep=1)
        return out.logits[:, -1]

    def fidelity(self, schedule: Schedule, scorer: str = "adaptinfer",
                 scorer_options: Optional[Mapping[str, Any]] = None, seed: int = 0) -> Fidelity:
        """The objective of `schedule` + `scorer` on the calibration set (module docstring)."""
        schedule.validate(num_layers=self.num_layers)
        if not schedule.stages:
            raise ObjectiveError(f"schedule {schedule.name!r} has no stages; the unpruned model's objective is 0")
        start = max(schedule.layers[0], 0)  # a stage before the LM (-1) still replays from layer 0's input
        if schedule.layers[0] < 0:
            raise ObjectiveError("a stage before the language model (layer -1) selects in the vision tower, which a "
                                 "replay from cached layer inputs skips; search stage layers >= 0")
        states = self.states(start)
        kls, mismatches = [], []
        with torch.inference_mode():
            for i, inputs in enumerate(self.batches):
                with replay_from(self.layers, start, states[i]), \
                        PruningEngine(self.model, schedule, scorer=scorer, scorer_options=dict(scorer_options or {}),
                                      seed=seed):
                    logits = self._forward(inputs, start)
                self._count(inputs, [self.num_layers - start])
                kl, mm = _kl_and_mismatch(self.reference[i], logits)
                kls.append(kl)
                mismatches.append(mm)
        kl = float(torch.cat(kls).mean())
        mismatch = float(torch.cat(mismatches).mean())
        return Fidelity(objective=kl + self.mismatch_weight * mismatch, kl=kl, mismatch=mismatch, n=self.n)


def calibration_samples(data: Mapping[str, Any], n: int) -> list[VQASample]:
    """The first `n` samples of a data preset (configs/data/*.yaml mapping or the records manifest's `data`)."""
    from vlm.tasks.base import build_task, data_spec

    spec = data_spec({k: v for k, v in dict(data).items() if k != "limit"} | {"limit": None})
    task = build_task(spec["task"], **spec["options"])
    samples = list(task.samples(spec["split"], limit=n))
    if len(samples) < n:
        log.warning("calibration data %s has %d samples, fewer than n_calibration=%d", spec["name"], len(samples), n)
    return samples


__all__ = ["Calibration", "Fidelity", "OBJECTIVE_DOC", "OBJECTIVE_NAME", "ObjectiveError", "PassCounter",
           "calibration_samples", "replay_from"]
