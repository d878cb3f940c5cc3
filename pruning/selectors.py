"""Vision-token selectors by name: methods that choose before the language model (VisionZip, DivPrune, CDPruner,
VisPruner, pooling).

A selector maps what the vision side produced for each row to the vision tokens the language model gets::

    @register_selector("mine", needs=("features",), options={"alpha": 1.0})
    def mine(ctx: SelectorContext, k: int, alpha: float) -> Selection: ...

`ctx.projected` (P, the projector output = the LM's input embeddings of the vision tokens, [B, V, D]) and
`ctx.text_embeds` (the LM's input embeddings of the text after the image) are always there; `needs` asks the
engine to capture more in the same forward: "features" (F, the projector's input [B, V, Dv]), "cls_attn" (the
head-mean attention of the vision tower's CLS query to each patch at the feature layer, [B, V], from
`vlm.probe.AttentionProbe`, SDPA still on) and "keys" (the patches' keys there, [B, V, Dk]); `grid=True` says the
selector reads the vision tokens as one raster grid (pooling). Selectors needing the CLS token raise
`MethodInfeasible` on towers without one; selectors needing any of these, or the grid, raise it on families whose
LM vision tokens are not the tower's patches one for one (`VisionSites.patch_mapping`: LLaVA-NeXT's anyres tiles).

A `Selection` names k vision slots per row (ascending indices into the vision axis). Each slot keeps its token's
place in the sequence (its RoPE position, or the contiguous one with `positions: renumber`); `tokens`, when given,
replaces the embeddings in those slots (merged or pooled tokens), else the slots keep their own P.
The engine (pruning/engine.py) calls the registered selector at layer 0's pre-hook for a stage at layer -1.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from pruning.schedule import MethodInfeasible
from pruning.scorers import available_scorers, select
from vlm.arch import for_model
from vlm.arch.base import square_grid
from vlm.probe import AttentionProbe, ProbeCall

NEEDS = ("features", "cls_attn", "keys")
CLS_NEEDS = frozenset({"cls_attn", "keys"})

# VisionZip's published split of 64 tokens: 54 dominant + 10 contextual (also 108 + 20 and 162 + 30).
VISIONZIP_DOMINANT = 54
VISIONZIP_CONTEXTUAL = 10
# DPP residuals at or below this count as exhausted (the kernel's rank is used up).
DPP_EPS = 1e-10


class SelectorError(ValueError):
    """A selector that cannot run on this model or input; the message says what would work."""


@dataclass
class SelectorContext:
    """What a selector may read; every tensor is per row (one image per row)."""

    projected: Tensor  # [B, V, D] P: the LM's input embeddings of the vision tokens (projector output)
    text_embeds: Tensor  # [B, T, D] the LM's input embeddings of the text tokens after the image (padded)
    text_mask: Tensor  # [B, T] bool: valid text tokens
    grid: tuple[int, int] | None  # (rows, cols) of every row's image as a raster token grid (rows * cols = V), or None
    features: Tensor | None = None  # [B, V, Dv] F: the projector's input ("features")
    cls_attn: Tensor | None = None  # [B, V] head-mean CLS attention to each patch at the feature layer ("cls_attn")
    keys: Tensor | None = None  # [B, V, Dk] the patches' keys at the feature layer ("keys")
    project: Callable[[Tensor], Tensor] | None = None  # the projector: F-space [.., Dv] -> P-space [.., D]
    options: dict = field(default_factory=dict)


@dataclass
class Selection:
    """The k vision slots a selector keeps: kept [B, k] ascending indices into the vision axis; tokens [B, k, D]
    (optional) the embeddings to put in those slots."""

    kept: Tensor
    tokens: Tensor | None = None


SelectorFn = Callable[..., Selection]
CheckFn = Callable[..., None]


@dataclass(frozen=True)
class SelectorSpec:
    """A registered selector: its function, what it needs captured, its options, and an optional budget check."""

    name: str
    fn: SelectorFn
    needs: frozenset
    options: dict
    check: CheckFn | None = None  # check(k, n_vision, grid, **options): raise MethodInfeasible when k is out of reach
    grid: bool = False  # reads the vision tokens as one raster grid of the tower's patches


_REGISTRY: dict[str, SelectorSpec] = {}


def register_selector(
    name: str, needs: tuple[str, ...] = (), options: dict[str, Any] | None = None, check: CheckFn | None = None,
    replace: bool = False, grid: bool = False,
) -> Callable[[SelectorFn], SelectorFn]:
    """Decorator: register `fn(ctx, k, **options) -> Selection` under `name`."""
    bad = sorted(set(needs) - set(NEEDS))
    if bad:
        raise ValueError(f"needs = {bad} for selector {name!r}: each must be one of {list(NEEDS)}")
    if name in available_scorers():
        raise ValueError(f"{name!r} is already a scorer (pruning.scorers); a selector needs another name")

    def decorate(fn: SelectorFn) -> SelectorFn:
        if name in _REGISTRY and not replace:
            raise ValueError(f"selector {name!r} is already registered (pass replace=True to override it)")
        _REGISTRY[name] = SelectorSpec(name=name, fn=fn, needs=frozenset(needs), options=dict(options or {}),
                                       check=check, grid=grid)
        return fn

    return decorate


def is_selector(name: str) -> bool:
    """True when `name` is a registered before-the-LM selector."""
    return name in _REGISTRY


def get_selector(name: str) -> SelectorSpec:
    """The registered selector `name`; KeyError lists the available ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"selector = {name!r}: unknown; available selectors are {available_selectors()}") from None


