"""The pruning engine: drop vision tokens inside the language model during prefill, on stock transformers.

Mechanism (DESIGN.md "Dropping tokens on stock transformers"): a step before each decoder layer's own forward,
installed as a wrapper of it (`_LayerWrap`: an instance attribute, like a with_kwargs forward pre-hook but without
nn.Module's hook path, which costs a few microseconds a layer in host-bound batch-1 prefill; hooks registered on a
layer still run before the step). After a stage layer l has run, the step of layer l+1 gathers the kept positions of
the hidden states; every later layer's step slices `position_embeddings`, `position_ids` and both axes of a 4-D mask
to the tokens that layer holds (once per stage, then passed on). Decode steps (one query token) pass through, with
the decode mask's columns remapped to the keys each layer's cache really holds. Attention rows for scoring come from
`vlm.probe.AttentionProbe` at the stage layers only; SDPA/flash compute every output.

Schedule semantics: a stage {layer: l, keep: k} scores with layer l's attention over the tokens present
at l; the dropped vision tokens leave after layer l, so layers l+1... see k vision tokens. A stage at
layer -1 runs a registered selector (pruning/selectors.py: VisionZip, DivPrune, CDPruner, VisPruner, pooling)
before the language model, so layer 0 already sees k vision tokens; every selector takes this one path.
A scorer registered with a `MergeRule` (sparsevlm_recycle) keeps k minus its merged count by score and puts the
merged tokens in the slots of their clusters' first members (see `_merge_dropped`).

Rows with different vision-token counts (a padded batch of images of different sizes, `TokenLayout.ragged`): each
row keeps its own count k_b (fractions of its own V_b; `Schedule.keep_counts(V_b)`). After a drop the rows are
padded to the longest with some of their own dropped vision tokens kept in place as filler: masked as keys in every
later layer's mask (prefill and decode) and never scored, so each row computes what it would alone. This path runs
only for such batches (text- and last-row scorers); equal-count batches take the code above unchanged.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from pruning.compiled import CompiledPrefill, check_mode
from pruning.flops import prefill_flops
from pruning.schedule import BEFORE_LM, Schedule
from pruning.scorers import (ScoringContext, available_scorers, get_scorer, score as run_scorer, select,
                             select_rows)
from pruning.selectors import (
    SelectorContext, VisionCapture, available_selectors, check_budget, get_selector, is_selector, run_selector,
)
from vlm.arch import for_model
from vlm.errors import UserError
from vlm.layout import TokenLayout
from vlm.probe import AttentionProbe, ProbeCall


SLICED_KWARGS = ("position_embeddings", "position_ids", "cache_position", "attention_mask")


class EngineError(UserError, RuntimeError):
    """The engine cannot run this model/schedule/input combination; the message says what would work."""


@dataclass
class PrefillRecord:
    """What the last prefill did: per stage and row the original vision positions kept, tokens per layer."""

    stage_picks: list[tuple[Tensor, Tensor]] = field(default_factory=list)  # per stage: (cur_idx [B, N'], kept [B, k])
    vision_per_layer: list[int] = field(default_factory=list)  # vision tokens each decoder layer processed (rows
    # with different counts: the largest row's)
    batch_size: int = 0
    widths: tuple[int, int] = (0, 0)  # (hidden size, intermediate size) of the decoder, for `flops`
    layer_tokens: list[Tensor] = field(default_factory=list)  # per layer: the original positions it held [B, N']
    stage_counts: list[tuple[int, ...]] = field(default_factory=list)  # per stage, each row's k (rows that differ)
    row_vision_per_layer: list[list[int]] = field(default_factory=list)  # [B][L] per row (rows that differ)

    @property
    def tokens_per_layer(self) -> list[int]:
        """Sequence length each decoder layer processed (computed when read)."""
        return [cols.shape[1] for cols in self.layer_tokens]

    @property
    def flops(self) -> int:
        """Analytic FLOPs of the decoder layers for ONE row (4nd^2 + 2n^2d + 3ndm per layer), computed when read."""
        return prefill_flops(self.tokens_per_layer, *self.widths) if self.tokens_per_layer else 0

    @property
    def kept_positions(self) -> list[Tensor]:
        """Per stage: [B, k] original positions (slots) of the vision tokens kept, ascending (computed when read,
        so that a prefill does not pay for it)."""
        kept = [cur_idx.gather(1, kept) for cur_idx, kept in self.stage_picks]
        for stage, counts in enumerate(self.stage_counts):  # rows that keep different counts: -1 after a row's own
            width = kept[stage].shape[1]
            short = torch.arange(width, device=kept[stage].device)[None, :] >= \
                torch.tensor(counts, device=kept[stage].device)[:, None]
            kept[stage] = kept[stage].masked_fill(short, -1)
        return kept


@dataclass
class _RowState:
    """Per-prefill bookkeeping of which original tokens the current sequence holds."""

    layout: TokenLayout
    cur_idx: Tensor  # [B, N'] indices into the original sequence of the tokens currently present
    is_vision: Tensor | None  # [B, N'] bool: current token is a vision token (None on the vision-run path)
    # (vision-run path: vision_cur, text_cur and valid_cur are None after a drop until `PruningEngine._current`)
    vision_cur: Tensor | None  # [B, V'] current positions of the vision tokens, ascending
    text_cur: Tensor | None  # [B, T] current positions of the text tokens (layout.text_index shifted by the drops)
    valid_cur: Tensor | None  # [B, N'] bool: current token is real (not padding)
    positions: Tensor | None = None  # [B, N] 0..N-1 (the first cur_idx); its slices index the current sequence
    head: Tensor | None = None  # positions[:, :vision_run], taken at the first drop (vision-run path)
    vision_run: int | None = None  # layout.vision_run: every row's vision tokens are one run starting here (host)
    captured: bool = False  # pos_full and cos_sin_full were read (at the prefill's first layer step)
    pos_full: Tensor | None = None  # [B, N] original position ids (the model's, as every layer receives them)
    cos_sin_full: tuple[Tensor, Tensor] | None = None  # original (cos, sin) [B|1, N, hd]
    n_vision: int = 0  # vision tokens each row currently holds (the same in every row), kept on the host
    pending: Tensor | None = None  # [B, N''] keep-index into the current sequence, applied at the next layer
    pending_vision: int = 0  # vision tokens left once `pending` is applied
    pending_merge: tuple | None = None  # (dropped positions [B, n], their scores [B, n], merged count, kept [B, k'])
    slice_idx: Tensor | None = None  # the cur_idx `sliced` was made for
    slice_src: tuple | None = None  # the layer inputs (mask, position ids, cache position, RoPE tables) it was made from
    sliced: dict[str, Any] | None = None  # the layer kwargs sliced to `cur_idx`, shared by the layers between stages
    # rows with different vision counts only (None / empty otherwise):
    vision_valid_cur: Tensor | None = None  # [B, V'] bool: real slots of vision_cur (the rest repeat a position)
    filler_cur: Tensor | None = None  # [B, N'] bool: dropped vision tokens kept as masked filler (rows padded)
    row_vision: list[int] = field(default_factory=list)  # vision tokens each row holds now (host)
    row_filler: list[int] = field(default_factory=list)  # filler tokens each row holds now (host)
    pending_filler: Tensor | None = None  # [B, N'] the filler of the pending drop, over the current sequence
    pending_rows: tuple | None = None  # (row_vision, row_filler) once `pending` is applied


class PruningEngine:
    """Context manager: prune vision tokens in prefill by a `Schedule` and a named scorer.

    Inside it, plain `model(**inputs)` and `model.generate(**inputs)` run pruned; on exit every hook and layer
    wrapper is removed and the model is exactly as before. `engine.record` describes the last prefill.
    """

    def __init__(
        self,
        model: nn.Module,
        schedule: Schedule,
        scorer: str = "adaptinfer",
        *,
        scorer_options: dict[str, Any] | None = None,
        seed: int = 0,
        compile: bool | str = False,
    ) -> None:
        self.model = model
        self.compile_mode = _compile_mode(compile)
        self._compiled: CompiledPrefill | None = None
        self.schedule = schedule
        self.scorer = scorer
        self.scorer_options = dict(scorer_options or {})
        self.seed = seed
        self.config = model.config
        self.arch = for_model(model)
        self.image_token_id = self.arch.image_token_id
        self.lm = self.arch.language_model
        self.layers = self.arch.decoder_layers
        self.num_layers = len(self.layers)
        refuse_compiled(model)
        schedule.validate(num_layers=self.num_layers)
        if schedule.positions == "renumber" and not self.arch.renumber_positions:
            raise EngineError(
                f"positions: renumber is not possible on {self.config.model_type} (M-RoPE: a token's position is 3-D, "
                "time/height/width); use positions: keep, which keeps each token's original position (as the "
                "authors' Qwen code does)"
            )
        self.stage_layers = [s.layer for s in schedule.stages]
        self._stage_of = {layer: i for i, layer in enumerate(self.stage_layers)}  # stage layer -> its stage number
        self.is_selector = is_selector(scorer)
        self._merge = None
        if self.is_selector:
            self.rows_kind = "none"
            if self.stage_layers != [BEFORE_LM]:
                raise EngineError(
                    f"selector {scorer!r} chooses once, before the language model: its schedule is one stage at layer "
                    f"{BEFORE_LM}, not layers {self.stage_layers}"
                )
            spec = get_selector(scorer)
        else:
            if scorer not in available_scorers():
                raise KeyError(f"scorer = {scorer!r}: unknown; scorers (in the LM) are {available_scorers()}, "
                               f"selectors (before the LM) are {available_selectors()}")
            spec = get_scorer(scorer)
            self.rows_kind, self._merge = spec.rows, spec.merge
            if BEFORE_LM in self.stage_layers:
                raise EngineError(
                    f"a stage at layer {BEFORE_LM} (before the language model) needs a selector "
                    f"{available_selectors()}, not the scorer {scorer!r}"
                )
        unknown = sorted(set(self.scorer_options) - set(spec.options))
        if unknown:
            raise EngineError(f"scorer_options {unknown} are unknown to {scorer!r}; its options are {sorted(spec.options)}")
        if self.is_selector and schedule.vision_tokens is not None:
            check_budget(scorer, schedule.keep_counts()[0], schedule.vision_tokens, self.scorer_options)
        self.seeded = not self.is_selector and spec.seeded
        self._scorer_kwargs = {} if self.is_selector else {**spec.options, **self.scorer_options}  # resolved once
        # the scorer on one text slice and one vision run (the batch-1 path of `_on_rows`), when it has that form
        self._on_slices = None if self.is_selector or self._merge is not None else spec.on_slices
        self._widths = self.arch.text_widths(self.config)
        self._final_norm = self.arch.final_norm  # read once: every stage's context holds it
        self.record = PrefillRecord()
        self._handles: list[Any] = []
        self._probe: AttentionProbe | None = None
        self._state: _RowState | None = None
        self._layer_cols: list[Tensor | None] = [None] * self.num_layers  # original columns each layer's cache holds
        self._layer_vision: list[int] = [0] * self.num_layers  # vision tokens each layer processed
        self._dropped: list[Tensor | None] = [None] * self.num_layers  # [B, 1] tokens dropped before each layer
        self._capture: VisionCapture | None = None
        self._stage_input: tuple[Tensor, Any] | None = None  # (input hidden, (cos, sin)) of a "none"-rows stage layer
        self._decoding = False
        self._generators: list[torch.Generator] | None = None
        self._decode_steps = 0  # one-token steps since the last prefill
        self._row_keeps: list[list[int]] | None = None  # per row, per stage: its keep count (rows that differ)
        self._layer_fill: list[Tensor | None] = [None] * self.num_layers  # filler mask of each layer's tokens
        self._layer_rows: list[list[int] | None] = [None] * self.num_layers  # vision tokens per row at each layer
        self._keep_cache: dict[int, list[int]] = {}  # keep counts per initial vision count (`_counts_for`)

    # -- attach / detach ------------------------------------------------------------------------------
    def __enter__(self) -> "PruningEngine":
        refuse_compiled(self.model)
        try:
            self._handles.append(self.arch.multimodal_model.register_forward_pre_hook(self._on_model_start,
                                                                                      with_kwargs=True))
            first = min(self.stage_layers, default=self.num_layers)
            for i, layer in enumerate(self.layers):  # no step before the first stage's drop, except a layer's own work
                if i > first or self._has_work(i):
                    self._handles.append(_LayerWrap(layer, lambda inner, i=i, layer=layer:
                                                    self._make_layer_forward(i, layer, inner)))
            probe_layers = [l for l in self.stage_layers if l >= 0] if self.rows_kind != "none" else []
            if self.is_selector:
                self._capture = VisionCapture(self.model, get_selector(self.scorer).needs, self.scorer)
                self._capture.__enter__()
                self._handles.append(_Closer(self._capture))
            if probe_layers:
                self._probe = AttentionProbe(self.model, layers=probe_layers, rows=self._probe_rows, on_rows=self._on_rows)
                self._probe.__enter__()
            if self.compile_mode is not None:  # last: the compiled forward traces the hooks and the probe above
                self._compiled = CompiledPrefill(self.model, None if self.compile_mode is True else self.compile_mode)
                self._compiled.__enter__()
                self._handles.append(_Closer(self._compiled))
        except BaseException:
            self._detach()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self._detach()

    @property
    def compiled(self) -> bool:
        """Whether the last prefill ran the compiled graph (compile=True and capture possible)."""
        return self._compiled is not None and self._compiled.compiled

    @property
    def compile_fallback(self) -> str | None:
        """Why the compiled prefill fell back to eager, or None."""
        return self._compiled.fallback_reason if self._compiled is not None else None

    @property
    def cudagraph_skip(self) -> str | None:
        """Why the compiled prefill does not replay as a CUDA graph although its mode would (see pruning.compiled)."""
        return self._compiled.cudagraph_skip if self._compiled is not None else None

    def _detach(self) -> None:
        errors = []
        for handle in self._handles:
            try:
                handle.remove()
            except EngineError as err:  # remove the rest first, then say what was wrong
                errors.append(err)
        self._handles.clear()
        if self._probe is not None:
            self._probe.__exit__(None, None, None)
            self._probe = None
        self._state = None
        self._capture = None
        self._stage_input = None
        if errors:
            raise errors[0]

    # -- prefill start ---------------------------------------------------------------------------------
    def _on_model_start(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            raise EngineError("the pruning engine needs input_ids (to find the image tokens), not inputs_embeds")
        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        if input_ids.shape[1] == 1 or (cache is not None and cache.get_seq_length() > 0):
            if input_ids.shape[1] != 1:
                raise EngineError("a multi-token step after prefill (chunked prefill / speculative decoding) is not supported")
            self._decoding = True  # decode: layer hooks remap masks and positions
            self._decode_steps += 1
            return
        self._decoding = False
        self._decode_steps = 0
        layout = TokenLayout.from_batch(input_ids, kwargs.get("attention_mask"), self.image_token_id,
                                        static=self._compiled is not None)
        batch, seq = input_ids.shape
        n_vision = layout.num_vision if not layout.ragged else self._check_ragged(layout)
        # rows with different counts: the image inputs must hold every row's tokens, checked as one row of them all
        mismatch = self.arch.check_vision_inputs(kwargs, batch, n_vision) if not layout.ragged else \
            self.arch.check_vision_inputs(kwargs, 1, sum(layout.vision_counts))
        if mismatch is not None:
            raise EngineError(mismatch)
        positions = layout.positions if layout.positions is not None else \
            torch.arange(seq, device=input_ids.device).expand(batch, seq)
        # One shared vision run without padding (batch 1, or identical layouts): a drop keeps the run contiguous at
        # the same start, so the kept tokens' places follow from host numbers (slices, no masks to gather). Not when
        # compiled: a graph would then be specialised on where the image starts, not just on the bucket.
        run = layout.vision_run if self._compiled is None else None
        self._state = _RowState(layout=layout, cur_idx=positions, is_vision=None if run is not None else layout.vision_mask,
                                vision_cur=layout.vision_index, text_cur=layout.text_index, valid_cur=layout.valid,
                                n_vision=n_vision, positions=positions, vision_run=run)
        self._generators = row_generators(input_ids, kwargs.get("attention_mask"), self.arch.row_images(kwargs, batch),
                                          self.seed) \
            if self.seeded else None
        self._layer_cols = [positions] + [None] * (self.num_layers - 1)  # layer 0 holds every token (unless a
        self._layer_vision = [n_vision] + [0] * (self.num_layers - 1)  # selector's step at layer 0 says otherwise)
        self._dropped = [None] * self.num_layers
        self.record = PrefillRecord(batch_size=batch)
        if layout.ragged:
            st = self._state
            st.vision_valid_cur, st.filler_cur = layout.vision_valid, torch.zeros_like(layout.valid)
            st.row_vision, st.row_filler = list(layout.vision_counts), [0] * batch
            self._row_keeps = [self._counts_for(v) for v in layout.vision_counts]
            self._keep_counts = [max(ks) for ks in zip(*self._row_keeps)]
            self._layer_fill = [None] * self.num_layers
            self._layer_rows = [st.row_vision] + [None] * (self.num_layers - 1)
        else:
            self._row_keeps = None
            self._keep_counts = self._counts_for(layout.num_vision)

    def _counts_for(self, n_vision: int) -> list[int]:
        """The schedule's keep counts from n_vision tokens, resolved once per count (the schedule is fixed)."""
        counts = self._keep_cache.get(n_vision)
        if counts is None:
            counts = self._keep_cache[n_vision] = self.schedule.keep_counts(n_vision)
        return counts

    def _check_ragged(self, layout: TokenLayout) -> int:
        """The largest row's vision count of a batch whose rows hold different counts; EngineError for what such a
        batch cannot run yet."""
        counts = list(layout.vision_counts)
        why = self.mixed_counts_refusal()
        if why is not None:
            raise EngineError(f"the rows of this batch hold different numbers of vision tokens {counts} (images of "
                              f"different sizes), but {why}; or batch images that give the same count")
        return max(counts)

    def mixed_counts_refusal(self) -> str | None:
        """Why this engine cannot take a batch whose rows hold different numbers of vision tokens, or None when it
        can (the benchmark then runs such a batch in groups of rows that share a count)."""
        why = None
        if self.is_selector:
            why = f"the selector {self.scorer!r} (before the language model) needs one count per batch"
        elif self.rows_kind == "none" or self._merge is not None:
            why = f"the scorer {self.scorer!r} (its scores pool over the vision tokens of a row) supports one count " \
                  "per batch; text- and last-row scorers (adaptinfer, fastv, sparsevlm) take rows that differ"
        elif self.schedule.positions == "renumber":
            why = "positions: renumber needs one count per batch (use positions: keep)"
        elif self._compiled is not None:
            why = "the compiled prefill needs one shape per batch (run eager, compile=False)"
        return why

    # -- per layer -------------------------------------------------------------------------------------
    def _has_work(self, index: int) -> bool:
        """Whether decoder layer `index` has a step of its own in prefill: the layer after a stage (the drop), the last
        (the record), layer 0 for a selector (its stage before the language model) and a stage layer whose scorer
        reads that layer's input. The others only take on the slices made at the layer after the latest drop."""
        stages = self.stage_layers
        return (index == self.num_layers - 1 or (index - 1) in stages or (index == 0 and self.is_selector)
                or (index in stages and self.rows_kind == "none"))

    def _make_layer_forward(self, index: int, layer: nn.Module, inner: Any):
        """Decoder layer `index`'s forward under the engine: the engine's step, then the layer's own forward `inner`."""
        special = self._has_work(index)

        def forward(*args: Any, **kwargs: Any) -> Any:
            if self._decoding:
                changed = self._decode_step(index, args, kwargs)
            else:
                st = self._state
                if st is None:
                    return inner(*args, **kwargs)
                if not special:  # a layer between stages: the slices of the stage's first layer, in place, or nothing
                    # (it holds the tokens the layer before it holds: `_finish_record` writes them down)
                    if st.sliced is None:
                        return inner(*args, **kwargs)
                    if _same_objects(st.slice_src, _slice_sources(kwargs)):
                        kwargs.update(st.sliced)  # the dict forward receives: nothing else to build
                        return inner(*args, **kwargs)
                hidden = args[0] if args else kwargs["hidden_states"]
                changed = self._prefill_step(index, layer, hidden, args, kwargs)
            if changed is not None:
                args, kwargs = changed
            return inner(*args, **kwargs)

        return forward

    def _prefill_step(self, index: int, module: nn.Module, hidden: Tensor, args: tuple, kwargs: dict):
        st = self._state
        if not st.captured:  # the first step of this prefill: the model's own position ids and RoPE tables (every
            # layer receives the same ones from the model until the engine slices them)
            st.pos_full = _expand_batch(kwargs.get("position_ids"), hidden.shape[0])
            st.cos_sin_full = kwargs.get("position_embeddings")
            st.captured = True
        if index == 0 and self.is_selector:
            hidden = self._before_lm_stage(hidden)
        if index >= 1 and self.rows_kind == "none" and not self.is_selector and (index - 1) in self.stage_layers:
            # Scorers that read the stage layer's output (PyramidDrop with the next layer's modules, DART).
            cur_kwargs = self._sliced_kwargs(kwargs, st, hidden) if st.cur_idx.shape[1] != st.layout.seq_len else kwargs
            stage_input, stage_pe = self._stage_input
            ctx = self._context(
                hidden_states=hidden, next_layer=module, position_embeddings=cur_kwargs.get("position_embeddings"),
                stage_input=stage_input, stage_layer=self.layers[index - 1], stage_position_embeddings=stage_pe,
                stage=index - 1,
            )
            self._stage_input = None
            self._apply_selection(index - 1, run_scorer(self.scorer, ctx))
        if st.pending_merge is not None:
            hidden = self._merge_dropped(hidden)
        if st.pending is not None:
            keep = st.pending  # [B, N'] indices into the previous sequence
            hidden = _gather_seq(hidden, keep)
            # the first drop keeps indices into 0..N-1 itself: they are the original positions
            st.cur_idx = keep if st.cur_idx is st.positions else st.cur_idx.gather(1, keep)
            if st.vision_run is None:
                st.is_vision = st.is_vision.gather(1, keep)
                st.valid_cur = st.valid_cur.gather(1, keep)
                # every row drops the same number of vision tokens, all before its text: the text moves by that many
                st.text_cur = st.layout.text_index - (st.layout.seq_len - keep.shape[1])
            else:  # one vision run, no padding: the current indices are slices of 0..N-1, taken when read (`_current`)
                st.vision_cur = st.text_cur = st.valid_cur = None
            st.n_vision = st.pending_vision
            st.pending = None
            if st.pending_filler is not None:  # rows with different counts: their filler leaves the vision tokens
                filler = st.pending_filler.gather(1, keep)
                st.is_vision = st.is_vision & ~filler
                st.valid_cur = st.valid_cur & ~filler
                st.filler_cur, st.pending_filler = filler, None
                st.row_vision, st.row_filler = st.pending_rows
        n_cur = st.cur_idx.shape[1]
        self._layer_cols[index] = st.cur_idx
        self._layer_vision[index] = st.n_vision
        if n_cur != st.layout.seq_len or (st.filler_cur is not None and any(st.row_filler)):
            kwargs = self._sliced_kwargs(kwargs, st, hidden)
        if st.filler_cur is not None:  # rows with different vision counts: what this layer's tokens are, per row
            self._layer_fill[index] = st.filler_cur if any(st.row_filler) else None
            self._layer_rows[index] = st.row_vision
        if self.rows_kind == "none" and not self.is_selector and index in self.stage_layers:
            self._stage_input = (hidden, kwargs.get("position_embeddings"))  # a reference, read at the next layer
        if index == self.num_layers - 1:
            self._finish_record()
        if args:
            args = (hidden,) + tuple(args[1:])
        else:
            kwargs["hidden_states"] = hidden
        return args, kwargs

    def _sliced_kwargs(self, kwargs: dict, st: _RowState, hidden: Tensor) -> dict:
        """`_slice_kwargs`, computed once for the layers between two stages: they receive the same position
        ids, RoPE tables and mask objects from the model (checked by identity), so their slices are the same."""
        src = _slice_sources(kwargs)
        if st.slice_idx is not st.cur_idx or not _same_objects(st.slice_src, src):
            full = self._slice_kwargs(kwargs, st, hidden)
            st.sliced = {k: full[k] for k in SLICED_KWARGS if k in full}
            st.slice_idx, st.slice_src = st.cur_idx, src
        return {**kwargs, **st.sliced}

    def _slice_kwargs(self, kwargs: dict, st: _RowState, hidden: Tensor) -> dict:
        """Position ids, RoPE (cos, sin) and the 4-D mask for the tokens this layer holds."""
        kwargs = dict(kwargs)
        idx = st.cur_idx  # [B, N']
        batch, n_cur = idx.shape
        pos = st.pos_full.gather(1, idx) if st.pos_full is not None else idx
        if self.schedule.positions == "renumber":
            pos = pos - (idx - torch.arange(n_cur, device=idx.device))  # contiguous: minus tokens dropped before
            kwargs["position_embeddings"] = self.arch.rotary_embedding(hidden, position_ids=pos)
        elif st.cos_sin_full is not None:
            cos, sin = st.cos_sin_full
            if batch == 1 and cos.shape[0] == 1:  # one index row for both tables
                flat = idx[0]
                kwargs["position_embeddings"] = (cos.index_select(1, flat), sin.index_select(1, flat))
            else:
                kwargs["position_embeddings"] = (_gather_seq(cos, idx), _gather_seq(sin, idx))
        if "position_ids" in kwargs and kwargs["position_ids"] is not None:
            kwargs["position_ids"] = pos
        if kwargs.get("cache_position") is not None:
            kwargs["cache_position"] = st.positions[0, :n_cur]  # 0..N'-1: a view, not a new tensor
        mask = kwargs.get("attention_mask")
        if isinstance(mask, Tensor) and mask.dim() == 4:
            m = mask.expand(batch, *mask.shape[1:]) if mask.shape[0] == 1 else mask
            m = m.gather(2, idx[:, None, :, None].expand(batch, m.shape[1], n_cur, m.shape[3]))
            kwargs["attention_mask"] = m.gather(3, idx[:, None, None, :].expand(batch, m.shape[1], n_cur, n_cur))
        elif isinstance(mask, Tensor) and mask.dim() == 2:
            kwargs["attention_mask"] = mask.gather(1, idx)
        if st.filler_cur is not None and any(st.row_filler):
            kwargs["attention_mask"] = _mask_keys(kwargs.get("attention_mask"), st.filler_cur, idx)
        return kwargs

    def _decode_step(self, index: int, args: tuple, kwargs: dict):
        cols = self._layer_cols[index]
        if cols is None or self._layer_cols[0] is None:
            return None
        full = self._layer_cols[0].shape[1]
        if cols.shape[1] == full and (self._row_keeps is None or self._layer_fill[index] is None):
            return None  # this layer holds every prefill token: nothing to remap
        filler = self._layer_fill[index] if self._row_keeps is not None else None  # rows with different counts
        kwargs = dict(kwargs)
        mask = kwargs.get("attention_mask")
        if isinstance(mask, Tensor) and mask.dim() in (2, 4):
            total = mask.shape[-1]
            extra = torch.arange(full, total, device=cols.device).expand(cols.shape[0], total - full)
            keep_cols = torch.cat([cols, extra], dim=1)  # [B, K_layer]
            if mask.dim() == 4:
                m = mask.expand(cols.shape[0], *mask.shape[1:]) if mask.shape[0] == 1 else mask
                kwargs["attention_mask"] = m.gather(
                    3, keep_cols[:, None, None, :].expand(m.shape[0], m.shape[1], m.shape[2], keep_cols.shape[1])
                )
            else:
                kwargs["attention_mask"] = mask.gather(1, keep_cols)
        if filler is not None:  # the filler keys stay masked; the tokens generated since are real
            steps = mask.shape[-1] - full if isinstance(mask, Tensor) else self._decode_steps
            keys = torch.cat([filler, torch.zeros(filler.shape[0], steps, dtype=torch.bool, device=filler.device)], 1)
            kwargs["attention_mask"] = _mask_keys(kwargs.get("attention_mask"), keys, None, decode=True)
        if self.schedule.positions == "renumber":
            hidden = args[0] if args else kwargs["hidden_states"]
            pos = _expand_batch(kwargs.get("position_ids"), hidden.shape[0])
            if pos is None:
                raise EngineError("renumbered positions need position_ids in decode")
            if self._dropped[index] is None:  # tokens dropped before this layer: once per layer, not per step
                self._dropped[index] = cols[:, -1:] - (cols.shape[1] - 1)  # [B, 1]
            pos = pos - self._dropped[index]
            kwargs["position_embeddings"] = self.arch.rotary_embedding(hidden, position_ids=pos)
            kwargs["position_ids"] = pos
        return args, kwargs

    # -- scoring and selection -------------------------------------------------------------------------
    def _query_rows(self) -> tuple[Tensor | slice, Tensor | None]:
        """Current positions of the scorer's query rows: text tokens (one slice when they are every row's last T
        tokens), or the last real token."""
        st = self._state
        lay = st.layout
        if self.rows_kind == "text" and lay.text_tail:
            return self._text_slice(), None
        if self.rows_kind == "last":  # the last real token follows every vision token: it moves like the text
            shift = lay.seq_len - st.cur_idx.shape[1]
            return (lay.last_index[:, None] - shift) if shift else lay.last_index[:, None], None
        return self._current().text_cur, None if lay.text_full else lay.text_mask  # no filler rows: nothing to mask

    def _text_slice(self) -> slice:
        """The text tokens' current positions as one slice (when layout.text_tail: every row's last T tokens)."""
        n_cur = self._state.cur_idx.shape[1]
        return slice(n_cur - self._state.layout.text_index.shape[1], n_cur)

    def _probe_rows(self, call: ProbeCall):
        if self._state is None or call.q_len == 1:
            return None
        return self._query_rows()

    def _on_rows(self, call: ProbeCall, rows: Tensor, index: Tensor | slice, mask: Tensor | None) -> None:
        st = self._state
        if self._on_slices is not None and st.vision_run is not None and isinstance(index, slice):
            # batch 1 (or identical rows) with one vision run: the scorer's slice form, the top-k, the drop; no
            # ScoringContext, no index tensors (the same selection as below, in the fewest host steps)
            start, k = st.vision_run, self._keep_counts[self._stage_of[call.site]]
            scores = self._on_slices(rows, index, slice(start, start + st.n_vision), **self._scorer_kwargs)
            self._keep_vision(select(scores, k) + start, k)
            return
        if self.rows_kind == "text":  # the probe's rows are the text rows `_context` computes: pass that very tensor,
            ctx = self._context(attn=rows, stage=call.site)  # so the scorer's consistency check needs no device round trip
        else:
            if mask is None:
                mask = torch.ones_like(index, dtype=torch.bool)
            ctx = self._context(attn=rows, query_index=index, query_mask=mask, stage=call.site)
        self._apply_selection(call.site, run_scorer(self.scorer, ctx))

    def _current(self) -> _RowState:
        """The row state with vision_cur, text_cur and valid_cur in place: on the vision-run path a drop leaves them
        unset, and they are taken here, when a stage reads them, as slices of 0..N-1 (the vision run keeps its start,
        the text stays every row's last T tokens, every token is real); none are made after the last stage."""
        st = self._state
        if st.vision_cur is None:
            n_cur, start = st.cur_idx.shape[1], st.vision_run
            st.vision_cur = st.positions[:, start:start + st.n_vision]
            st.text_cur = st.positions[:, n_cur - st.layout.text_index.shape[1]:n_cur]
            st.valid_cur = st.layout.valid[:, :n_cur]
        return st

    def _context(self, **kw: Any) -> ScoringContext:
        st = self._current()
        vision_cur, text_cur, key_mask = st.vision_cur, st.text_cur, st.valid_cur
        return ScoringContext(
            attn=kw.get("attn"),
            query_index=kw.get("query_index", text_cur),
            query_mask=kw.get("query_mask", st.layout.text_mask),
            vision_index=vision_cur,
            text_index=text_cur,
            text_mask=st.layout.text_mask,
            key_mask=key_mask,
            text_full=st.layout.text_full,
            text_slice=self._text_slice() if st.layout.text_tail else None,
            vision_slice=slice(st.vision_run, st.vision_run + st.n_vision) if st.vision_run is not None else None,
            generators=self._generators,
            hidden_states=kw.get("hidden_states"),
            next_layer=kw.get("next_layer"),
            position_embeddings=kw.get("position_embeddings"),
            keep=self._keep_counts[self._stage_of[kw["stage"]]] if "stage" in kw else None,
            stage_input=kw.get("stage_input"),
            stage_layer=kw.get("stage_layer"),
            stage_position_embeddings=kw.get("stage_position_embeddings"),
            final_norm=self._final_norm,
            options=self.scorer_options,
            vision_mask=st.vision_valid_cur,
        )

    def _apply_selection(self, stage_layer: int, scores: Tensor) -> None:
        """Top-k of `scores` [B, V_cur]; the drop happens at the next layer's step.

        With a MergeRule, the top k - m by score are kept and the m merged tokens are made at the next layer's step
        from that layer's output (`_merge_dropped`), so the stage still leaves exactly k vision tokens.
        """
        st = self._state
        if self._row_keeps is not None:
            return self._apply_row_selection(stage_layer, scores)
        k = self._keep_counts[self._stage_of[stage_layer]]
        vision_cur = self._current().vision_cur  # [B, V_cur]
        n_merged = self._merge.split(st.n_vision, k, **self._merge_options()) if self._merge is not None else 0
        kept_v = select(scores, k - n_merged)  # [B, k'] indices into the vision axis, ascending
        kept_pos = vision_cur.gather(1, kept_v) if st.vision_run is None else kept_v + st.vision_run  # current positions
        if n_merged:
            dropped = ~torch.zeros_like(scores, dtype=torch.bool).scatter(1, kept_v, True)  # [B, V_cur]
            dropped_v = _true_positions(dropped, st.n_vision - kept_v.shape[1])  # [B, n] ascending
            st.pending_merge = (vision_cur.gather(1, dropped_v), scores.gather(1, dropped_v), n_merged, kept_pos)
            return
        self._keep_vision(kept_pos, k)

    def _apply_row_selection(self, stage_layer: int, scores: Tensor) -> None:
        """`_apply_selection` for rows with different vision counts: row b keeps its own top k_b of its real slots;
        the rows are then padded to the longest with some of their dropped vision tokens as (masked) filler."""
        st = self._state
        stage = self._stage_of[stage_layer]
        keeps = [row[stage] for row in self._row_keeps]  # host
        kept_v, picked = select_rows(scores, keeps, st.vision_valid_cur)  # [B, Kmax], repeats after a row's own
        kept_pos = st.vision_cur.gather(1, kept_v)  # [B, Kmax] current positions
        self.record.stage_picks.append((st.cur_idx, kept_pos))
        self.record.stage_counts.append(tuple(keeps))
        n_cur = st.cur_idx.shape[1]
        leaving = (st.is_vision | st.filler_cur).scatter(1, kept_pos, False)  # dropped vision tokens and old filler
        lengths = [n_cur - v - f + k for v, f, k in zip(st.row_vision, st.row_filler, keeps)]
        n_new = max(lengths)
        fill = [n_new - length for length in lengths]  # filler each row needs to reach the longest
        rank = leaving.cumsum(1)
        filler = leaving & (rank <= torch.tensor(fill, device=rank.device)[:, None])  # its first leaving tokens
        st.pending = _true_positions(~leaving | filler, n_new)
        st.vision_cur = torch.searchsorted(st.pending.contiguous(), kept_pos)
        st.vision_valid_cur = picked
        st.pending_vision = max(keeps)
        st.pending_filler = filler
        st.pending_rows = (keeps, fill)

    def _merge_options(self) -> dict:
        spec = get_scorer(self.scorer)
        return {name: self.scorer_options.get(name, default) for name, default in spec.options.items()}

    def _keep_vision(self, kept_pos: Tensor, k: int) -> None:
        """Record and schedule the drop: keep the non-vision tokens and the vision tokens at kept_pos [B, k]
        (ascending current positions); the gather happens at the next layer's step."""
        st = self._state
        self.record.stage_picks.append((st.cur_idx, kept_pos))
        st.pending_vision = k
        if st.vision_run is not None:  # [before the run][kept][after the run], as slices of 0..N-1
            start, pos = st.vision_run, st.positions
            if st.head is None:
                st.head = pos[:, :start]
            st.pending = torch.cat([st.head, kept_pos, pos[:, start + st.n_vision:st.cur_idx.shape[1]]], dim=1)
            return
        drop_mask = st.is_vision.scatter(1, kept_pos, False)
        st.pending = _false_positions(drop_mask, st.cur_idx.shape[1] - st.n_vision + k)
        # where the kept ones sit once the drop is applied (a slice of sort indices: contiguous at batch 1 only)
        st.vision_cur = torch.searchsorted(st.pending.contiguous(), kept_pos)

    def _merge_dropped(self, hidden: Tensor) -> Tensor:
        """Merge dropped tokens by the scorer's MergeRule on the stage layer's output hidden [B, N', D].

        Each cluster becomes the plain mean of its members' hidden states and takes the slot of its first member
        (lowest position): that member's RoPE position and place in the sequence. The merged tokens are vision
        tokens: kept + merged = the stage's keep count.
        """
        st = self._state
        dropped_pos, dropped_scores, n_merged, kept_pos = st.pending_merge
        st.pending_merge = None
        members = _gather_seq(hidden, dropped_pos)  # [B, n, D]
        assign = self._merge.assign(members, dropped_scores, n_merged, **self._merge_options())  # [B, n] in -1..m-1
        onehot = assign[..., None] == torch.arange(n_merged, device=assign.device)  # [B, n, m]
        counts = onehot.sum(1).clamp(min=1)  # [B, m]
        means = torch.einsum("bnm,bnd->bmd", onehot.to(members.dtype), members) / counts[..., None].to(members.dtype)
        big = torch.iinfo(dropped_pos.dtype).max
        slots = torch.where(onehot, dropped_pos[..., None], big).min(dim=1).values  # [B, m] first member's position
        hidden = hidden.scatter(1, slots[..., None].expand(-1, -1, hidden.shape[-1]), means.to(hidden.dtype))
        self._keep_vision(torch.cat([kept_pos, slots], dim=1).sort(dim=1).values, kept_pos.shape[1] + n_merged)
        return hidden

    def _finish_record(self) -> None:
        cols, vision = self._layer_cols, self._layer_vision  # fresh lists every prefill: no copy needed
        for i in range(1, self.num_layers):  # the layers between stages hold what the layer before them holds
            if cols[i] is None:
                cols[i], vision[i] = cols[i - 1], vision[i - 1]
        self.record.layer_tokens = cols
        self.record.vision_per_layer = vision
        self.record.widths = self._widths
        if self._row_keeps is not None:  # rows with different counts: the layers between stages hold what the
            for i in range(1, self.num_layers):  # stage's first layer holds (the same tokens)
                if self._layer_rows[i] is None:
                    self._layer_rows[i], self._layer_fill[i] = self._layer_rows[i - 1], self._layer_fill[i - 1]
            self.record.row_vision_per_layer = [list(col) for col in zip(*self._layer_rows)]

    # -- before the language model: the registered selector -------------------------------------------
    def _before_lm_stage(self, hidden: Tensor) -> Tensor:
        """Layer 0's input hidden [B, N, D]: run the selector on P (= the vision slots of it), the text embeddings and
        what VisionCapture saw; write its tokens into the kept slots and drop the rest before layer 0."""
        st = self._state
        lay = st.layout
        k = self._keep_counts[0]
        captured = self._capture.take(hidden.shape[0], lay.num_vision)
        ctx = SelectorContext(
            projected=_gather_seq(hidden, lay.vision_index), text_embeds=_gather_seq(hidden, lay.text_index),
            text_mask=lay.text_mask, grid=self._capture.grid(hidden.shape[0]), features=captured.get("features"),
            cls_attn=captured.get("cls_attn"), keys=captured.get("keys"), project=self._capture.project,
            options=self.scorer_options,
        )
        selection = run_selector(self.scorer, ctx, k)
        kept_pos = lay.vision_index.gather(1, selection.kept)  # [B, k] positions (the sequence is still whole)
        if selection.tokens is not None:
            tokens = selection.tokens.to(hidden.dtype)
            hidden = hidden.scatter(1, kept_pos[..., None].expand(-1, -1, hidden.shape[-1]), tokens)
        self._keep_vision(kept_pos, k)
        return hidden


