"""Vision-token scorers by name: each maps attention rows (or hidden states) and the token layout to scores [B, V].

A new scorer is one function and one registration::

    @register_scorer("mine", rows="text", options={"alpha": 1.0})
    def mine(ctx: ScoringContext, alpha: float) -> Tensor: ...  # [B, V], higher = keep

`rows` tells the engine which query rows to probe: "text" (ctx.query_index == ctx.text_index), "last"
(R = 1, the last real token) or "none" (no attention rows; the scorer uses hidden states or nothing).
`options` declares the scorer's options and their defaults; unknown options are an error.
`on_slices` (optional) is the same scorer on the batch-1 shape of a stage, where the engine knows on the host that every
row's text is its last T tokens and its vision tokens one run: `on_slices(attn, text_slice, vision_slice, **options)`
-> [B, V], from the text rows' attention alone, without a ScoringContext (the engine then skips building one; host
time is what batch-1 prefill waits on). It must give what `fn` gives on that shape: `fn` may call it.
Selection (`select`) is top-k, returned in original order. Methods that choose before the language model
(VisionZip, DivPrune, ...) are selectors, not scorers: pruning/selectors.py.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor, nn

ROW_KINDS = ("text", "last", "none")


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
    text_full: bool = False  # known on the host: text_mask has no False entry (scorers may skip masking then)
    # text_index / vision_index as one slice shared by every row, when the engine knows it on the host (no padding,
    # one vision run): scorers may take a view instead of a gather. None otherwise.
    text_slice: slice | None = None
    vision_slice: slice | None = None
    generators: list[torch.Generator] | None = None  # one per row, for scorers registered with seeded=True
    hidden_states: Tensor | None = None  # [B, K, D] the stage layer's output (input of layer l+1)
    next_layer: nn.Module | None = None  # decoder layer l+1 (.input_layernorm, .self_attn.{q_proj,k_proj})
    position_embeddings: tuple[Tensor, Tensor] | None = None  # (cos, sin) [B, K, head_dim] for the current tokens
    keep: int | None = None  # vision tokens this stage keeps (for scorers whose ranking depends on it, e.g. DART)
    stage_input: Tensor | None = None  # [B, K, D] the stage layer's input ("none"-rows scorers)
    stage_layer: nn.Module | None = None  # decoder layer l itself (.input_layernorm, .self_attn.k_proj)
    stage_position_embeddings: tuple[Tensor, Tensor] | None = None  # (cos, sin) the stage layer received
    final_norm: nn.Module | None = None  # the language model's final norm
    options: dict = field(default_factory=dict)  # per-scorer options from config
    vision_mask: Tensor | None = None  # [B, V] bool: real vision slots when rows hold different counts (None: all
    # real); vision_index repeats a row's position at its other slots, whose scores the engine ignores. A scorer that
    # pools over the vision axis (a mean, a norm) must pool over the real slots only.


ScorerFn = Callable[..., Tensor]


@dataclass(frozen=True)
class MergeRule:
    """How a scorer recycles the tokens a stage drops (the engine does the merging: pruning.engine._merge_dropped).

    split(n_vision, k, **options) -> m: of the stage's k tokens, m are merged ones (the top k - m by score are kept).
    assign(hidden [B, n, D], scores [B, n], m, **options) -> [B, n] long: each dropped token's cluster in 0..m-1, or
    -1 (gone); every cluster must have a member. hidden: the stage layer's output at the dropped tokens (ascending
    positions); scores: theirs.
    """

    split: Callable[..., int]
    assign: Callable[..., Tensor]


@dataclass(frozen=True)
class ScorerSpec:
    """A registered scorer: its function, the query rows it needs, its options with defaults, an optional MergeRule."""

    name: str
    fn: ScorerFn
    rows: str
    options: dict
    seeded: bool = False  # draws random numbers: the engine gives it ctx.generators, one per row
    merge: MergeRule | None = None
    on_slices: ScorerFn | None = None  # the scorer on one text slice and one vision run (see the module docstring)


_REGISTRY: dict[str, ScorerSpec] = {}


def register_scorer(
    name: str, rows: str, options: dict[str, Any] | None = None, replace: bool = False, seeded: bool = False,
    merge: MergeRule | None = None, on_slices: ScorerFn | None = None,
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
        _REGISTRY[name] = ScorerSpec(name=name, fn=fn, rows=rows, options=dict(options or {}), seeded=seeded,
                                     merge=merge, on_slices=on_slices)
        return fn

    return decorate


def get_scorer(name: str) -> ScorerSpec:
    """The registered scorer `name`; KeyError lists the available ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"scorer = {name!r}: unknown; available scorers are {available_scorers()}") from None