def available_selectors() -> list[str]:
    """Names of the registered before-the-LM selectors."""
    return sorted(_REGISTRY)


def _options(spec: SelectorSpec, options: dict) -> dict:
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        raise ValueError(f"options {unknown} are unknown to selector {spec.name!r}; allowed options are {sorted(spec.options)}")
    return {**spec.options, **options}


def check_budget(name: str, k: int, n_vision: int, options: dict | None = None,
                 grid: tuple[int, int] | None = None) -> None:
    """Raise MethodInfeasible when selector `name` cannot keep exactly k of n_vision tokens (laid out as the image
    token grid `grid` (rows, cols) when known; None: not known yet, a square is assumed where a check needs one)."""
    spec = get_selector(name)
    if not 0 <= k <= n_vision:
        raise MethodInfeasible(f"selector {name!r}: keep {k} is outside 0..{n_vision} (the vision tokens per image)")
    if spec.check is not None:
        spec.check(k, n_vision, grid, **_options(spec, dict(options or {})))


def run_selector(name: str, ctx: SelectorContext, k: int) -> Selection:
    """Run selector `name` for k tokens per row and check its output (exactly k ascending, distinct slots)."""
    spec = get_selector(name)
    opts = _options(spec, ctx.options)
    b, v, d = ctx.projected.shape
    check_budget(name, k, v, ctx.options, grid=ctx.grid)
    for need in spec.needs:
        if getattr(ctx, need) is None:
            raise SelectorError(f"selector {name!r} needs ctx.{need}, got None")
    out = spec.fn(ctx, k, **opts)
    kept = out.kept
    if tuple(kept.shape) != (b, k):
        raise RuntimeError(f"selector {name!r} returned kept of shape {tuple(kept.shape)}, expected [B, k] = {(b, k)}")
    if k > 1 and not bool((kept[:, 1:] > kept[:, :-1]).all()):
        raise RuntimeError(f"selector {name!r} returned kept slots that are not strictly ascending")
    if k and not (0 <= int(kept.min()) and int(kept.max()) < v):
        raise RuntimeError(f"selector {name!r} returned kept slots outside 0..{v - 1}")
    if out.tokens is not None and tuple(out.tokens.shape) != (b, k, d):
        raise RuntimeError(f"selector {name!r} returned tokens of shape {tuple(out.tokens.shape)}, expected {(b, k, d)}")
    return out


