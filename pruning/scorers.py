"""Vision-token scorers by name: each maps attention rows (or hidden states) and the token layout to scores [B, V].

A new scorer is one function and one registration::

    @register_scorer("mine", rows="text", options={"alpha": 1.0})
    def mine(ctx: ScoringContext, alpha: float) -> Tensor: ...  # [B, V], higher = keep

`rows` tells the engine which query rows to probe: "text" (ctx.query_index == ctx.text_index), "last"
(R = 1, the last real token) or "none" (no attention rows; the scorer uses hidden states or nothing).
`options` declares the scorer's options and their defaults; unknown options are an error.
Selection (`select`) is top-k, returned in original order. VisionZip is not an attention-row scorer: it
selects before the language model with `visionzip_select`.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

ROW_KINDS = ("text", "last", "none")

# VisionZip's published split of 64 tokens: 54 dominant + 10 contextual (also 108 + 20 and 162 + 30).
VISIONZIP_DOMINANT = 54
VISIONZIP_CONTEXTUAL = 10


@dataclass
class ScoringContext:
    """Everything a scorer may read at a stage layer; tensors index the current (possibly pruned) sequence."""

    attn: Tensor | None  # [B, H, R, K] float32 post-softmax attention of R query rows over all K keys present
    query_index: Tensor  # [B, R] long: positions (in the current sequence) of those query rows
    query_mask: Tensor  # [B, R] bool: valid rows (False = padding filler)
    vision_index: Tensor  # [B, V] long: positions of the current vision tokens (ascending)
    text_index: Tensor  # [B, T] long: positions of the text tokens (after the vision span), padded
    text_mask: Tensor  # [B, T] bool
    key_mask: Tensor  # [B, K] bool: keys that are real tokens (False = padding)
    generators: list[torch.Generator] | None = None  # one per row, for scorers registered with seeded=True
    hidden_states: Tensor | None = None  # [B, K, D] the stage layer's output (input of layer l+1)
    next_layer: nn.Module | None = None  # decoder layer l+1 (.input_layernorm, .self_attn.{q_proj,k_proj})
    position_embeddings: tuple[Tensor, Tensor] | None = None  # (cos, sin) [B, K, head_dim] for the current tokens
    options: dict = field(default_factory=dict)  # per-scorer options from config


ScorerFn = Callable[..., Tensor]


@dataclass(frozen=True)
class ScorerSpec:
    """A registered scorer: its function, the query rows it needs and its options with defaults."""

    name: str
    fn: ScorerFn
    rows: str
    options: dict
    seeded: bool = False  # draws random numbers: the engine gives it ctx.generators, one per row


_REGISTRY: dict[str, ScorerSpec] = {}


def register_scorer(
    name: str, rows: str, options: dict[str, Any] | None = None, replace: bool = False, seeded: bool = False
) -> Callable[[ScorerFn], ScorerFn]:
    """Decorator: register `fn(ctx, **options) -> [B, V]` under `name`, needing query rows `rows`.

    `seeded=True`: the scorer draws random numbers from `ctx.generators` (one generator per row, seeded by the
    engine from its seed and the row's own content, so a sample gets the same draws at any batch size or position).
    """
    if rows not in ROW_KINDS:
        raise ValueError(f"rows = {rows!r} for scorer {name!r}: must be one of {list(ROW_KINDS)}")

    def decorate(fn: ScorerFn) -> ScorerFn:
        if name in _REGISTRY and not replace:
            raise ValueError(f"scorer {name!r} is already registered (pass replace=True to override it)")
        _REGISTRY[name] = ScorerSpec(name=name, fn=fn, rows=rows, options=dict(options or {}), seeded=seeded)
        return fn

    return decorate


def get_scorer(name: str) -> ScorerSpec:
    """The registered scorer `name`; KeyError lists the available ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"scorer = {name!r}: unknown; available scorers are {available_scorers()}") from None


