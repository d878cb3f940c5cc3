"""A compiled (graph-captured) prefill of the language model, with or without the pruning engine inside it.

At batch 1 on a GPU an eager forward is host-bound: the host issues every kernel of the model (and the engine's), and
dropping tokens only shortens GPU work the host is already waiting behind. Compiling the language model's forward
with the engine's hooks and layer wrappers in place (torch.compile inlines them) turns the pruned prefill into one
graph: scoring, top-k and the gathers are part of it, and with `mode="reduce-overhead"` on CUDA the graph is replayed
as a CUDA graph, one launch for the whole decoder.

`CompiledPrefill(model)` (and `PruningEngine(..., compile=True)`, which opens one after attaching its hooks and
wrappers):

* compiles the language model's forward with static shapes (`dynamic=False`, `fullgraph=True`): one graph per
  (schedule, batch shape); pad prompts to a few lengths (`pad_to_bucket`) so that prompts of one bucket share it;
* runs only prefill forwards compiled; decode steps (one new token) and chunked steps stay eager, so `generate`
  does not recompile for every cache length;
* falls back to the eager forward, once and with a warning naming the reason, when the forward cannot be captured
  (a graph break under `fullgraph`, a backend that fails to build); `fallback_reason` keeps it, `compiled` says
  whether the last prefill ran compiled;
* says when a mode that replays CUDA graphs (`reduce-overhead`, `max-autotune`) could not use them for a graph
  (inductor then runs the compiled kernels without a graph, one launch each, and only logs why): a warning, once,
  and `cudagraph_skip` with inductor's reason (`cudagraphs` is True / False, None for modes without CUDA graphs), so
  that a batch-1 timing labelled "compiled" is not read as a CUDA-graph replay when it was not one;
* restores the model's own forward on exit; the compiled function is dropped with it.
"""
from __future__ import annotations

import logging
import warnings
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from vlm.arch import for_model
from vlm.errors import UserError

log = logging.getLogger(__name__)

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")  # the modes that replay CUDA graphs


class CompileError(UserError, ValueError):
    """A compile option that cannot work; the message says what would."""


def default_mode(device: torch.device) -> str:
    """`reduce-overhead` (CUDA graphs) on CUDA, `default` elsewhere."""
    return "reduce-overhead" if device.type == "cuda" else "default"


def check_mode(mode: Any) -> str | None:
    """A valid compile mode name, or None (the device's default); CompileError otherwise."""
    if mode is None or mode in COMPILE_MODES:
        return mode
    raise CompileError(f"compile mode {mode!r} is unknown; use one of {list(COMPILE_MODES)} or null (CUDA graphs on "
                       "a GPU, plain inductor elsewhere)")


def _language_model(model: nn.Module) -> nn.Module:
    try:
        return for_model(model).language_model
    except (UserError, AttributeError) as err:
        raise CompileError(f"cannot find the language model of {type(model).__name__}: {err}") from None


def _token_input(args: tuple, kwargs: dict) -> Tensor | None:
    """The language model forward's tokens: inputs_embeds [B, N, D] if given, else input_ids [B, N], or None."""
    embeds = kwargs.get("inputs_embeds")
    return embeds if embeds is not None else kwargs.get("input_ids", args[0] if args else None)


def _is_prefill(args: tuple, kwargs: dict) -> bool:
    """A forward over more than one new token with an empty cache (decode and chunked steps are not)."""
    x = _token_input(args, kwargs)
    if x is None or x.shape[1] <= 1:
        return False
    cache = kwargs.get("past_key_values", kwargs.get("cache"))  # (transformers 5 text models: `cache`)
    return cache is None or cache.get_seq_length() == 0


class CompiledPrefill:
    """Context manager: the language model's prefill runs through `torch.compile` (see the module docstring)."""

    def __init__(self, model: nn.Module, mode: str | None = None) -> None:
        self.lm = _language_model(model)
        device = next(model.parameters()).device
        self.mode = check_mode(mode) or default_mode(device)
        self.compiled = False  # the last prefill ran the compiled graph
        self.fallback_reason: str | None = None
        self.cudagraph_skip: str | None = None  # why a graph does not replay as a CUDA graph (modes that would)
        self._fn = None
        self._original = None
        self._installed = None
        self._skip_log: _SkipLog | None = None

    @property
    def cudagraphs(self) -> bool | None:
        """Whether the compiled prefills replay as CUDA graphs: None for a mode without them, False once inductor
        skipped them for a graph (`cudagraph_skip` says why)."""
        if self.mode not in CUDAGRAPH_MODES:
            return None
        return self.cudagraph_skip is None

    def __enter__(self) -> "CompiledPrefill":
        if "forward" in vars(self.lm):
            raise CompileError("the language model's forward is already replaced (another compiled prefill or engine "
                               "with compile=True is open on this model); nest at most one")
        self._original = self.lm.forward  # the bound class method
        self._fn = torch.compile(self._original, dynamic=False, fullgraph=True, mode=self.mode)
        self._installed = self._forward  # one bound-method object, to recognise it on exit
        self.lm.forward = self._installed  # instance attribute: nn.Module.__call__ finds it first
        if self.mode in CUDAGRAPH_MODES:
            self._skip_log = _SkipLog.attach()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._installed is not None and vars(self.lm).get("forward") is self._installed:
            del self.lm.forward
        self._fn = self._installed = None
        if self._skip_log is not None:
            self._skip_log.detach()
            self._skip_log = None

    def _forward(self, *args: Any, **kwargs: Any) -> Any:
        if not _is_prefill(args, kwargs):
            return self._original(*args, **kwargs)
        if self.fallback_reason is None:
            try:
                skips = _cudagraph_skips() if self._skip_log is not None else 0
                out = self._fn(*args, **kwargs)
                self.compiled = True
                if self._skip_log is not None and _cudagraph_skips() > skips:  # a graph built now, without CUDA graphs
                    self._note_cudagraph_skip(args, kwargs)
                return out
            except torch._dynamo.exc.RecompileError:
                raise  # asked for by the caller (error_on_recompile): not a capture failure
            except torch._dynamo.exc.TorchDynamoException as exc:  # capture impossible: say why, then run eager
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                self.fallback_reason = f"{type(exc).__name__}: {first}"
                warnings.warn(f"compile: the prefill cannot be captured as one graph ({self.fallback_reason}); running "
                              "it eager from now on", RuntimeWarning, stacklevel=2)
        self.compiled = False
        return self._original(*args, **kwargs)

    def _note_cudagraph_skip(self, args: tuple, kwargs: dict) -> None:
        ids = _token_input(args, kwargs)
        reason = self._skip_log.reasons[-1] if self._skip_log.reasons else (
            f"the graph runs on {ids.device.type}, not CUDA" if ids is not None and ids.device.type != "cuda"
            else "inductor gave no reason; run with TORCH_LOGS=cudagraphs to see it")
        if self.cudagraph_skip is None:
            warnings.warn(f"compile: mode {self.mode!r} replays CUDA graphs, but this prefill's graph does not "
                          f"({reason}); it runs compiled, one kernel launch at a time", RuntimeWarning, stacklevel=3)
        self.cudagraph_skip = reason