def available_scorers() -> list[str]:
    """Names of the registered in-LM scorers (before-the-LM methods are selectors: pruning.selectors)."""
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
    unknown = sorted(set(ctx.options) - set(spec.options)) if ctx.options else None
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


def _ranking(scores: Tensor, valid: Tensor | None = None) -> Tensor:
    """Slots of scores [B, V] best first: NaN ranks lowest, equal scores keep index order (a stable sort); slots where
    valid [B, V] is False come after every real slot, even a NaN one (a row's real slots are packed first)."""
    clean = torch.nan_to_num(scores.float(), nan=-math.inf, posinf=math.inf, neginf=-math.inf)
    if valid is not None:
        clean = torch.where(valid, clean, torch.full_like(clean, -math.inf))
    return torch.sort(clean, dim=-1, descending=True, stable=True).indices


def select(scores: Tensor, k: int) -> Tensor:
    """Top-k indices [B, k] into the vision axis of `scores` [B, V], ascending; ties go to the earlier token.

    NaN scores rank lowest.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores has shape {tuple(scores.shape)}: must be [B, V]")
    v = scores.shape[1]
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= v:
        raise ValueError(f"k = {k!r}: must be an int in 0..{v} (the number of vision tokens)")
    return _ranking(scores)[:, :k].sort(dim=-1).values


def select_rows(scores: Tensor, keep: Sequence[int], valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """`select` with a count per row: row b's top keep[b] slots of scores [B, V] (only slots where valid [B, V] is
    True), ascending, in [B, max(keep)] with its first pick repeated after its own; and [B, max(keep)] bool, True at
    the real picks. Each row's picks equal `select` on that row alone (its real slots, in order)."""
    if scores.dim() != 2 or len(keep) != scores.shape[0]:
        raise ValueError(f"scores {tuple(scores.shape)} and keep {list(keep)}: need [B, V] and one count per row")
    width = max(keep)
    order = _ranking(scores, valid)[:, :width]  # [B, Kmax]
    picked = torch.arange(width, device=scores.device)[None, :] < torch.tensor(list(keep), device=scores.device)[:, None]
    big = torch.iinfo(order.dtype).max
    ascending = torch.where(picked, order, torch.full_like(order, big)).sort(dim=-1).values
    return torch.where(picked, ascending, ascending[:, :1]), picked


# ------------------------------------------------------------------------- attention helpers
def _valid_rows(attn: Tensor, row_mask: Tensor) -> Tensor:
    """attn [B, H, R, K] with invalid rows set to 0 (by selection, so NaN/inf in filler rows cannot leak)."""
    return torch.where(row_mask[:, None, :, None], attn.float(), torch.zeros((), dtype=torch.float32, device=attn.device))


def _columns(attn: Tensor, index: Tensor) -> Tensor:
    """attn[:, :, :, index] per row: [B, H, R, K] x [B, C] -> [B, H, R, C]."""
    b, h, r, _ = attn.shape
    return attn.gather(-1, index.view(b, 1, 1, index.shape[1]).expand(b, h, r, index.shape[1]))


def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Llama-style rotary embedding of x [B, H, K, hd] with cos/sin [B, K, hd]."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    out, _ = apply_rotary_pos_emb(x, x, cos, sin)
    return out


def _rope_keys(layer: nn.Module, x: Tensor, position_embeddings: tuple[Tensor, Tensor]) -> Tensor:
    """Post-RoPE keys [B, Hkv, K, hd] of decoder `layer` for its normed input x [B, K, D] (k_proj, then RoPE)."""
    attn_mod = layer.self_attn
    cos, sin = position_embeddings
    b, k_len, _ = x.shape
    head_dim = getattr(attn_mod, "head_dim", None) or cos.shape[-1]
    n_kv = attn_mod.k_proj.out_features // head_dim
    k = attn_mod.k_proj(x).view(b, k_len, n_kv, head_dim).transpose(1, 2)  # [B, Hkv, K, hd]
    return _rope(k, cos.expand(b, -1, -1), sin.expand(b, -1, -1))