def row_generators(input_ids: Tensor, attention_mask: Tensor | None, pixel_values: Tensor | None,
                   seed: int) -> list[torch.Generator]:
    """One CPU generator per row, seeded from `seed` and the row's own content (its unpadded token ids, and its
    image when pixel_values holds one image per row): a sample draws the same numbers at any batch size or position.

    input_ids, attention_mask: [B, N]; pixel_values: [B, ...] one entry per row (the family's `row_images`), or
    None (the ids alone name the row).
    """
    ids = input_ids.detach().to("cpu", torch.int64)
    valid = attention_mask.detach().to("cpu").bool() if attention_mask is not None else torch.ones_like(ids, dtype=torch.bool)
    one_per_row = isinstance(pixel_values, Tensor) and pixel_values.shape[0] == ids.shape[0]
    out = []
    for b in range(ids.shape[0]):
        digest = hashlib.blake2b(str(int(seed)).encode(), digest_size=8)
        digest.update(ids[b][valid[b]].numpy().tobytes())
        if one_per_row:
            digest.update(pixel_values[b].detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        out.append(torch.Generator().manual_seed(int.from_bytes(digest.digest(), "little") >> 1))
    return out


def _compile_mode(compile: Any) -> bool | str | None:
    """None (eager), True (the device's default mode) or a mode name from the engine's `compile` argument."""
    if compile is False or compile is None:
        return None
    if compile is True:
        return True
    return check_mode(compile)


def refuse_compiled(model: nn.Module) -> None:
    """Raise EngineError when `model` or one of its submodules was compiled with torch.compile.

    Dynamo skips nn.Module hook guards by default, so hooks added after compilation can be ignored without a word:
    the forward would run unpruned. The engine refuses instead of pruning nothing.
    """
    compiled = [name or "the model" for name, module in model.named_modules()
                if getattr(module, "_compiled_call_impl", None) is not None or hasattr(module, "_orig_mod")]
    if compiled:
        raise EngineError(
            f"{compiled[0]} was compiled with torch.compile before the pruning engine attached its hooks; compiled "
            "code ignores hooks added later, so the forward would run unpruned. Attach the engine to the uncompiled "
            "model (enter `with PruningEngine(...)` first, compile inside it if you need to)"
        )


class _LayerWrap:
    """Replaces a decoder layer's forward with `make_forward(inner)`, a function that does the engine's step and then
    calls `inner`, the forward found (an instance attribute, as pruning.compiled does for the language model). Unlike a
    with_kwargs forward pre-hook, this keeps nn.Module's call on its fast path: a few microseconds less per layer,
    which counts at batch 1, where the host is the bottleneck. Hooks registered on the layer still run first.
    `remove` puts back the forward found (the class's, or another wrapper's such as accelerate's)."""

    def __init__(self, module: nn.Module, make_forward: Any) -> None:
        self.module = module
        self.saved = vars(module).get("forward")  # an instance forward set by someone else, or None
        self.installed = make_forward(module.forward)
        module.forward = self.installed

    def remove(self) -> None:
        if vars(self.module).get("forward") is not self.installed:
            raise EngineError(f"the forward of {type(self.module).__name__} was replaced while the pruning engine was "
                              "attached; detach in the reverse order of attaching")
        if self.saved is None:
            del self.module.forward
        else:
            self.module.forward = self.saved


class _Closer:
    """Adapts a context manager to the removable-handle protocol used for hooks."""

    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx

    def remove(self) -> None:
        self.ctx.__exit__(None, None, None)


def _slice_sources(kwargs: dict) -> tuple:
    """The layer inputs the engine slices (mask, position ids, cache position, the RoPE tables' tuple), to compare by
    identity (a model that passes its layers one tuple of tables passes the same object to each)."""
    return (kwargs.get("attention_mask"), kwargs.get("position_ids"), kwargs.get("cache_position"),
            kwargs.get("position_embeddings"))


def _same_objects(a: tuple | None, b: tuple) -> bool:
    """Identity, element by element (`==` on tensors would compare values, on the device)."""
    return a is not None and a[0] is b[0] and a[1] is b[1] and a[2] is b[2] and a[3] is b[3]


def _mask_keys(mask: Tensor | None, masked: Tensor, idx: Tensor | None, decode: bool = False) -> Tensor:
    """A layer's attention mask with the keys where masked [B, K] is True hidden from every query: a 4-D mask
    (bool: False; float: the dtype's minimum) or a 2-D padding mask (0). With no mask (no padding) the causal mask
    over the original positions idx [B, K] is built (bool), or in decode [B, 1, 1, K] over the keys alone."""
    if mask is None:
        keep = ~masked
        if decode:
            return keep[:, None, None, :]
        causal = idx[:, None, :] <= idx[:, :, None]  # [B, Q, K]: a key at or before the query's original position
        return (causal & keep[:, None, :])[:, None]
    if mask.dim() == 2:
        return mask * (~masked).to(mask.dtype)
    hide = masked[:, None, None, :]
    if mask.dtype == torch.bool:
        return mask & ~hide
    return mask.masked_fill(hide, torch.finfo(mask.dtype).min)


def _expand_batch(t: Tensor | None, batch: int) -> Tensor | None:
    if t is None:
        return None
    return t.expand(batch, t.shape[-1]) if t.shape[0] == 1 and batch != 1 else t


def _gather_seq(t: Tensor, idx: Tensor) -> Tensor:
    """Gather t [B|1, N, D] along the sequence axis with idx [B, N'] -> [B, N', D]."""
    if idx.shape[0] == 1 and t.shape[0] == 1:  # batch 1: index_select (advanced indexing costs more on the host)
        return t.index_select(1, idx[0])
    if t.shape[0] == 1:  # shared by the rows (RoPE tables): one indexing op
        return t[0][idx]
    return t.gather(1, idx[..., None].expand(-1, -1, t.shape[-1]))


def _true_positions(mask: Tensor, count: int) -> Tensor:
    """Ascending positions [B, count] of the True entries of mask [B, N], each row holding exactly `count`.

    A stable sort instead of `nonzero`: the count is known on the host, so nothing waits for the GPU (a
    `nonzero` or `int(tensor)` in every layer hook stalls the host until the device catches up).
    """
    return torch.sort((~mask).to(torch.uint8), dim=1, stable=True).indices[:, :count]


def _false_positions(mask: Tensor, count: int) -> Tensor:
    """Ascending positions [B, count] of the False entries of mask [B, N] (`_true_positions` of ~mask, one op less)."""
    return torch.sort(mask, dim=1, stable=True).indices[:, :count]  # False sorts first; stable keeps the order