# ------------------------------------------------------------------------- capturing the vision side
class VisionCapture:
    """Context manager: hooks that capture, in the model's own forward, what a selector `needs` from the vision side.

    "features": a pre-hook on the projector; "cls_attn": an AttentionProbe on the feature layer's self-attention
    (the CLS query row only, SDPA still computing the output); "keys": a forward hook on that layer's k_proj.
    Always: each image's token grid, read from the tower's call by the family (`grid`).
    """

    def __init__(self, model: nn.Module, needs: frozenset, method: str) -> None:
        self.model = model
        self.needs = frozenset(needs)
        self.method = method
        self.captured: dict[str, Tensor] = {}
        self._handles: list[Any] = []
        self._probe: AttentionProbe | None = None
        self._grids: list[tuple[int, int]] | None = None  # each image's token grid, from the last tower call

    def __enter__(self) -> "VisionCapture":
        arch = for_model(self.model)
        self._arch = arch
        sites = arch.vision_sites()
        self.project = sites.projector
        self._check_patch_mapping(sites)
        self._grids = None
        try:
            self._handles.append(sites.tower.register_forward_pre_hook(self._on_tower, with_kwargs=True))
            if "features" in self.needs:
                self._handles.append(sites.projector.register_forward_pre_hook(self._on_projector))
            if self.needs & CLS_NEEDS:
                self._attach_cls(sites)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _check_patch_mapping(self, sites: Any) -> None:
        """MethodInfeasible when the selector reads the tower's patches (or a raster grid of them) and this family's
        LM vision tokens are not those patches one for one."""
        spec = _REGISTRY.get(self.method)
        if sites.patch_mapping is None or not (self.needs or (spec is not None and spec.grid)):
            return
        reads = ", ".join(sorted(self.needs)) if self.needs else "a raster grid of the vision tokens"
        no_cls = ""
        if self.needs & CLS_NEEDS and not sites.has_cls:
            no_cls = f"; {type(sites.tower).__name__} has no CLS token either"
        raise MethodInfeasible(
            f"{self.method!r} reads the vision tower's patches ({reads}) as the language model's vision tokens, but on "
            f"{type(self.model).__name__} {sites.patch_mapping}{no_cls}; use a selector that reads the LM's own vision "
            "embeddings (divprune, cdpruner) or an in-LM scorer"
        )

    def _attach_cls(self, sites: Any) -> None:
        if not sites.has_cls:
            raise MethodInfeasible(
                f"{self.method!r} reads the vision tower's CLS attention, but {type(sites.tower).__name__} has no CLS "
                "token; use a method that needs none (divprune, cdpruner, pooling, or an in-LM scorer)"
            )
        # properties of the model, not mistakes of the caller: the method cannot run on it (an `infeasible` row)
        if sites.select_strategy != "default":
            raise MethodInfeasible(
                f"{self.method!r} needs vision_feature_select_strategy='default' (patch features without CLS), "
                f"{type(self.model).__name__} uses {sites.select_strategy!r}"
            )
        try:
            attn = sites.feature_attention()
        except ValueError as err:
            raise MethodInfeasible(f"{self.method!r} reads the CLS attention of the one tower layer whose output is "
                                   f"the projector's input: {err}") from None
        if "keys" in self.needs:
            self._handles.append(attn.k_proj.register_forward_hook(self._on_keys))
        zero = torch.zeros(1, 1, dtype=torch.long)  # the CLS row

        def cls_row(call: ProbeCall) -> tuple[Tensor, None]:
            return zero.to(next(call.module.parameters()).device).expand(call.batch, 1), None

        self._probe = AttentionProbe(self.model, modules={"vision_cls": attn}, rows=cls_row, on_rows=self._on_cls)
        self._probe.__enter__()

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._probe is not None:
            self._probe.__exit__(None, None, None)
            self._probe = None
        self.captured.clear()

    def _on_tower(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._grids = self._arch.tower_grids(args, kwargs)  # [(rows, cols)] per image of this call

    def grid(self, batch: int) -> tuple[int, int] | None:
        """The (rows, cols) token grid of this prefill's images when there is one image per row and every image has
        the same grid (the family's `tower_grids`: LLaVA's fixed square, Qwen's image_grid_thw / merge); else None."""
        grids = self._grids
        if not grids or len(grids) != batch or any(g != grids[0] for g in grids):
            return None
        return tuple(grids[0])

    def _on_projector(self, module: nn.Module, inputs: tuple) -> None:
        self.captured["features"] = inputs[0].detach()  # [B_img, P, Dv]

    def _on_keys(self, module: nn.Module, inputs: tuple, output: Tensor) -> None:
        self.captured["keys"] = output[:, 1:].detach()  # [B_img, P, Dk] without the CLS key

    def _on_cls(self, call: ProbeCall, rows: Tensor, index: Tensor, mask: Tensor | None) -> None:
        self.captured["cls_attn"] = rows[:, :, 0, 1:].mean(1)  # [B_img, P] head-mean CLS attention to the patches

    def take(self, batch: int, n_vision: int) -> dict[str, Tensor]:
        """The captured tensors of this prefill (then forgotten); each must be [batch, n_vision, ...]."""
        out = dict(self.captured)
        self.captured.clear()
        for need in self.needs:
            if need not in out:
                raise SelectorError(
                    f"{self.method!r} needs pixel_values in the prefill call ({need} comes from the vision side)"
                )
            if tuple(out[need].shape[:2]) != (batch, n_vision):
                raise SelectorError(
                    f"{self.method!r} supports one image per row: {need} has shape {tuple(out[need].shape)}, the "
                    f"batch has {batch} rows of {n_vision} vision tokens"
                )
        return out


# ------------------------------------------------------------------------- shared pieces
def _unit(x: Tensor) -> Tensor:
    return nn.functional.normalize(x.double(), dim=-1)


def _gather_rows(x: Tensor, index: Tensor) -> Tensor:
    """x [B, N, D] at index [B, M] -> [B, M, D]."""
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))