def available_scorers() -> list[str]:
    """Names of the registered attention/hidden-state scorers (VisionZip is separate: visionzip_select)."""
    return sorted(_REGISTRY)


def scorer_rows(name: str) -> str:
    """Which query rows the scorer needs: "text", "last" or "none"."""
    return get_scorer(name).rows


def _check_context(spec: ScorerSpec, ctx: ScoringContext) -> None:
    b, v = ctx.vision_index.shape
    if ctx.text_index.shape != ctx.text_mask.shape:
        raise ValueError(f"text_index {tuple(ctx.text_index.shape)} and text_mask {tuple(ctx.text_mask.shape)} differ")
    if spec.rows == "none":
        return
    if ctx.attn is None:
        raise ValueError(f"scorer {spec.name!r} needs ctx.attn [B, H, R, K] (rows={spec.rows!r}), got None")
    if ctx.attn.dim() != 4 or ctx.attn.shape[0] != b:
        raise ValueError(f"ctx.attn has shape {tuple(ctx.attn.shape)}: must be [B={b}, H, R, K]")
    rows, keys = ctx.attn.shape[2], ctx.attn.shape[3]
    if ctx.key_mask.shape != (b, keys):
        raise ValueError(f"ctx.key_mask has shape {tuple(ctx.key_mask.shape)}: must be [B={b}, K={keys}]")
    if spec.rows == "last" and rows != 1:
        raise ValueError(f"scorer {spec.name!r} reads the last token's row: ctx.attn must have R = 1, got R = {rows}")
    if spec.rows == "text":
        t = ctx.text_index.shape[1]
        if rows != t:
            raise ValueError(f"scorer {spec.name!r} reads the text rows: ctx.attn has R = {rows}, text_index has T = {t}")
        same = None if ctx.query_index is ctx.text_index else (ctx.query_index == ctx.text_index) | ~ctx.text_mask
        if same is not None and not bool(same.all()):  # a value check waits for the device: skipped when identical
            raise ValueError(f"scorer {spec.name!r}: ctx.query_index must equal ctx.text_index on the valid text rows")


def score(name: str, ctx: ScoringContext) -> Tensor:
    """Scores [B, V] float32 (higher = keep) of the current vision tokens by the scorer `name`."""
    spec = get_scorer(name)
    unknown = sorted(set(ctx.options) - set(spec.options))
    if unknown:
        raise ValueError(
            f"options {unknown} are unknown to scorer {name!r}; allowed options are {sorted(spec.options)}"
        )
    _check_context(spec, ctx)
    out = spec.fn(ctx, **{**spec.options, **ctx.options})
    expected = tuple(ctx.vision_index.shape)
    if tuple(out.shape) != expected:
        raise RuntimeError(f"scorer {name!r} returned shape {tuple(out.shape)}, expected [B, V] = {expected}")
    return out.float()