# ------------------------------------------------------------------------- AdaptInfer's text guidance
def text_prior(attn: Tensor, text_index: Tensor, text_mask: Tensor, full: bool = False,
               text_slice: slice | None = None) -> Tensor:
    """AdaptInfer's dynamic text guidance, the weight of each text token: attn [B, H, T, K] -> w [B, H, T].

    attn: the text rows' post-softmax attention over all K keys (row t = the token at text_index[:, t]);
    text_index, text_mask: [B, T]. With T = A[text, text] over real text tokens and S = T + T^T - diag(T),
    w[b, h, j] = sum_i S[b, h, i, j] = sum_i T[i, j] + sum_i T[j, i] - T[j, j]; zero at padding j.
    The one computation of the prior: the `adaptinfer` scorer and the collector's reducer (analysis.collector) call it.
    `text_slice`: text_index as one slice shared by the rows (with full=True), a view instead of a gather.
    """
    if full:  # the caller knows on the host that text_mask is all True: no masking ops
        block = attn[..., text_slice] if text_slice is not None else _columns(attn, text_index)
    else:
        pair = text_mask[:, None, :, None] & text_mask[:, None, None, :]  # [B, 1, T, T]
        zero = torch.zeros((), dtype=attn.dtype, device=attn.device)
        block = torch.where(pair, _columns(attn, text_index), zero)  # [B, H, T, T]: T[b, h, i, j], 0 outside real text
    return block.sum(-2) + block.sum(-1) - block.diagonal(dim1=-2, dim2=-1)


def prior_weighted_vision(attn: Tensor, prior: Tensor, vision_index: Tensor) -> Tensor:
    """AdaptInfer's vision score s[b, v] = sum_h sum_j w[b, h, j] A[b, h, j, v]: attn [B, H, T, K], prior w
    [B, H, T] (text_prior), vision_index [B, V] -> [B, V]."""
    return torch.einsum("bhj,bhjv->bv", prior, _columns(attn, vision_index))


# ------------------------------------------------------------------------- scorers
def _blend(text_weight_blend: float) -> float:
    lb = float(text_weight_blend)
    if not 0.0 <= lb <= 1.0:
        raise ValueError(f"text_weight_blend = {text_weight_blend!r}: must lie in [0, 1]")
    return lb


def adaptinfer_on_slices(attn: Tensor, text_slice: slice, vision_slice: slice,
                         text_weight_blend: float = 1.0) -> Tensor:
    """`adaptinfer` where every row's text is the key slice `text_slice` (its last T tokens, no filler) and its vision
    tokens the run `vision_slice`: views instead of gathers, and the products over the V vision columns only.
    attn [B, H, T, K] -> [B, V]."""
    lb = _blend(text_weight_blend)
    attn = attn.float()
    weight = text_prior(attn, None, None, full=True, text_slice=text_slice)  # [B, H, T]
    if lb != 1.0:  # every text token is real here: n = T
        n_text, heads = weight.shape[-1], weight.shape[1]
        mean = weight.sum(dim=(1, 2)) / max(n_text * n_text * heads, 1)  # [B]: mean of S
        weight = (1.0 - lb) * (n_text * mean)[:, None, None] + lb * weight
    return (weight[..., None] * attn[..., vision_slice]).sum(dim=(1, 2))