def _topk_first(scores: Tensor, k: int) -> Tensor:
    """Indices [B, k] of the k largest scores, in descending order; equal scores go to the earlier index."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :k]


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
    return _gather_rows(merged, kept)


@register_selector("visionzip", needs=("features", "cls_attn", "keys"))
def visionzip(ctx: SelectorContext, k: int) -> Selection:
    """VisionZip: dominant patches by CLS attention + contextual tokens (key-similarity groups merged in F, then
    projected); each merged token takes its target patch's slot."""
    n_dom, n_ctx = visionzip_split(k)
    kept, groups = visionzip_select(ctx.cls_attn, ctx.keys, n_dom, n_ctx)  # [B, k] patch indices
    tokens = _gather_rows(ctx.projected, kept).clone()  # [B, k, D]
    merged_f = visionzip_merge(ctx.features, kept, groups)  # [B, k, Dv]
    for b, row_groups in enumerate(groups):
        cols = [int((kept[b] == target).nonzero()) for target, _ in row_groups]
        if cols:
            idx = torch.tensor(cols, device=kept.device)
            tokens[b, idx] = ctx.project(merged_f[b, idx]).to(tokens.dtype)
    return Selection(kept=kept, tokens=tokens)


# ------------------------------------------------------------------------- DivPrune
def divprune_order(x: Tensor, k: int) -> Tensor:
    """Greedy max-min diversity on x [B, V, D] with D = 1 - cosine: picks [B, k] in pick order.

    First pick: the token whose nearest other token is farthest; then repeatedly the token whose minimum
    distance to the picked set is largest. Ties go to the earlier token.
    """
    b, v, _ = x.shape
    unit = _unit(x)
    dist = 1.0 - unit @ unit.transpose(1, 2)  # [B, V, V]
    if k == 0:
        return torch.zeros(b, 0, dtype=torch.long, device=x.device)
    eye = torch.eye(v, dtype=torch.bool, device=x.device)
    nearest = dist.masked_fill(eye, math.inf).min(dim=-1).values  # [B, V] distance to the nearest other token
    pick = nearest.argmax(dim=-1)  # [B] (argmax returns the first maximum)
    picks = [pick]
    picked = torch.zeros(b, v, dtype=torch.bool, device=x.device)
    min_dist = dist.gather(1, pick[:, None, None].expand(b, 1, v))[:, 0]  # [B, V]
    for _ in range(k - 1):
        picked.scatter_(1, pick[:, None], True)
        pick = min_dist.masked_fill(picked, -math.inf).argmax(dim=-1)
        picks.append(pick)
        min_dist = torch.minimum(min_dist, dist.gather(1, pick[:, None, None].expand(b, 1, v))[:, 0])
    return torch.stack(picks, dim=1)