def select(scores: Tensor, k: int) -> Tensor:
    """Top-k indices [B, k] into the vision axis of `scores` [B, V], ascending; ties go to the earlier token.

    NaN scores rank lowest.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores has shape {tuple(scores.shape)}: must be [B, V]")
    v = scores.shape[1]
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= v:
        raise ValueError(f"k = {k!r}: must be an int in 0..{v} (the number of vision tokens)")
    clean = scores.float().masked_fill(torch.isnan(scores), -math.inf)
    order = torch.sort(clean, dim=-1, descending=True, stable=True).indices  # [B, V] equal scores keep index order
    return order[:, :k].sort(dim=-1).values


# ------------------------------------------------------------------------- attention helpers
def _valid_rows(attn: Tensor, row_mask: Tensor) -> Tensor:
    """attn [B, H, R, K] with invalid rows set to 0 (by selection, so NaN/inf in filler rows cannot leak)."""
    return torch.where(row_mask[:, None, :, None], attn.float(), torch.zeros((), dtype=torch.float32, device=attn.device))


def _columns(attn: Tensor, index: Tensor) -> Tensor:
    """attn[:, :, :, index] per row: [B, H, R, K] x [B, C] -> [B, H, R, C]."""
    b, h, r, _ = attn.shape
    return attn.gather(-1, index[:, None, None, :].expand(b, h, r, index.shape[1]))


# ------------------------------------------------------------------------- scorers
@register_scorer("adaptinfer", rows="text", options={"text_weight_blend": 1.0})
def adaptinfer(ctx: ScoringContext, text_weight_blend: float) -> Tensor:
    """AdaptInfer: vision attention of text rows, weighted by each text token's symmetrised text-text attention.

    T = A[text, text]; S = T + T^T - diag(T); optionally S <- (1 - lb) mean(S) + lb S, the mean over the
    row's heads and valid text pairs; w[b,h,j] = sum_i S[b,h,i,j]; s[b,v] = sum_h sum_j w[b,h,j] A[b,h,j,v].
    """
    lb = float(text_weight_blend)
    if not 0.0 <= lb <= 1.0:
        raise ValueError(f"text_weight_blend = {text_weight_blend!r}: must lie in [0, 1]")
    tm = ctx.text_mask  # [B, T]
    attn = _valid_rows(ctx.attn, tm)  # [B, H, T, K], rows are the text tokens
    pair = tm[:, None, :, None] & tm[:, None, None, :]  # [B, 1, T, T]
    zero = torch.zeros((), dtype=attn.dtype, device=attn.device)
    tt = torch.where(pair, _columns(attn, ctx.text_index), zero)  # [B, H, T, T]
    sym = tt + tt.transpose(-1, -2) - torch.diag_embed(tt.diagonal(dim1=-2, dim2=-1))  # [B, H, T, T]
    if lb != 1.0:
        heads = sym.shape[1]
        n_pairs = (pair.sum(dim=(1, 2, 3)) * heads).clamp(min=1)  # [B]
        mean = sym.sum(dim=(1, 2, 3)) / n_pairs  # [B]
        sym = torch.where(pair, (1.0 - lb) * mean[:, None, None, None] + lb * sym, zero)
    weight = sym.sum(dim=-2)  # [B, H, T]: w[b, h, j] = sum_i S[b, h, i, j]
    vis = _columns(attn, ctx.vision_index)  # [B, H, T, V]
    return torch.einsum("bhj,bhjv->bv", weight, vis)


@register_scorer("fastv", rows="last")
def fastv(ctx: ScoringContext) -> Tensor:
    """FastV: head-mean attention of the last token to each vision token."""
    vis = _columns(ctx.attn.float(), ctx.vision_index)  # [B, H, 1, V]
    return vis[:, :, 0, :].mean(dim=1)


@register_scorer("sparsevlm", rows="text")
def sparsevlm(ctx: ScoringContext) -> Tensor:
    """SparseVLM (no recycling): head-mean vision attention averaged over the text "raters".

    A text token rates when its mean attention to the vision tokens (over heads and vision tokens) is
    strictly above the mean of that quantity over the row's valid text tokens; a row where none is
    above (all equal) uses every valid text token.
    """
    tm = ctx.text_mask  # [B, T]
    vis = _columns(_valid_rows(ctx.attn, tm), ctx.vision_index).mean(dim=1)  # [B, T, V] head-mean
    relevance = vis.mean(dim=-1)  # [B, T]
    n_text = tm.sum(-1).clamp(min=1)  # [B]
    threshold = (relevance * tm).sum(-1) / n_text  # [B]
    raters = tm & (relevance > threshold[:, None])  # [B, T]
    raters = torch.where(raters.any(-1, keepdim=True), raters, tm)
    n_raters = raters.sum(-1).clamp(min=1)  # [B]
    return (vis * raters[..., None]).sum(dim=1) / n_raters[:, None]


@register_scorer("pyramiddrop", rows="none")
def pyramiddrop(ctx: ScoringContext) -> Tensor:
    """PyramidDrop: attention of the last real token over the valid keys, computed with layer l+1's norm and q/k.

    x = next_layer.input_layernorm(h); q of the last real token, k of every token; RoPE; GQA kv heads
    repeated; softmax(q k^T / sqrt(head_dim)) over ctx.key_mask; head-mean; the vision columns.
    """
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    for fld in ("hidden_states", "next_layer", "position_embeddings"):
        if getattr(ctx, fld) is None:
            raise ValueError(f"scorer 'pyramiddrop' needs ctx.{fld}, got None")
    hidden = ctx.hidden_states  # [B, K, D]
    layer = ctx.next_layer
    attn_mod = layer.self_attn
    b, k_len, _ = hidden.shape
    cos, sin = ctx.position_embeddings  # [B or 1, K, hd]
    head_dim = getattr(attn_mod, "head_dim", None) or cos.shape[-1]
    n_heads = attn_mod.q_proj.out_features // head_dim
    n_kv = attn_mod.k_proj.out_features // head_dim
    key_mask = ctx.key_mask  # [B, K]
    positions = torch.arange(k_len, device=hidden.device).expand(b, k_len)
    last = positions.masked_fill(~key_mask, -1).max(dim=-1).values  # [B] last real token
    if bool((last < 0).any()):
        raise ValueError("ctx.key_mask has a row without any real token")
    x = layer.input_layernorm(hidden)  # [B, K, D]
    x_last = x.gather(1, last[:, None, None].expand(b, 1, x.shape[-1]))  # [B, 1, D]
    q = attn_mod.q_proj(x_last).view(b, 1, n_heads, head_dim).transpose(1, 2)  # [B, H, 1, hd]
    k = attn_mod.k_proj(x).view(b, k_len, n_kv, head_dim).transpose(1, 2)  # [B, Hkv, K, hd]
    cos, sin = cos.expand(b, -1, -1), sin.expand(b, -1, -1)
    idx = last[:, None, None].expand(b, 1, cos.shape[-1])
    q, _ = apply_rotary_pos_emb(q, q, cos.gather(1, idx), sin.gather(1, idx))  # [B, H, 1, hd]
    _, k = apply_rotary_pos_emb(k, k, cos, sin)  # [B, Hkv, K, hd]
    k = k.repeat_interleave(n_heads // n_kv, dim=1)  # [B, H, K, hd]
    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) / math.sqrt(head_dim)  # [B, H, 1, K]
    logits = logits.masked_fill(~key_mask[:, None, None, :], -math.inf)
    probs = logits.softmax(dim=-1).mean(dim=1)[:, 0, :]  # [B, K]
    return probs.gather(1, ctx.vision_index)


@register_scorer("random", rows="none", seeded=True)
def random_scores(ctx: ScoringContext) -> Tensor:
    """Uniform random scores, row b drawn from ctx.generators[b] (its own seeded generator)."""
    b, v = ctx.vision_index.shape
    if ctx.generators is None or len(ctx.generators) != b:
        raise ValueError(f"scorer 'random' needs ctx.generators, one seeded torch.Generator per row ({b}), "
                         f"got {None if ctx.generators is None else len(ctx.generators)}")
    rows = [torch.rand(v, generator=g, device=g.device) for g in ctx.generators]
    return torch.stack(rows).to(ctx.vision_index.device)  # [B, V]


# ------------------------------------------------------------------------- VisionZip
def visionzip_split(k: int, dominant: int = VISIONZIP_DOMINANT, contextual: int = VISIONZIP_CONTEXTUAL) -> tuple[int, int]:
    """Split a budget of k tokens into (dominant, contextual) in VisionZip's ratio (64 = 54 + 10)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"k = {k!r}: must be an int >= 0")
    n_ctx = int(math.floor(k * contextual / (dominant + contextual) + 0.5))
    return k - n_ctx, n_ctx