@register_scorer("adaptinfer", rows="text", options={"text_weight_blend": 1.0}, on_slices=adaptinfer_on_slices)
def adaptinfer(ctx: ScoringContext, text_weight_blend: float) -> Tensor:
    """AdaptInfer: vision attention of text rows, weighted by each text token's symmetrised text-text attention.

    w = text_prior(A) (w[b,h,j] = sum_i S[b,h,i,j], S = T + T^T - diag(T), T = A[text, text]); s = prior_weighted_vision
    (s[b,v] = sum_h sum_j w[b,h,j] A[b,h,j,v]). With text_weight_blend lb < 1, S <- (1 - lb) mean(S) + lb S on the
    valid text pairs, the mean over the row's heads and valid pairs: w[j] <- (1 - lb) n mean(S) + lb w[j] (n real text
    tokens), since the weights sum S over its rows.
    """
    lb = _blend(text_weight_blend)
    tm = ctx.text_mask  # [B, T]
    if ctx.text_full and ctx.text_slice is not None and ctx.vision_slice is not None:  # one text slice, one vision run
        return adaptinfer_on_slices(ctx.attn, ctx.text_slice, ctx.vision_slice, lb)
    if lb == 1.0 and ctx.text_full:  # no filler rows or columns (known on the host): the same sums in fewer ops
        attn = ctx.attn.float()
        weight = text_prior(attn, ctx.text_index, tm, full=True, text_slice=ctx.text_slice)  # [B, H, T]
        return (weight[..., None] * attn).sum(dim=(1, 2)).gather(1, ctx.vision_index)  # [B, K] -> [B, V]
    attn = _valid_rows(ctx.attn, tm)  # [B, H, T, K], rows are the text tokens
    weight = text_prior(attn, ctx.text_index, tm)  # [B, H, T]
    if lb != 1.0:
        n_text = tm.sum(-1).to(weight.dtype)  # [B]
        mean = weight.sum(dim=(1, 2)) / (n_text * n_text * weight.shape[1]).clamp(min=1)  # [B]: mean of S
        blended = (1.0 - lb) * (n_text * mean)[:, None, None] + lb * weight  # [B, H, T]
        weight = torch.where(tm[:, None, :], blended, torch.zeros((), dtype=weight.dtype, device=weight.device))
    return prior_weighted_vision(attn, weight, ctx.vision_index)


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
    if ctx.vision_mask is None:
        relevance = vis.mean(dim=-1)  # [B, T]
    else:  # rows with different vision counts: the mean over each row's own vision tokens
        vm = ctx.vision_mask[:, None, :]
        relevance = (vis * vm).sum(-1) / vm.sum(-1).clamp(min=1)
    n_text = tm.sum(-1).clamp(min=1)  # [B]
    threshold = (relevance * tm).sum(-1) / n_text  # [B]
    raters = tm & (relevance > threshold[:, None])  # [B, T]
    raters = torch.where(raters.any(-1, keepdim=True), raters, tm)
    n_raters = raters.sum(-1).clamp(min=1)  # [B]
    return (vis * raters[..., None]).sum(dim=1) / n_raters[:, None]


# ------------------------------------------------------------------------- SparseVLM with recycling
def recycle_split(n_vision: int, k: int, recycle_ratio: float, tokens_per_cluster: int) -> int:
    """Of a stage's k tokens, how many are merged ones (SparseVLM v1 recycling, counted inside the budget).

    Deleting n tokens recycles r(n) = floor(recycle_ratio * n) + 1 of them into c(n) = r(n) // tokens_per_cluster + 1
    clusters. The kept count k' is the largest with k' + c(n_vision - k') <= k; then m = k - k' (= c exactly, since
    c grows by at most one per deleted token). When even k' = 0 overshoots (k < c(n_vision)), all k are merged ones.
    """
    _check_recycle(recycle_ratio, tokens_per_cluster)
    for kept in range(k, -1, -1):
        deleted = n_vision - kept
        clusters = (math.floor(recycle_ratio * deleted) + 1) // tokens_per_cluster + 1 if deleted > 0 else 0
        if kept + clusters <= k:
            return k - kept
    return k


def _check_recycle(recycle_ratio: float, tokens_per_cluster: int) -> None:
    if not 0.0 <= float(recycle_ratio) <= 1.0:
        raise ValueError(f"recycle_ratio = {recycle_ratio!r}: must lie in [0, 1]")
    if isinstance(tokens_per_cluster, bool) or not isinstance(tokens_per_cluster, int) or tokens_per_cluster < 1:
        raise ValueError(f"tokens_per_cluster = {tokens_per_cluster!r}: must be an int >= 1")


