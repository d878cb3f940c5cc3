"""Attention rows at chosen layers, computed from the layer's own post-RoPE q and k while SDPA/flash make the output.

The probe registers a thin wrapper around the model's attention function with transformers'
`AttentionInterface` (and the base's mask function with `AttentionMaskInterface`, or causal masking
would silently disappear) and, while the context is open, gives each probed attention module a copy of its
config that names the wrapper; every other layer keeps calling the stock function directly (no wrapper, no
per-layer Python), and the model's own config, which builds the masks, is untouched. On exit the modules get
their configs back. The wrapper calls the stock function for the layer output; at probed modules it also
computes `softmax(q[rows] K^T * scale + mask)` in float32 for the requested query rows over all keys.
"""
from __future__ import annotations

import copy
import sys
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence, Union

import torch
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from vlm.models import find_decoder_layers

PROBE_PREFIX = "probe_"
_SITE_ATTR = "_attention_probe_site"


@dataclass
class ProbeCall:
    """What a row selector knows when a probed attention module runs."""

    site: Any  # the key the site was registered under (an int for language-model layers)
    module: nn.Module
    batch: int
    q_len: int
    kv_len: int


# ([B, R] long positions in the query axis, or one slice of them shared by the rows; [B, R] bool valid or None)
RowIndex = tuple[Union[Tensor, slice], Union[Tensor, None]]
RowSelector = Union[None, Tensor, Callable[[ProbeCall], Union[RowIndex, None]]]
RowsCallback = Callable[[ProbeCall, Tensor, Tensor, Union[Tensor, None]], None]


class ProbeError(RuntimeError):
    """The probe cannot be attached to this model as asked."""


def probe_name(base: str) -> str:
    """The registered name of the probing wrapper around attention implementation `base`."""
    return base if base.startswith(PROBE_PREFIX) else f"{PROBE_PREFIX}{base}"


def _base_function(base: str, module: nn.Module) -> Callable[..., Any]:
    if base == "eager":
        eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if eager is None:
            raise ProbeError(f"{type(module).__name__} has no eager_attention_forward to wrap")
        return eager
    return ALL_ATTENTION_FUNCTIONS[base]


def _register(base: str) -> str:
    """Register the wrapper for `base` (idempotent) and return its name."""
    name = probe_name(base)
    if name in ALL_ATTENTION_FUNCTIONS._global_mapping:
        return name

    def probing_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask, **kwargs):
        site = getattr(module, _SITE_ATTR, None)
        if site is not None:
            site(module, query, key, attention_mask, kwargs.get("scaling"))
        return _base_function(base, module)(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(name, probing_attention)
    mask_base = base if base in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping else "sdpa"
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS._global_mapping[mask_base])
    return name


def allowed_keys(
    attention_mask: Tensor | None, rows: Tensor, batch: int, q_len: int, kv_len: int, is_causal: bool = True
) -> Tensor:
    """Which keys each selected query row may attend to: [B, 1 or H, R, K] bool.

    attention_mask: the mask the attention function received: None (causal only, or nothing in decode),
    4-D bool (True = attend) or additive float [B, 1|H, Q, K], or 2-D [B, K] padding (flash attention).
    rows: [B, R] query positions.
    """
    device = rows.device
    if attention_mask is not None and attention_mask.dim() == 4:
        m = attention_mask
        if m.shape[0] == 1 and batch > 1:
            m = m.expand(batch, *m.shape[1:])
        idx = rows[:, None, :, None].expand(batch, m.shape[1], rows.shape[1], m.shape[-1])
        m = m.gather(2, idx)
        if m.dtype != torch.bool:
            m = m > torch.finfo(m.dtype).min / 2
        return m[..., :kv_len] if m.shape[-1] >= kv_len else m
    offset = kv_len - q_len  # queries sit at the end of the key axis (cache)
    keys = torch.arange(kv_len, device=device)
    allowed = (keys <= ((rows + offset) if offset else rows)[:, :, None]) if is_causal else torch.ones(
        batch, rows.shape[1], kv_len, dtype=torch.bool, device=device
    )
    if attention_mask is not None and attention_mask.dim() == 2:
        allowed = allowed & attention_mask[:, None, -kv_len:].bool()
    return allowed[:, None]  # [B, 1, R, K]