def visionzip_select(
    cls_attn: Tensor, keys: Tensor, n_dominant: int, n_contextual: int
) -> tuple[Tensor, list[list[tuple[int, list[int]]]]]:
    """VisionZip selection: dominant tokens by CLS attention plus contextual tokens that merge the rest.

    cls_attn [B, P] (or [B, H, P], head-averaged here): CLS attention to each patch at the vision tower's
    feature layer. keys [B, P, Dk]: the patches' keys there. Dominant = the n_dominant patches with the
    largest CLS attention (ties to the earlier patch). Among the remaining patches (in order), targets are
    those at offsets floor(i * R / n_contextual), i < n_contextual; every other remaining patch joins the
    target with the largest key cosine similarity (ties to the earlier target).
    Returns kept [B, n_dominant + n_contextual] ascending patch positions and, per row, one
    (target_position, member_positions) per target; members are ascending and include the target, so the
    merged token is the mean of the members' features. With n_contextual = 0 the rest is dropped.
    """
    if cls_attn.dim() == 3:
        cls_attn = cls_attn.float().mean(dim=1)  # [B, P]
    if cls_attn.dim() != 2:
        raise ValueError(f"cls_attn has shape {tuple(cls_attn.shape)}: must be [B, P] or [B, H, P]")
    b, p = cls_attn.shape
    if keys.dim() != 3 or keys.shape[:2] != (b, p):
        raise ValueError(f"keys has shape {tuple(keys.shape)}: must be [B={b}, P={p}, Dk]")
    for fld, val in (("n_dominant", n_dominant), ("n_contextual", n_contextual)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 0:
            raise ValueError(f"{fld} = {val!r}: must be an int >= 0")
    if n_dominant + n_contextual > p:
        raise ValueError(
            f"n_dominant + n_contextual = {n_dominant + n_contextual}: must be at most the {p} patches"
        )
    dominant = select(cls_attn, n_dominant)  # [B, n_dominant] ascending
    is_dom = torch.zeros(b, p, dtype=torch.bool, device=cls_attn.device)
    is_dom.scatter_(1, dominant, True)
    rest = (~is_dom).nonzero()[:, 1].view(b, p - n_dominant)  # [B, R] ascending
    n_rest = p - n_dominant
    offsets = torch.tensor([i * n_rest // n_contextual for i in range(n_contextual)], dtype=torch.long,
                           device=cls_attn.device)  # [C] evenly spaced offsets into the remaining patches
    targets = rest[:, offsets]  # [B, C] ascending
    kept = torch.cat([dominant, targets], dim=1).sort(dim=1).values  # [B, n_dominant + C]
    if n_contextual == 0:
        return kept, [[] for _ in range(b)]
    groups: list[list[tuple[int, list[int]]]] = []
    unit = nn.functional.normalize(keys.float(), dim=-1)  # [B, P, Dk]
    is_target = torch.zeros(n_rest, dtype=torch.bool, device=cls_attn.device)
    is_target[offsets] = True
    others = rest[:, ~is_target]  # [B, M] the tokens to merge
    for row in range(b):
        sim = unit[row, others[row]] @ unit[row, targets[row]].T  # [M, C]
        owner = sim.argmax(dim=-1)  # [M] index of the most similar target (first on ties)
        row_groups = []
        for c in range(n_contextual):
            members = others[row][owner == c].tolist() + [int(targets[row, c])]
            row_groups.append((int(targets[row, c]), sorted(members)))
        groups.append(row_groups)
    return kept, groups


def visionzip_merge(features: Tensor, kept: Tensor, merge_groups: list[list[tuple[int, list[int]]]]) -> Tensor:
    """Features [B, P, D] -> [B, k, D] at the kept positions, each contextual target replaced by its group mean."""
    merged = features.clone()
    for row, row_groups in enumerate(merge_groups):
        for target, members in row_groups:
            merged[row, target] = features[row, members].mean(dim=0)
    return merged.gather(1, kept[:, :, None].expand(-1, -1, features.shape[-1]))