def density_peak_clusters(x: Tensor, n_clusters: int) -> Tensor:
    """Density-peak kNN clustering of x [B, n, D] into n_clusters: labels [B, n] in 0..n_clusters-1.

    d = L2 distance / sqrt(D); density = exp(-mean d^2 over the n_clusters nearest other tokens); delta = distance to
    the nearest denser token (denser: higher density, or equal density and earlier), the row's largest distance for
    the densest; centres = the n_clusters largest density * delta (ties to the earlier); each token joins its
    nearest centre (ties to the earlier centre), each centre its own cluster.
    """
    b, n, d = x.shape
    if not 1 <= n_clusters <= n:
        raise ValueError(f"n_clusters = {n_clusters}: must lie in 1..{n} (the tokens to cluster)")
    dist = torch.cdist(x.double(), x.double()) / math.sqrt(d)  # [B, n, n]
    eye = torch.eye(n, dtype=torch.bool, device=x.device)
    n_near = min(n_clusters, n - 1)
    if n_near:
        near = dist.masked_fill(eye, math.inf).topk(n_near, dim=-1, largest=False).values  # [B, n, n_near]
        density = torch.exp(-(near ** 2).mean(-1))  # [B, n]
    else:
        density = torch.ones(b, n, dtype=torch.float64, device=x.device)
    idx = torch.arange(n, device=x.device)
    denser = (density[:, None, :] > density[:, :, None]) | (
        (density[:, None, :] == density[:, :, None]) & (idx[None, None, :] < idx[None, :, None]))  # [B, i, j]
    delta = dist.masked_fill(~denser, math.inf).min(dim=-1).values  # [B, n]
    row_max = dist.amax(dim=(1, 2))[:, None].expand(b, n)
    delta = torch.where(torch.isinf(delta), row_max, delta)
    centres = torch.sort(density * delta, dim=-1, descending=True, stable=True).indices[:, :n_clusters]  # [B, m]
    labels = dist.gather(2, centres[:, None, :].expand(b, n, n_clusters)).argmin(dim=-1)  # [B, n]
    return labels.scatter(1, centres, torch.arange(n_clusters, device=x.device).expand(b, n_clusters))


def recycle_assign(hidden: Tensor, scores: Tensor, n_merged: int, recycle_ratio: float,
                   tokens_per_cluster: int) -> Tensor:
    """SparseVLM v1 recycling of n dropped tokens: the top floor(recycle_ratio * n) + 1 by score (relevance) are
    clustered into n_merged groups by `density_peak_clusters` on hidden [B, n, D]; the rest get -1."""
    b, n, _ = hidden.shape
    n_rec = max(min(n, math.floor(recycle_ratio * n) + 1), n_merged)
    top = torch.sort(scores.float(), dim=-1, descending=True, stable=True).indices[:, :n_rec]  # [B, n_rec]
    labels = density_peak_clusters(hidden.gather(1, top[..., None].expand(-1, -1, hidden.shape[-1])), n_merged)
    return torch.full((b, n), -1, dtype=torch.long, device=hidden.device).scatter(1, top, labels)


@register_scorer("sparsevlm_recycle", rows="text", options={"recycle_ratio": 0.3, "tokens_per_cluster": 10},
                 merge=MergeRule(split=recycle_split, assign=recycle_assign))
def sparsevlm_recycle(ctx: ScoringContext, recycle_ratio: float, tokens_per_cluster: int) -> Tensor:
    """SparseVLM v1 with recycling: `sparsevlm` scores; part of the dropped tokens is merged back (MergeRule above).

    The merged tokens count as vision tokens in the stage's keep count; each takes its cluster's first member's slot.
    """
    _check_recycle(recycle_ratio, tokens_per_cluster)
    return sparsevlm(ctx)


# ------------------------------------------------------------------------- DART
@dataclass
class DartStep:
    """One pivot's turn in `dart_pick`: the pivot's normed hidden state, its picks and the pool left after them."""

    pivot: Tensor  # [D]
    picks: list[int]  # vision-axis indices, in pick order
    pool_after: list[int]  # vision-axis indices still in the pool