@register_selector("divprune")
def divprune(ctx: SelectorContext, k: int) -> Selection:
    """DivPrune: greedy max-min diversity (D = 1 - cosine) on the projector output P."""
    return Selection(kept=divprune_order(ctx.projected, k).sort(dim=1).values)


# ------------------------------------------------------------------------- CDPruner
def cdpruner_relevance(projected: Tensor, text_embeds: Tensor, text_mask: Tensor, sign: float = -1.0) -> Tensor:
    """Relevance r [B, V] in [0, 1] of each vision token to the instruction (the LM-embedding variant).

    r_i = sign * mean over the row's valid text tokens j of cosine(P_i, E_j), E = the LM's input embeddings of
    the text after the image; then min-max normalised per row (a row of equal values gets r = 1).
    sign = -1 is the official code's (its quirk for LLaVA's CLIP), kept as the default.
    """
    cos = _unit(projected) @ _unit(text_embeds).transpose(1, 2)  # [B, V, T]
    mask = text_mask[:, None, :].to(cos.dtype)
    raw = sign * (cos * mask).sum(-1) / mask.sum(-1).clamp(min=1)  # [B, V]
    lo, hi = raw.min(dim=-1, keepdim=True).values, raw.max(dim=-1, keepdim=True).values
    span = hi - lo
    return torch.where(span > 0, (raw - lo) / span.clamp(min=torch.finfo(raw.dtype).tiny), torch.ones_like(raw))


def dpp_greedy(kernel: Tensor, k: int, fallback: Tensor | None = None) -> Tensor:
    """Fast greedy MAP of a DPP (Chen et al. 2018) with kernel [B, V, V]: picks [B, k] in pick order.

    Each step picks the largest residual d^2 (ties to the earlier token), updates the Cholesky-like vectors and
    retires the pick. Once every remaining residual is <= DPP_EPS (the kernel's rank is used up), the remaining
    picks go by `fallback` [B, V] (largest first; default: index order), so exactly k tokens come back.
    """
    b, v, _ = kernel.shape
    kernel = kernel.double()
    fallback = torch.zeros(b, v, dtype=torch.float64, device=kernel.device) if fallback is None else fallback.double()
    fb = (fallback - fallback.min(-1, keepdim=True).values) / (
        (fallback.max(-1, keepdim=True).values - fallback.min(-1, keepdim=True).values).clamp(min=1e-300))  # [0, 1]
    cis = torch.zeros(b, k, v, dtype=torch.float64, device=kernel.device)
    d2 = kernel.diagonal(dim1=1, dim2=2).clone()  # [B, V]
    picked = torch.zeros(b, v, dtype=torch.bool, device=kernel.device)
    picks = []
    for i in range(k):
        key = torch.where(d2 > DPP_EPS, d2, fb - 2.0).masked_fill(picked, -math.inf)
        j = key.argmax(dim=-1)  # [B]
        dj = d2.gather(1, j[:, None])  # [B, 1]
        row = kernel.gather(1, j[:, None, None].expand(b, 1, v))[:, 0]  # [B, V] L[j, :]
        cj = cis[:, :i].gather(2, j[:, None, None].expand(b, i, 1))  # [B, i, 1]
        e = (row - (cj * cis[:, :i]).sum(1)) / dj.clamp(min=DPP_EPS).sqrt()  # [B, V]
        e = torch.where(dj > DPP_EPS, e, torch.zeros_like(e))
        cis[:, i] = e
        d2 = d2 - e * e
        picked.scatter_(1, j[:, None], True)
        picks.append(j)
    if not picks:
        return torch.zeros(b, 0, dtype=torch.long, device=kernel.device)
    return torch.stack(picks, dim=1)