def _cudagraph_skips() -> int:
    """Inductor's count of graphs it did not wrap in CUDA graphs, in this process."""
    from torch._dynamo.utils import counters

    return int(counters["inductor"]["cudagraph_skips"])


class _SkipLog(logging.Handler):
    """Collects inductor's "skipping cudagraphs due to ..." messages while a CompiledPrefill that wants CUDA graphs is
    open (inductor logs them and runs on; it raises nothing)."""

    def __init__(self, logger: logging.Logger) -> None:
        super().__init__(logging.WARNING)
        self.logger = logger
        self.reasons: list[str] = []

    @classmethod
    def attach(cls) -> "_SkipLog":
        from torch._inductor import cudagraph_utils

        handler = cls(cudagraph_utils.cudagraphs_log)
        handler.logger.addHandler(handler)
        return handler

    def detach(self) -> None:
        self.logger.removeHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        self.reasons.append(message.removeprefix("skipping cudagraphs due to ").strip())


def active(model: nn.Module) -> CompiledPrefill | None:
    """The CompiledPrefill open on `model` (its own, or a PruningEngine's with compile=True), or None."""
    installed = vars(_language_model(model)).get("forward")
    owner = getattr(installed, "__self__", None)
    return owner if isinstance(owner, CompiledPrefill) else None


def compiled_prefill(model: nn.Module, mode: str | None = None) -> CompiledPrefill:
    """The unpruned model's prefill compiled the way `PruningEngine(..., compile=True)` compiles a pruned one."""
    return CompiledPrefill(model, mode)


def check_buckets(buckets: Any) -> int | list[int] | None:
    """None, a step (int >= 1: lengths round up to its multiples) or a list of lengths; CompileError otherwise."""
    if buckets is None:
        return None
    if isinstance(buckets, int) and not isinstance(buckets, bool):
        if buckets >= 1:
            return buckets
    elif isinstance(buckets, Sequence) and not isinstance(buckets, str) and buckets and all(
            isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in buckets):
        return sorted(int(b) for b in buckets)
    raise CompileError(f"compile_buckets={buckets!r}: give a step (an int >= 1, e.g. 64: prompts are padded to a "
                       "multiple of it), a list of prompt lengths (e.g. [640, 768]), or null (no padding)")


def bucket_length(length: int, buckets: int | Sequence[int]) -> int:
    """The bucket a prompt of `length` tokens is padded to: the next multiple of a step, or the smallest listed
    length >= length (CompileError when the prompt is longer than every listed length)."""
    buckets = check_buckets(buckets)
    if isinstance(buckets, int):
        return -(-length // buckets) * buckets
    fitting = [b for b in buckets if b >= length]
    if not fitting:
        raise CompileError(f"a prompt of {length} tokens is longer than every compile bucket {buckets}; add a "
                           f"bucket >= {length} (compile_buckets)")
    return fitting[0]


def pad_to_bucket(inputs: dict[str, Tensor], buckets: int | Sequence[int] | None, pad_token_id: int) -> dict[str, Tensor]:
    """Left-pad input_ids and attention_mask [B, N] to the bucket length (no change when buckets is None/empty).

    Left padding keeps each row's tokens at the end, as generation expects; RoPE is relative, so the shifted absolute
    positions leave the outputs equal up to rounding.
    """
    if not buckets:
        return inputs
    ids = inputs["input_ids"]
    target = bucket_length(ids.shape[1], buckets)
    extra = target - ids.shape[1]
    if extra == 0:
        return inputs
    out = dict(inputs)
    pad = ids.new_full((ids.shape[0], extra), int(pad_token_id))
    out["input_ids"] = torch.cat([pad, ids], dim=1)
    mask = inputs.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask
    out["attention_mask"] = torch.cat([mask.new_zeros((ids.shape[0], extra)), mask], dim=1)
    return out


__all__ = ["COMPILE_MODES", "CompileError", "active", "CompiledPrefill", "bucket_length", "check_buckets", "check_mode", "compiled_prefill",
           "default_mode", "pad_to_bucket"]