def dart_pick(h_vision: Tensor, h_text: Tensor, norm_vision: Tensor, norm_text: Tensor, k: int,
              vision_pivots: int = 4, text_pivots: int = 4) -> tuple[Tensor, list[DartStep]]:
    """DART for one row: kept [k] ascending vision-axis indices and the trace of pivot turns.

    Pivots: the min(vision_pivots, k) vision tokens and the min(text_pivots, T) text tokens with the largest key L1
    norm (ties to the earlier), vision pivots first, each group in descending norm. They are kept; the other
    r = k - (vision pivots) tokens are picked from the pool (vision minus vision pivots): pivot i in turn takes the
    r // P + (1 if i < r % P else 0) pool tokens (P pivots) least cosine-similar to it (ties to the earlier) and
    they leave the pool. Exactly k: DART's code keeps 4 + 8 * (M // 8); here the remainder r % P goes one each to
    the first pivots.
    """
    v = h_vision.shape[0]
    n_vp = min(vision_pivots, k)
    vp = torch.sort(norm_vision.float(), descending=True, stable=True).indices[:n_vp]
    tp = torch.sort(norm_text.float(), descending=True, stable=True).indices[:min(text_pivots, h_text.shape[0])]
    pivots = [h_vision[i] for i in vp.tolist()] + [h_text[i] for i in tp.tolist()]
    in_pool = torch.ones(v, dtype=torch.bool, device=h_vision.device)
    in_pool[vp] = False
    unit = nn.functional.normalize(h_vision.double(), dim=-1)
    rest = k - n_vp
    steps: list[DartStep] = []
    kept = vp.tolist()
    for i, pivot in enumerate(pivots):
        take = rest // len(pivots) + (1 if i < rest % len(pivots) else 0)
        pool = in_pool.nonzero()[:, 0]
        sim = unit[pool] @ nn.functional.normalize(pivot.double(), dim=-1)  # [pool]
        picks = pool[torch.sort(sim, stable=True).indices[:take]].tolist()  # lowest similarity first
        in_pool[picks] = False
        kept += picks
        steps.append(DartStep(pivot=pivot, picks=picks, pool_after=in_pool.nonzero()[:, 0].tolist()))
    return torch.tensor(sorted(kept), dtype=torch.long, device=h_vision.device), steps


@register_scorer("dart", rows="none", options={"vision_pivots": 4, "text_pivots": 4})
def dart(ctx: ScoringContext, vision_pivots: int, text_pivots: int) -> Tensor:
    """DART: pivots by the L1 norm of the stage layer's post-RoPE keys; keep the tokens least similar to the pivots
    (cosine of the stage layer's output after the final norm). No attention map. Scores: 1 for the k kept."""
    for fld in ("stage_input", "stage_layer", "stage_position_embeddings", "hidden_states", "final_norm", "keep"):
        if getattr(ctx, fld) is None:
            raise ValueError(f"scorer 'dart' needs ctx.{fld}, got None")
    layer = ctx.stage_layer
    keys = _rope_keys(layer, layer.input_layernorm(ctx.stage_input), ctx.stage_position_embeddings)  # [B, Hkv, K, hd]
    norm = keys.float().abs().sum(dim=(1, 3))  # [B, K] L1 norm over heads and channels
    h = ctx.final_norm(ctx.hidden_states)  # [B, K, D]
    scores = torch.zeros(ctx.vision_index.shape, dtype=torch.float32, device=h.device)
    for b in range(h.shape[0]):
        text = ctx.text_index[b][ctx.text_mask[b]]
        kept, _ = dart_pick(h[b, ctx.vision_index[b]], h[b, text], norm[b, ctx.vision_index[b]], norm[b, text],
                            ctx.keep, int(vision_pivots), int(text_pivots))
        scores[b, kept] = 1.0
    return scores


@register_scorer("pyramiddrop", rows="none")
def pyramiddrop(ctx: ScoringContext) -> Tensor:
    """PyramidDrop: attention of the last real token over the valid keys, computed with layer l+1's norm and q/k.

    x = next_layer.input_layernorm(h); q of the last real token, k of every token; RoPE; GQA kv heads
    repeated; softmax(q k^T / sqrt(head_dim)) over ctx.key_mask; head-mean; the vision columns.
    """
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
    cos, sin = cos.expand(b, -1, -1), sin.expand(b, -1, -1)
    idx = last[:, None, None].expand(b, 1, cos.shape[-1])
    q = _rope(q, cos.gather(1, idx), sin.gather(1, idx))  # [B, H, 1, hd]
    k = _rope_keys(layer, x, (cos, sin))  # [B, Hkv, K, hd]
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