@register_selector("cdpruner", options={"relevance_sign": -1.0})
def cdpruner(ctx: SelectorContext, k: int, relevance_sign: float) -> Selection:
    """CDPruner: greedy DPP MAP with kernel L = diag(r) S diag(r), S = cosine(P), r = `cdpruner_relevance`.

    Variant: relevance from the language model's own input embeddings of the text after the image (the models here
    load no CLIP text tower), with the official sign (-1) and min-max normalisation; no 77-token segments.
    """
    rel = cdpruner_relevance(ctx.projected, ctx.text_embeds, ctx.text_mask, float(relevance_sign))  # [B, V]
    unit = _unit(ctx.projected)
    kernel = rel[:, :, None] * (unit @ unit.transpose(1, 2)) * rel[:, None, :]  # [B, V, V]
    return Selection(kept=dpp_greedy(kernel, k, fallback=rel).sort(dim=1).values)


# ------------------------------------------------------------------------- VisPruner
def vispruner_select(cls_attn: Tensor, features: Tensor, k: int, important_ratio: float = 0.5,
                     step: int = 8) -> tuple[Tensor, Tensor]:
    """VisPruner on cls_attn [B, V] and features F [B, V, Dv]: (important [B, k_imp], kept [B, k]) ascending.

    k_imp = int(k * important_ratio) tokens with the largest CLS attention; the rest R, in descending-attention
    order, is thinned to k - k_imp: while |R| > k - k_imp, split R into even / odd positions A / B, score each A
    token by its largest cosine to B, drop the min(step, |R| - (k - k_imp), |A|) highest (ties to the earlier),
    R = the remaining A then B.
    """
    b, v = cls_attn.shape
    n_imp = int(k * important_ratio)
    n_div = k - n_imp
    order = _topk_first(cls_attn.float(), v)  # [B, V] descending attention (the same order `select` uses)
    important = order[:, :n_imp].sort(dim=1).values
    rest = order[:, n_imp:]  # [B, R]
    unit = _unit(features)
    while rest.shape[1] > n_div:
        a, bb = rest[:, 0::2], rest[:, 1::2]
        n_drop = min(step, rest.shape[1] - n_div, a.shape[1])
        if bb.shape[1] == 0:
            score = torch.zeros(a.shape, dtype=torch.float64, device=a.device)
        else:
            score = (_gather_rows(unit, a) @ _gather_rows(unit, bb).transpose(1, 2)).max(dim=-1).values  # [B, |A|]
        dropped = torch.zeros(a.shape, dtype=torch.bool, device=a.device)
        dropped.scatter_(1, _topk_first(score, n_drop), True)
        keep_a = a[~dropped].view(b, a.shape[1] - n_drop)  # the remaining A in their order
        rest = torch.cat([keep_a, bb], dim=1)
    return important, torch.cat([important, rest], dim=1).sort(dim=1).values


def _check_ratio(k: int, n_vision: int, grid: tuple[int, int] | None = None, important_ratio: float = 0.5) -> None:
    if not 0.0 <= float(important_ratio) <= 1.0:
        raise ValueError(f"important_ratio = {important_ratio!r}: must lie in [0, 1]")


@register_selector("vispruner", needs=("features", "cls_attn"), options={"important_ratio": 0.5}, check=_check_ratio)
def vispruner(ctx: SelectorContext, k: int, important_ratio: float) -> Selection:
    """VisPruner: important tokens by CLS attention + diverse tokens by even/odd near-duplicate removal on F."""
    _, kept = vispruner_select(ctx.cls_attn, ctx.features, k, float(important_ratio))
    return Selection(kept=kept)