def attention_rows(
    query: Tensor, key: Tensor, attention_mask: Tensor | None, rows: Tensor | slice, scaling: float | None = None,
    is_causal: bool = True,
) -> Tensor:
    """Post-softmax attention of the selected query rows over all keys, in float32.

    query: [B, H, Q, D] post-RoPE; key: [B, Hkv, K, D] post-RoPE (GQA keys are repeated to H heads);
    rows: [B, R] positions in the query axis, or one slice of them shared by the rows (a view instead of a gather).
    Returns [B, H, R, K]; a row with no allowed key is all zeros.
    """
    batch, heads, q_len, dim = query.shape
    kv_len = key.shape[2]
    scale = scaling if scaling is not None else dim**-0.5
    if isinstance(rows, slice):
        if attention_mask is None and is_causal:
            return _slice_rows(query, key, rows, scale)
        rows = torch.arange(q_len, device=query.device)[rows].expand(batch, -1)
    q = query.gather(2, rows.view(batch, 1, rows.shape[1], 1).expand(batch, heads, rows.shape[1], dim))  # [B, H, R, D]
    q = q.float() if q.dtype != torch.float32 else q
    rows_n = rows.shape[1]
    scores = _scaled_scores(q, key, scale)  # [B, H, R, K]
    if attention_mask is None and is_causal:  # causal only (no padding): the common batch-1 case, in fewer ops
        offset = kv_len - q_len
        last_key = rows.view(batch, 1, rows_n, 1)
        future = torch.arange(kv_len, device=rows.device) > ((last_key + offset) if offset else last_key)
        return torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)  # key 0 is always allowed: no NaN
    allowed = allowed_keys(attention_mask, rows, batch, q_len, kv_len, is_causal)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.nan_to_num(torch.softmax(scores, dim=-1), nan=0.0)


def _scaled_scores(q: Tensor, k: Tensor, scale: float, bias: Tensor | None = None) -> Tensor:
    """q [B, H, R, D] float32 against k [B, Hkv, K, D] (GQA keys repeated to H heads): [B, H, R, K] * scale, as one
    batched matmul over (B * H), which dispatches fewer ops than a 4-D matmul; with `bias` [R, K], bias + that, in the
    same op (`baddbmm`)."""
    batch, heads, rows_n, dim = q.shape
    k = _head_keys(k, heads)
    kv_len = k.shape[2]
    q3, k3 = q.reshape(batch * heads, rows_n, dim), k.reshape(batch * heads, kv_len, dim).transpose(1, 2)
    if bias is not None:
        return torch.baddbmm(bias, q3, k3, alpha=scale).view(batch, heads, rows_n, kv_len)
    scores = torch.bmm(q3, k3).view(batch, heads, rows_n, kv_len)
    return scores * scale if scale != 1.0 else scores


