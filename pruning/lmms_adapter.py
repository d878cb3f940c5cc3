"""Hand a pruned model to lmms-eval through its model API (`lmms_eval.api.model.lmms`), without a fork.

`PrunedVLM` (alias `PrunedLLaVA`) wraps a `LoadedModel` of any supported family (LLaVA, Qwen2-VL / Qwen2.5-VL; it
reaches the model only through `vlm.arch`) and a `PruningEngine` (schedule + scorer) and implements the "simple" model
API of lmms-eval: `generate_until`, `loglikelihood` and `generate_until_multi_round`. Requests carry
`args = (context, gen_kwargs, doc_to_visual, doc_id, task, split)` for generation and
`(context, doc_to_target, doc_to_visual, doc_id, task, split)` for log-likelihood; the document is looked up in
`self.task_dict[task][split][doc_id]`, which lmms-eval's evaluator fills in before it calls the model.

When lmms-eval is importable the class subclasses its `lmms` base and is registered as `adaptinfer_pruned`:

    python -m lmms_eval --model adaptinfer_pruned \
        --model_args model=llava-1.5-7b,method=adaptinfer,budget=64,convention=processed --tasks pope
    # (the model must be importable first: `import pruning.lmms_adapter` from a plugin or wrapper script)

Without lmms-eval the same class works on any object with that `args` tuple (tests use a stand-in).
Pruning happens in every prefill (generation and log-likelihood); the unpruned model is `method=unpruned`.
One image per request; text-only requests run without pruning. When the vision-token count follows the image size
(Qwen with a dynamic-resolution processor), a method whose keep counts are solved from a budget cannot be resolved
up front: give a schedule of fractions instead (`schedule=adaptinfer_qwen2vl2b_10`, a configs/schedule preset name or
a YAML path, with `scorer=adaptinfer`), and rows of a batch with different counts run one at a time.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from omegaconf import OmegaConf
from PIL import Image

from pruning.engine import PruningEngine
from pruning.methods import (CONFIGS_DIR, SCHEDULE_NONE, MethodError, check_method, fixed_budget, load_method,
                             preset_path, resolve_method)
from pruning.schedule import Schedule, schedule_string
from vlm.errors import UserError
from vlm.models import LoadedModel, load_from_config
from vlm.prompts import encode_batch, format_prompt
from vlm.tasks.base import VQASample

log = logging.getLogger(__name__)

REGISTERED_NAME = "adaptinfer_pruned"
DEFAULT_MAX_NEW_TOKENS = 32
IMAGE_PLACEHOLDER = "<image>"

try:  # pragma: no cover - depends on the environment
    from lmms_eval.api.model import lmms as _LMMSBase

    HAVE_LMMS_EVAL = True
except Exception:  # lmms-eval absent (or broken): a plain base with the same attributes
    HAVE_LMMS_EVAL = False

    class _LMMSBase:  # type: ignore[no-redef]
        """Stand-in for lmms_eval.api.model.lmms when lmms-eval is not installed."""

        is_simple: bool = True

        def __init__(self) -> None:
            self._rank = 0
            self._world_size = 1
            self.task_dict: dict = {}

        @property
        def rank(self) -> int:
            return self._rank

        @property
        def world_size(self) -> int:
            return self._world_size


class AdapterError(UserError, ValueError):
    """A request or option the adapter cannot serve; the message says what would work."""


def _flatten_visuals(visuals: Any) -> list[Image.Image]:
    """doc_to_visual output (an image, a list, or nested lists) as a flat list of PIL images."""
    if visuals is None:
        return []
    if isinstance(visuals, Image.Image):
        return [visuals]
    out: list[Image.Image] = []
    for v in visuals:
        out += _flatten_visuals(v)
    return out


def _as_bool(value: Any) -> bool:
    return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")


class PrunedVLM(_LMMSBase):
    """lmms-eval model: a VLM (any family of vlm.arch) whose prefill drops vision tokens by a schedule and a scorer.

    Give either `loaded` (a LoadedModel) or `model` (a configs/model preset name or a YAML path); then either
    `schedule` (a Schedule, a schedule YAML path or a configs/schedule preset name) with `scorer`, or `method`
    (configs/method name) with `budget`.
    """

    is_simple = True

    def __init__(
        self,
        model: str = "demo",
        method: str = "adaptinfer",
        budget: float | None = 64,
        convention: str = "processed",
        schedule: Schedule | str | None = None,
        scorer: str | None = None,
        scorer_options: Mapping[str, Any] | None = None,
        batch_size: int = 1,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        device: str | None = None,
        seed: int = 0,
        loaded: LoadedModel | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if kwargs:
            raise AdapterError(
                f"unknown model_args {sorted(kwargs)}; accepted: model, method, budget, convention, schedule, scorer, "
                "scorer_options, batch_size, max_new_tokens, device, seed"
            )
        if loaded is None:
            loaded = load_from_config(self._model_preset(model, device))
        self.loaded = loaded
        self.processor = loaded.processor
        if self.processor is None:
            raise AdapterError(f"model {loaded.name!r} has no processor; lmms-eval needs one to build prompts")
        self.batch_size_per_gpu = int(batch_size)
        if self.batch_size_per_gpu < 1:
            raise AdapterError(f"batch_size={batch_size!r} must be >= 1")
        self.max_new_tokens = int(max_new_tokens)
        self.seed = int(seed)
        self.schedule, self.scorer, self.scorer_options = self._pruning(
            method, budget, convention, schedule, scorer, dict(scorer_options or {})
        )
        self.model_name = f"{loaded.name}:{self.scorer or 'unpruned'}:{self.schedule_string}"

    # -- construction ------------------------------------------------------------------------------------------
    @staticmethod
    def _model_preset(model: str, device: str | None) -> dict[str, Any]:
        path = Path(model) if str(model).endswith((".yaml", ".yml")) else CONFIGS_DIR / "model" / f"{model}.yaml"
        if not path.is_file():
            known = sorted(p.stem for p in (CONFIGS_DIR / "model").glob("*.yaml"))
            raise AdapterError(f"model={model!r}: no preset at {path}; use one of {known} or a YAML path")
        cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
        if device:
            cfg["device"] = device
        return cfg  # type: ignore[return-value]

    def _pruning(self, method: str, budget: float | None, convention: str, schedule: Schedule | str | None,
                 scorer: str | None, options: dict) -> tuple[Schedule | None, str | None, dict]:
        n_layers = self.loaded.num_layers
        n_vision = self.loaded.fixed_vision_tokens  # None: it follows the image size
        if schedule is not None:
            sched = schedule if isinstance(schedule, Schedule) else Schedule.from_yaml(self._schedule_path(schedule))
            sched.validate(num_layers=n_layers, initial=n_vision)
            if sched.stages and not scorer:
                raise AdapterError("a schedule with stages needs a scorer (e.g. scorer=adaptinfer)")
            return (sched if sched.stages else None), scorer, options
        spec = check_method(load_method(str(method)))
        if spec["schedule"] == SCHEDULE_NONE:
            return None, None, {}
        if budget is None and not fixed_budget(spec):
            raise AdapterError(f"method={method!r} needs a budget (mean vision tokens per layer), e.g. budget=64")
        if n_vision is None and not fixed_budget(spec):
            raise AdapterError(
                f"method={method!r} solves keep counts from a budget of vision tokens, but model {self.loaded.name!r} "
                f"({self.loaded.config.model_type}) gives a vision-token count that follows the image size; give a "
                "schedule of fractions instead, e.g. schedule=adaptinfer_qwen2vl2b_10,scorer=adaptinfer (configs/"
                "schedule/), or a processor that resizes every image to one size"
            )
        resolved = resolve_method(spec, n_layers, n_vision, float(budget or 0), convention)
        return resolved.schedule, scorer or resolved.scorer, {**resolved.scorer_options, **options}

    @staticmethod
    def _schedule_path(schedule: str | Path) -> str:
        """A schedule YAML path as given, or the path of a configs/schedule preset name."""
        text = str(schedule)
        if text.endswith((".yaml", ".yml")) or "/" in text:
            return text
        try:
            return str(preset_path(text))
        except MethodError as err:
            raise AdapterError(f"schedule={text!r}: {err}") from None

    @property
    def schedule_string(self) -> str:
        return schedule_string(self.schedule) or "none"

    # -- lmms-eval properties ------------------------------------------------------------------------------------
    @property
    def model(self) -> torch.nn.Module:
        return self.loaded.model

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    @property
    def device(self) -> torch.device:
        return self.loaded.device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def eot_token_id(self) -> int | None:
        return self.tokenizer.eos_token_id

    # -- helpers ---------------------------------------------------------------------------------------------------
    def _engine(self, with_image: bool):
        """The pruning context for one forward/generate call (a no-op for the unpruned model or text-only input)."""
        import contextlib

        if self.schedule is None or not with_image:
            return contextlib.nullcontext()
        return PruningEngine(self.loaded.model, self.schedule, scorer=self.scorer, scorer_options=self.scorer_options,
                             seed=self.seed)

    def _doc(self, task: str, split: str, doc_id: Any) -> Any:
        try:
            return self.task_dict[task][split][doc_id]
        except (KeyError, IndexError, TypeError) as err:
            raise AdapterError(
                f"document {doc_id!r} of task {task!r} split {split!r} is not in task_dict; lmms-eval's evaluator fills "
                "model.task_dict[task][split] before calling the model (set it yourself when calling directly)"
            ) from err

    def _image(self, doc_to_visual: Callable[[Any], Any] | None, doc: Any) -> Image.Image | None:
        images = _flatten_visuals(doc_to_visual(doc)) if doc_to_visual is not None else []
        if len(images) > 1:
            raise AdapterError(f"a request has {len(images)} images; this adapter serves one image per request")
        return images[0].convert("RGB") if images else None

    @staticmethod
    def _text(context: str) -> str:
        return context.replace(IMAGE_PLACEHOLDER, "").strip()

    def _encode(self, contexts: Sequence[str], images: Sequence[Image.Image | None]) -> dict[str, torch.Tensor]:
        if all(img is not None for img in images):
            samples = [VQASample(sample_id=str(i), image=img, question=c, prompt=self._text(c), answers=[])
                       for i, (c, img) in enumerate(zip(contexts, images))]
            return encode_batch(self.processor, samples, device=self.device, dtype=self.loaded.dtype)
        if any(img is not None for img in images):
            raise AdapterError("a batch mixes requests with and without an image; use batch_size=1 for such tasks")
        texts = [format_prompt(self.processor, self._text(c), with_image=False) for c in contexts]
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, padding_side="left")
        return {k: v.to(self.device) for k, v in enc.items()}

    def _same_vision_counts(self, inputs: Mapping[str, torch.Tensor]) -> bool:
        """Whether every row holds the same number of image tokens (the engine prunes such batches only)."""
        counts = (inputs["input_ids"] == self.loaded.arch.image_token_id).sum(-1)
        return bool((counts == counts[0]).all())

    @staticmethod
    def _cut(text: str, until: Iterable[str]) -> str:
        for stop in until:
            if stop and stop in text:
                text = text.split(stop, 1)[0]
        return text

    # -- the lmms-eval API -----------------------------------------------------------------------------------------
    def generate_until(self, requests: Sequence[Any]) -> list[str]:
        """Generate for each request until a stop string or max_new_tokens; greedy unless gen_kwargs ask to sample."""
        args = [r.args for r in requests]
        results: list[str | None] = [None] * len(args)
        groups: dict[str, list[int]] = {}
        for i, a in enumerate(args):
            groups.setdefault(repr(sorted((a[1] or {}).items())), []).append(i)
        for indices in groups.values():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start:start + self.batch_size]
                gen_kwargs = dict(args[chunk[0]][1] or {})
                until = gen_kwargs.pop("until", None)
                if until is None:
                    until = [self.tokenizer.decode([self.eot_token_id])] if self.eot_token_id is not None else []
                until = [until] if isinstance(until, str) else list(until)
                contexts = [args[i][0] for i in chunk]
                images = [self._image(args[i][2], self._doc(args[i][4], args[i][5], args[i][3])) for i in chunk]
                temperature = float(gen_kwargs.get("temperature", 0) or 0)
                do_sample = _as_bool(gen_kwargs.get("do_sample", False)) and temperature > 0
                kwargs: dict[str, Any] = dict(
                    max_new_tokens=int(gen_kwargs.get("max_new_tokens", self.max_new_tokens)), do_sample=do_sample,
                    num_beams=int(gen_kwargs.get("num_beams", 1) or 1), pad_token_id=self.tokenizer.pad_token_id,
                )
                if do_sample:
                    kwargs["temperature"] = temperature
                    if gen_kwargs.get("top_p") is not None:
                        kwargs["top_p"] = float(gen_kwargs["top_p"])
                texts = self._generate(contexts, images, kwargs)
                for i, text in zip(chunk, texts):
                    results[i] = self._cut(text, until).strip()
        return [r if r is not None else "" for r in results]

    def _generate(self, contexts: Sequence[str], images: Sequence[Image.Image | None], kwargs: dict) -> list[str]:
        """Generated texts for one batch; rows whose images give different vision-token counts (dynamic resolution)
        are generated one at a time."""
        inputs = self._encode(contexts, images)
        if images[0] is not None and len(contexts) > 1 and not self._same_vision_counts(inputs):
            return [self._generate([c], [img], kwargs)[0] for c, img in zip(contexts, images)]
        with self._engine(images[0] is not None), torch.inference_mode():
            out = self.model.generate(**inputs, **kwargs)
        return self.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

    def loglikelihood(self, requests: Sequence[Any]) -> list[tuple[float, bool]]:
        """(sum of log-probabilities of the continuation, whether greedy decoding would produce it) per request."""
        out: list[tuple[float, bool]] = []
        for req in requests:
            context, doc_to_target, doc_to_visual, doc_id, task, split = req.args
            doc = self._doc(task, split, doc_id)
            continuation = doc_to_target if isinstance(doc_to_target, str) else doc_to_target(doc)
            image = self._image(doc_to_visual, doc)
            prompt_inputs = self._encode([context], [image])
            cont_ids = self.tokenizer(str(continuation), add_special_tokens=False, return_tensors="pt")["input_ids"]
            cont_ids = cont_ids.to(self.device)
            n_cont = int(cont_ids.shape[1])
            if n_cont == 0:
                out.append((0.0, True))
                continue
            inputs = self.loaded.arch.extend_text(prompt_inputs, cont_ids)  # the family's per-token inputs too
            with self._engine(image is not None), torch.inference_mode():
                logits = self.model(**inputs, use_cache=False).logits  # [1, N', vocab]; N' < N when pruned
            # pruning drops vision tokens only, so the text (and continuation) stays at the end of the sequence
            pred = logits[:, -n_cont - 1:-1].float().log_softmax(-1)  # [1, n_cont, vocab]
            logprob = pred.gather(-1, cont_ids[..., None])[..., 0].sum().item()
            greedy = bool((pred.argmax(-1) == cont_ids).all().item())
            out.append((float(logprob), greedy))
        return out

    def generate_until_multi_round(self, requests: Sequence[Any]) -> list[str]:
        """Multi-round generation is not supported (single-turn prompts); raises AdapterError."""
        raise AdapterError("generate_until_multi_round is not supported by the pruned-VLM adapter; "
                           "use tasks whose output_type is generate_until or loglikelihood")


PrunedLLaVA = PrunedVLM  # the name it had when LLaVA was the one family


def register() -> bool:
    """Register PrunedVLM with lmms-eval under REGISTERED_NAME; False when lmms-eval is not importable."""
    if not HAVE_LMMS_EVAL:
        return False
    try:
        from lmms_eval.api.registry import register_model
    except Exception as err:  # pragma: no cover - a broken lmms-eval install
        log.warning("lmms-eval is importable but its registry is not (%s); PrunedVLM not registered", err)
        return False
    register_model(REGISTERED_NAME)(PrunedVLM)
    return True


REGISTERED = register()

__all__ = ["AdapterError", "HAVE_LMMS_EVAL", "PrunedLLaVA", "PrunedVLM", "REGISTERED", "REGISTERED_NAME", "register"]