# ------------------------------------------------------------------------- pooling
def pooling_shape(k: int, rows: int, cols: int) -> tuple[int, int]:
    """(h, w) with h * w = k, h <= rows, w <= cols, closest to square (h <= w on ties): 64 -> 8x8, 128 -> 8x16.

    Raises MethodInfeasible when k has no such factor pair (e.g. 127 on 24 x 24), naming the nearest reachable counts.
    """
    if k == 0:
        return 0, 0
    pairs = [(h, k // h) for h in range(1, rows + 1) if k % h == 0 and k // h <= cols]
    if not pairs:
        reachable = sorted({h * w for h in range(1, rows + 1) for w in range(1, cols + 1)})
        below = max((n for n in reachable if n < k), default=None)
        above = min((n for n in reachable if n > k), default=None)
        raise MethodInfeasible(
            f"pooling keeps h*w tokens of a {rows}x{cols} grid: {k} has no factor pair with h <= {rows} and "
            f"w <= {cols}; nearest reachable counts are {below} and {above}"
        )
    return min(pairs, key=lambda p: (abs(p[1] - p[0]), p[1] < p[0]))


_POOLING_GRID = "the token grid of the rows' images (one image per row, every row the same rows x cols)"


def _check_pooling(k: int, n_vision: int, grid: tuple[int, int] | None = None) -> None:
    """k must factor as h * w within the image's token grid (`grid`; a square one assumed while the images are not
    known yet, as on LLaVA-1.5 whose tower fixes 24 x 24)."""
    if grid is None:
        grid = square_grid(n_vision)
        if grid is None:
            raise MethodInfeasible(f"pooling needs {_POOLING_GRID}: {n_vision} vision tokens are not a square and no "
                                   "common image grid is known")
    elif grid[0] * grid[1] != n_vision:
        raise MethodInfeasible(f"pooling needs one image per row: the image grid {grid[0]}x{grid[1]} holds "
                               f"{grid[0] * grid[1]} tokens, the row {n_vision}")
    pooling_shape(k, *grid)


@register_selector("pooling", check=_check_pooling, grid=True)
def pooling(ctx: SelectorContext, k: int) -> Selection:
    """Adaptive average pooling of the P grid (ctx.grid, the image's rows x cols of tokens: 24 x 24 on LLaVA-1.5,
    Qwen's h x w merged patches) to h x w = k (`pooling_shape`); pooled token (i, j) takes the slot of its window's
    top-left patch, so the slots are distinct and in raster order."""
    if ctx.grid is None:
        raise MethodInfeasible(f"pooling needs {_POOLING_GRID}: no common image grid is known for this batch; batch "
                               "rows whose images share a grid, or run them one at a time")
    rows, cols = ctx.grid
    h, w = pooling_shape(k, rows, cols)
    b, v, d = ctx.projected.shape
    device = ctx.projected.device
    if k == 0:
        return Selection(kept=torch.zeros(b, 0, dtype=torch.long, device=device), tokens=ctx.projected[:, :0])
    grid = ctx.projected.view(b, rows, cols, d).permute(0, 3, 1, 2)  # [B, D, rows, cols]
    pooled = nn.functional.adaptive_avg_pool2d(grid, (h, w)).permute(0, 2, 3, 1).reshape(b, h * w, d)  # [B, k, D]
    top = torch.tensor([i * rows // h for i in range(h)], device=device)  # window starts (adaptive pooling's floor)
    left = torch.tensor([j * cols // w for j in range(w)], device=device)
    kept = (top[:, None] * cols + left[None, :]).reshape(1, k).expand(b, k)
    return Selection(kept=kept, tokens=pooled)


__all__ = [
    "MethodInfeasible", "Selection", "SelectorContext", "SelectorError", "SelectorSpec", "VisionCapture",
    "available_selectors", "cdpruner_relevance", "check_budget", "divprune_order", "dpp_greedy", "get_selector",
    "is_selector", "pooling_shape", "register_selector", "run_selector", "square_grid", "visionzip_merge",
    "visionzip_select", "visionzip_split", "vispruner_select",
]