def _head_keys(key: Tensor, heads: int) -> Tensor:
    """key [B, Hkv, K, D] in float32, GQA keys repeated to `heads` heads: [B, H, K, D]."""
    k = key.float() if key.dtype != torch.float32 else key
    return k.repeat_interleave(heads // k.shape[1], dim=1) if k.shape[1] != heads else k


def _slice_rows(query: Tensor, key: Tensor, rows: slice, scale: float) -> Tensor:
    """`attention_rows` for one slice of query rows shared by the batch, causal masking only (no padding): one
    batched matmul over (B * H) that adds the causal mask as a 0 / -inf bias (`baddbmm`, cheaper than a
    `masked_fill` of the scores), then the softmax."""
    q_len, kv_len = query.shape[2], key.shape[2]
    q = query[:, :, rows]  # [B, H, R, D]
    q = q.float() if q.dtype != torch.float32 else q
    start = range(q_len)[rows].start + kv_len - q_len  # the first row's key position (queries end the key axis)
    future = _causal_bias(q.shape[2], kv_len, start, q.device)
    return torch.softmax(_scaled_scores(q, key, scale, future), dim=-1)  # key 0 is always allowed: no NaN


_BIASES: dict[tuple, Tensor] = {}  # (rows, first row's key position - keys, device) -> the widest bias made so far
_MAX_BIASES = 16


def _causal_bias(rows_n: int, kv_len: int, start: int, device: torch.device) -> Tensor:
    """[rows_n, kv_len] float32: 0 where key j <= start + r (row r may attend), -inf after.

    Kept per (rows_n, start - kv_len, device) at the widest kv_len seen, and sliced: a bias W wide made for a first row
    at W - kv_len + start gives this one as its last kv_len columns. The stages of one prefill (the same text rows at
    the end of a sequence that shrinks), and prompts with the same text length, share one tensor: two kernels fewer a
    stage, which counts where batch-1 prefill waits for the host. Not cached inside torch.compile (the graph makes
    it)."""
    key, cached = (rows_n, start - kv_len, device), not torch.compiler.is_compiling()
    bias = _BIASES.get(key) if cached else None
    if bias is None or bias.shape[1] < kv_len:
        bias = torch.full((rows_n, kv_len), float("-inf"), device=device).triu_(start + 1)
        if cached:
            if len(_BIASES) >= _MAX_BIASES:
                _BIASES.pop(next(iter(_BIASES)))  # the oldest
            _BIASES[key] = bias
    width = bias.shape[1]
    return bias if width == kv_len else bias[:, width - kv_len:]


class AttentionProbe:
    """Context manager: post-softmax attention rows at chosen attention modules, SDPA still computing outputs.

    sites: language-model decoder layer indices, and/or a mapping {name: attention module} (e.g. a
    vision-tower layer's self_attn). rows: None (all query rows), a [B, R] long tensor (optionally with
    `row_mask`), or a callable(ProbeCall) -> (index [B, R], mask [B, R] | None) or None to skip that call.
    on_rows(call, rows [B, H, R, K], index [B, R], mask) receives each result; without it the latest result
    per site is kept in `self.rows[site]` (with `self.index[site]`). Decode steps (one query) are skipped
    unless include_decode=True.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[int] = (),
        *,
        modules: Mapping[Any, nn.Module] | None = None,
        rows: RowSelector = None,
        row_mask: Tensor | None = None,
        on_rows: RowsCallback | None = None,
        include_decode: bool = False,
    ) -> None:
        self.model = model
        decoder_layers = find_decoder_layers(model)
        if decoder_layers is None:
            raise ProbeError(f"cannot find decoder layers in {type(model).__name__}; not a supported model family (vlm.arch)")
        self.sites: dict[Any, nn.Module] = {}
        for layer in layers:
            if not 0 <= int(layer) < len(decoder_layers):
                raise ProbeError(f"layer {layer} is out of range; the language model has layers 0..{len(decoder_layers) - 1}")
            self.sites[int(layer)] = decoder_layers[int(layer)].self_attn
        for name, module in (modules or {}).items():
            if not hasattr(module, "config"):
                raise ProbeError(f"module {name!r} ({type(module).__name__}) has no config: not a transformers attention module")
            self.sites[name] = module
        self.row_selector = rows
        self.row_mask = row_mask
        self.on_rows = on_rows
        self.include_decode = include_decode
        self.rows: dict[Any, Tensor] = {}
        self.index: dict[Any, Tensor] = {}
        self._saved_config: list[tuple[nn.Module, Any]] = []  # (module, its own config) while attached
        self._active = False

    # -- context management -------------------------------------------------------------------------
    def __enter__(self) -> "AttentionProbe":
        if self._active:
            raise ProbeError("this AttentionProbe is already attached")
        try:
            for site, module in self.sites.items():
                config = module.config
                base = config._attn_implementation or "eager"
                if base.startswith(PROBE_PREFIX):
                    raise ProbeError("another AttentionProbe is attached to this model; nest engines, not probes")
                probed = copy.copy(config)  # this module alone calls the wrapper
                probed._attn_implementation = _register(base)
                self._saved_config.append((module, config))
                module.config = probed
                setattr(module, _SITE_ATTR, self._make_site(site))
        except BaseException:
            self._detach()
            raise
        self._active = True
        return self

    def __exit__(self, *exc: Any) -> None:
        self._detach()

    def _detach(self) -> None:
        for module in self.sites.values():
            if hasattr(module, _SITE_ATTR):
                delattr(module, _SITE_ATTR)
        for module, config in reversed(self._saved_config):
            module.config = config
        self._saved_config.clear()
        self._active = False

    # -- the work at a probed module -------------------------------------------------------------------
    def _make_site(self, site: Any) -> Callable[..., None]:
        def run(module: nn.Module, query: Tensor, key: Tensor, attention_mask: Tensor | None, scaling: float | None):
            batch, _, q_len, _ = query.shape
            if q_len == 1 and not self.include_decode:
                return
            call = ProbeCall(site=site, module=module, batch=batch, q_len=q_len, kv_len=key.shape[2])
            selected = self._select_rows(call, query.device)
            if selected is None:
                return
            index, mask = selected
            if query.requires_grad or key.requires_grad:  # never build autograd history for the rows
                with torch.no_grad():
                    rows = attention_rows(query.detach(), key.detach(), attention_mask, index, scaling,
                                          getattr(module, "is_causal", True))
            else:
                rows = attention_rows(query, key, attention_mask, index, scaling, getattr(module, "is_causal", True))
            if mask is not None:
                rows = rows * mask[:, None, :, None]
            if self.on_rows is not None:
                self.on_rows(call, rows, index, mask)
            else:
                self.rows[site] = rows
                self.index[site] = index

        return run

    def _select_rows(self, call: ProbeCall, device: torch.device) -> RowIndex | None:
        sel = self.row_selector
        if sel is None:
            index = torch.arange(call.q_len, device=device).expand(call.batch, call.q_len)
            return index, None
        if isinstance(sel, Tensor):
            return sel.to(device), (self.row_mask.to(device) if self.row_mask is not None else None)
        return sel(call)
