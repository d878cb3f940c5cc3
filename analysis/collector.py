"""Per-sample text-to-vision attention at every decoder layer, reduced inside the probe callback.

`AttentionCollector` wraps `vlm.probe.AttentionProbe` over the chosen decoder layers (all by default).
The probe computes the text rows `A[b, h, t, :]` (float32, post-softmax, from the layer's post-RoPE
q/k) while SDPA keeps computing the layer outputs; the collector reduces them at once to

- `t2v [B, L, V]`: attention from the text tokens to each vision token, reduced over heads and text
  rows by the named reducer (see `REDUCERS`); in a padded batch of images of different sizes (rows with
  different vision counts V_b) it is [B, L, Vmax], zero after each row's own V_b, and `vision_counts` says V_b;
- `vision_share [B, L]`: mean over heads and real text rows of the attention mass on vision tokens;
- `prior_entropy [B, L]`: entropy (nats) over text tokens of the normalised AdaptInfer text prior
  `w[h, :] / sum_j w[h, j]`, mean over heads.

"Text" is every real token after the vision span (`vlm.layout.TokenLayout`), the system prompt
excluded. Only the current batch is held (on the model's device) until `consume()` hands it back on
the CPU, so memory does not grow with the number of samples.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from pruning import scorers
from vlm.arch import for_model
from vlm.errors import UserError
from vlm.layout import TokenLayout
from vlm.models import LoadedModel, find_decoder_layers
from vlm.probe import AttentionProbe, ProbeCall

SCALAR_NAMES: tuple[str, ...] = ("vision_share", "prior_entropy")
_EPS = 1e-30


class CollectorError(RuntimeError):
    """The collector was used out of order or on inputs it cannot lay out; the message says what to do."""


@dataclass
class BatchRecords:
    """What the collector recorded for one batch, on the CPU, in float32."""

    t2v: Tensor  # [B, L, V] text-to-vision attention per collected layer ([B, L, Vmax], zero-padded, when ragged)
    scalars: dict[str, Tensor]  # name -> [B, L]
    layers: list[int]  # the decoder layer each index of the L axis stands for
    vision_counts: tuple[int, ...] = ()  # vision tokens of each row (t2v[b, :, :V_b] is row b's own)

    def __len__(self) -> int:
        return int(self.t2v.shape[0])


# -- pieces of the text rows ------------------------------------------------------------------------------
def vision_columns(rows: Tensor, layout: TokenLayout) -> Tensor:
    """Attention of the text rows on the vision tokens: rows [B, H, T, K] -> [B, H, T, V] (zero at a ragged
    layout's filler columns)."""
    b, h, t, _ = rows.shape
    index = layout.vision_index.to(rows.device)[:, None, None, :].expand(b, h, t, layout.max_vision)
    columns = rows.gather(-1, index)
    if layout.vision_valid is not None:
        columns = columns * layout.vision_valid.to(rows.device)[:, None, None, :]
    return columns


def text_prior(rows: Tensor, layout: TokenLayout) -> Tensor:
    """AdaptInfer text weights `w[b, h, j] = sum_i S[i, j]`, `S = T + T^T - diag(T)`: rows [B, H, T, K] -> [B, H, T].

    `pruning.scorers.text_prior` (the computation the `adaptinfer` scorer uses) on the layout's text tokens.
    """
    return scorers.text_prior(rows, layout.text_index.to(rows.device), layout.text_mask.to(rows.device))


def _row_counts(layout: TokenLayout, device: torch.device) -> Tensor:
    """Real text rows per sample, as float: [B]."""
    return layout.text_mask.to(device).sum(-1).clamp_min(1).float()


# -- reducers: (text rows [B, H, T, K], layout) -> t2v [B, V] ----------------------------------------------------
def reduce_mean(rows: Tensor, layout: TokenLayout) -> Tensor:
    """Mean over heads and real text rows of the attention on each vision token: -> [B, V]."""
    vis = vision_columns(rows, layout)  # [B, H, T, V]; padding rows are zero (the probe masks them)
    vis = vis * layout.text_mask.to(rows.device)[:, None, :, None]
    return vis.sum(dim=(1, 2)) / (rows.shape[1] * _row_counts(layout, rows.device))[:, None]


def reduce_last(rows: Tensor, layout: TokenLayout) -> Tensor:
    """Head-mean attention of the last real token (the one that predicts the next) on each vision token: -> [B, V]."""
    vis = vision_columns(rows, layout)  # [B, H, T, V]
    last = (layout.text_mask.to(rows.device).sum(-1) - 1).clamp_min(0)  # [B]: the last real token is the last text row
    b, h, _, v = vis.shape
    picked = vis.gather(2, last[:, None, None, None].expand(b, h, 1, v))  # [B, H, 1, V]
    return picked[:, :, 0].mean(1)


def reduce_adaptinfer(rows: Tensor, layout: TokenLayout, prior: Tensor | None = None) -> Tensor:
    """AdaptInfer prior-weighted attention `sum_h sum_j w[h, j] A[h, j, v] / sum_h sum_j w[h, j]`: -> [B, V].

    The numerator is the paper's vision score; dividing by the total prior weight makes layers (and
    prompts of different lengths) comparable and does not change the per-layer ranking of vision tokens.
    """
    w = text_prior(rows, layout) if prior is None else prior  # [B, H, T]
    score = scorers.prior_weighted_vision(rows, w, layout.vision_index.to(rows.device))  # [B, V]
    return score / w.sum(dim=(1, 2)).clamp_min(_EPS)[:, None]


REDUCERS: dict[str, Callable[[Tensor, TokenLayout], Tensor]] = {
    "mean": reduce_mean,
    "last": reduce_last,
    "adaptinfer": reduce_adaptinfer,
}


# -- per-layer scalars -------------------------------------------------------------------------------------
def vision_share(rows: Tensor, layout: TokenLayout) -> Tensor:
    """Mean over heads and real text rows of the attention mass on vision tokens: rows [B, H, T, K] -> [B]."""
    mass = vision_columns(rows, layout).sum(-1)  # [B, H, T]
    mass = mass * layout.text_mask.to(rows.device)[:, None, :]
    return mass.sum(dim=(1, 2)) / (rows.shape[1] * _row_counts(layout, rows.device))


def prior_entropy(rows: Tensor, layout: TokenLayout, prior: Tensor | None = None) -> Tensor:
    """Entropy (nats) over text tokens of the normalised text prior, mean over heads: rows [B, H, T, K] -> [B]."""
    w = text_prior(rows, layout) if prior is None else prior  # [B, H, T]
    p = w / w.sum(-1, keepdim=True).clamp_min(_EPS)
    terms = torch.where(p > 0, p * torch.log(p.clamp_min(_EPS)), torch.zeros_like(p))
    return -terms.sum(-1).mean(-1)


def reduce_rows(rows: Tensor, layout: TokenLayout, reducer: str) -> tuple[Tensor, dict[str, Tensor]]:
    """All the collector records from one layer's text rows [B, H, T, K]: (t2v [B, V], {scalar: [B]})."""
    if reducer not in REDUCERS:
        raise CollectorError(f"unknown reducer {reducer!r}; choose one of {sorted(REDUCERS)}")
    rows = rows.float()
    prior = text_prior(rows, layout)  # [B, H, T]
    t2v = reduce_adaptinfer(rows, layout, prior) if reducer == "adaptinfer" else REDUCERS[reducer](rows, layout)
    if layout.vision_valid is not None:  # each row's own vision tokens, zeros after them
        t2v = t2v * layout.vision_valid.to(t2v.device)
    scalars = {"vision_share": vision_share(rows, layout), "prior_entropy": prior_entropy(rows, layout, prior)}
    return t2v, scalars


# -- the context manager -------------------------------------------------------------------------------------
class AttentionCollector:
    """Context manager: per sample, `t2v [L, V]` and per-layer scalars at every (chosen) decoder layer.

    Use::

        with AttentionCollector(loaded, reducer="adaptinfer") as collector:
            for inputs in batches:
                model(**inputs)                 # the layout is read from input_ids by a pre-hook
                records = collector.consume()   # BatchRecords: t2v [B, L, V], scalars {name: [B, L]}

    or call `collector.begin_batch(layout)` before a forward that has no `input_ids` (inputs_embeds).
    A forward pass must be followed by `consume()` before the next one, so at most one batch is held.
    """

    def __init__(
        self,
        model: Any,
        reducer: str = "mean",
        layers: Sequence[int] | None = None,
        *,
        image_token_id: int | None = None,
    ) -> None:
        self.model: nn.Module = model.model if isinstance(model, LoadedModel) else model
        if image_token_id is None:
            try:
                image_token_id = for_model(self.model).image_token_id
            except (UserError, AttributeError, TypeError):
                raise CollectorError(
                    f"{type(self.model).__name__} has no image token id (not a supported model family); pass "
                    "image_token_id= explicitly"
                ) from None
        self.image_token_id = int(image_token_id)
        if reducer not in REDUCERS:
            raise CollectorError(f"unknown reducer {reducer!r}; choose one of {sorted(REDUCERS)}")
        self.reducer = reducer
        decoder_layers = find_decoder_layers(self.model)
        if decoder_layers is None:
            raise CollectorError(
                f"cannot find decoder layers in {type(self.model).__name__}; not a supported model family (vlm.arch)"
            )
        n_layers = len(decoder_layers)
        chosen = list(range(n_layers)) if layers is None else [int(l) for l in layers]
        bad = [l for l in chosen if not 0 <= l < n_layers]
        if bad or not chosen or len(set(chosen)) != len(chosen):
            raise CollectorError(
                f"layers={list(layers) if layers is not None else None} is not a non-empty list of distinct decoder "
                f"layers in 0..{n_layers - 1}"
            )
        self.layers: list[int] = sorted(chosen)
        self._slot = {layer: i for i, layer in enumerate(self.layers)}
        self._probe: AttentionProbe | None = None
        self._hook: Any = None
        self._layout: TokenLayout | None = None
        self._explicit = False
        self._t2v: Tensor | None = None  # [B, L, V] on the model's device
        self._scalars: dict[str, Tensor] = {}  # name -> [B, L]
        self._filled: list[bool] = []
        self._forward_signature = inspect.signature(self.model.forward)

    # -- context management ------------------------------------------------------------------------------
    def __enter__(self) -> "AttentionCollector":
        if self._probe is not None:
            raise CollectorError("this AttentionCollector is already attached")
        probe = AttentionProbe(self.model, layers=self.layers, rows=self._select_rows, on_rows=self._on_rows)
        probe.__enter__()
        try:
            self._hook = self.model.register_forward_pre_hook(self._pre_forward, with_kwargs=True)
        except BaseException:
            probe.__exit__(None, None, None)
            raise
        self._probe = probe
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self._probe is not None:
            self._probe.__exit__(*exc)
            self._probe = None
        self._clear()

    # -- batches -----------------------------------------------------------------------------------------
    def begin_batch(self, layout: TokenLayout) -> None:
        """Use `layout` for the next forward pass (instead of deriving it from input_ids)."""
        self._start(layout)
        self._explicit = True

    @property
    def pending(self) -> bool:
        """Whether a batch has been laid out or recorded and not yet consumed."""
        return self._layout is not None

    def buffered_samples(self) -> int:
        """Samples held by the collector right now (0 after `consume()`)."""
        return 0 if self._t2v is None else int(self._t2v.shape[0])

    def consume(self) -> BatchRecords:
        """Hand back the current batch's records (CPU float32) and forget them."""
        if self._layout is None or self._t2v is None:
            raise CollectorError("no batch to consume; run a forward pass inside the collector first")
        missing = [layer for layer, done in zip(self.layers, self._filled) if not done]
        if missing:
            self._clear()
            raise CollectorError(
                f"layers {missing} produced no attention rows for this batch; run one full forward pass (prefill) "
                "per batch inside the collector, without a cache from earlier steps"
            )
        records = BatchRecords(
            t2v=self._t2v.to("cpu", torch.float32, copy=True),  # a copy: never the collector's own buffer
            scalars={name: value.to("cpu", torch.float32, copy=True) for name, value in self._scalars.items()},
            layers=list(self.layers),
            vision_counts=tuple(self._layout.vision_counts),
        )
        self._clear()
        return records

    def discard(self) -> None:
        """Forget the current batch (e.g. after a forward pass that raised)."""
        self._clear()

    def _start(self, layout: TokenLayout) -> None:
        """Allocate the batch buffers for `layout`."""
        if self._layout is not None:
            raise CollectorError(
                "the previous batch was not consumed; call collector.consume() after each forward pass"
            )
        device = _model_device(self.model)
        b, v, n_layers = layout.batch_size, layout.max_vision, len(self.layers)
        self._layout = layout
        self._t2v = torch.zeros(b, n_layers, v, dtype=torch.float32, device=device)
        self._scalars = {name: torch.zeros(b, n_layers, dtype=torch.float32, device=device) for name in SCALAR_NAMES}
        self._filled = [False] * n_layers

    def _clear(self) -> None:
        self._layout = None
        self._explicit = False
        self._t2v = None
        self._scalars = {}
        self._filled = []

    # -- hooks -------------------------------------------------------------------------------------------
    def _pre_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Lay out each prefill batch from its input_ids (decode steps, one token each, are left alone)."""
        if self._explicit:
            return
        try:
            bound = self._forward_signature.bind_partial(*args, **kwargs).arguments
        except TypeError:
            bound = dict(kwargs)
        input_ids = bound.get("input_ids")
        if input_ids is None:
            raise CollectorError(
                "the forward pass has no input_ids to find the image tokens in; call collector.begin_batch(layout) "
                "before a forward with inputs_embeds"
            )
        if input_ids.shape[-1] == 1:
            return
        layout = TokenLayout.from_batch(input_ids, bound.get("attention_mask"), self.image_token_id)
        self._start(layout)

    def _select_rows(self, call: ProbeCall) -> tuple[Tensor, Tensor] | None:
        """The text rows of the current layout: ([B, T] positions, [B, T] validity)."""
        layout = self._layout
        if layout is None:
            raise CollectorError(
                f"layer {call.site} ran with no batch layout; forward with input_ids, or call begin_batch(layout)"
            )
        if call.q_len != layout.seq_len or call.batch != layout.batch_size:
            raise CollectorError(
                f"layer {call.site} saw a query block of [{call.batch}, {call.q_len}] but the layout is "
                f"[{layout.batch_size}, {layout.seq_len}]; the collector records one prefill per batch"
            )
        device = _model_device(self.model)
        return layout.text_index.to(device), layout.text_mask.to(device)

    def _on_rows(self, call: ProbeCall, rows: Tensor, index: Tensor, mask: Tensor | None) -> None:
        """Reduce one layer's text rows [B, H, T, K] into the batch buffers at once."""
        assert self._layout is not None and self._t2v is not None
        slot = self._slot[call.site]
        t2v, scalars = reduce_rows(rows, self._layout, self.reducer)
        self._t2v[:, slot] = t2v
        for name, value in scalars.items():
            self._scalars[name][:, slot] = value
        self._filled[slot] = True


def _model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a parameterless module)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


__all__ = [
    "AttentionCollector",
    "BatchRecords",
    "CollectorError",
    "REDUCERS",
    "SCALAR_NAMES",
    "prior_entropy",
    "reduce_adaptinfer",
    "reduce_last",
    "reduce_mean",
    "reduce_rows",
    "text_prior",
    "vision_share",
]
