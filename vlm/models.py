"""Load a supported VLM and its processor (hub id, local directory, the embedded demo, or random weights); the model
family's facts come from its `vlm.arch` module."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import AutoConfig, AutoProcessor, PreTrainedConfig, PreTrainedModel

from vlm.arch import (
    SUPPORTED_ARCHITECTURES, SUPPORTED_MODEL_TYPES, ModelArch, UnsupportedModelError, VisionSites, arch_class,
    for_config, for_model,
)
from vlm.errors import UserError

DEFAULT_FAMILY = "llava"  # the family of a random-weight `arch` mapping that names no model_type
DEMO_MODEL_DIR = Path(__file__).resolve().parent / "assets" / "shapes_llava"
SOURCE_ALIASES: dict[str, Path] = {"demo": DEMO_MODEL_DIR}
_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


class ModelConfigError(UserError, ValueError):
    """A model preset or loading option is wrong; the message names the field and the allowed values."""


@dataclass
class LoadedModel:
    """A model ready for inference, with its processor (None for random-weight presets without one)."""

    model: PreTrainedModel
    processor: Any
    source: str
    name: str

    @property
    def config(self) -> PreTrainedConfig:
        return self.model.config

    @property
    def arch(self) -> ModelArch:
        """The model family's seam (vlm/arch), bound to this model."""
        return for_model(self.model)

    @property
    def image_token_id(self) -> int:
        return self.arch.image_token_id

    @property
    def language_model(self) -> nn.Module:
        return self.arch.language_model

    @property
    def decoder_layers(self) -> nn.ModuleList:
        return self.arch.decoder_layers

    @property
    def num_layers(self) -> int:
        return len(self.decoder_layers)

    @property
    def fixed_vision_tokens(self) -> int | None:
        """Vision tokens one image gives on this model and processor; None when the count follows the image size."""
        return self.arch.vision_tokens_per_image(self.processor)

    @property
    def vision_tokens_per_image(self) -> int:
        """Vision tokens one image gives; ModelConfigError when the family's count varies with the image."""
        n = self.fixed_vision_tokens
        if n is None:
            raise ModelConfigError(
                f"model {self.name!r} ({self.config.model_type}) gives a vision-token count that varies with the "
                "image; this step needs a fixed one (analysis.collect, analysis.derive rule=paper and the benchmark "
                "take counts that vary): resize every image to one size (for Qwen, a processor with min_pixels = "
                "max_pixels and square images; for LLaVA-NeXT / OneVision, a processor with one "
                "image_grid_pinpoints resolution and images of its aspect ratio)"
            )
        return n

    @property
    def text_widths(self) -> tuple[int, int]:
        """(hidden size, intermediate size) of the decoder, for the FLOPs formula."""
        return self.arch.text_widths(self.config)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


def find_decoder_layers(model: nn.Module) -> nn.ModuleList | None:
    """The language model's decoder layers of a supported model; None if `model` is none of the supported families."""
    try:
        return for_model(model).decoder_layers
    except (UnsupportedModelError, AttributeError):
        return None


def vision_sites(model: nn.Module) -> VisionSites:
    """The vision tower, projector and their facts of a supported model."""
    try:
        return for_model(model).vision_sites()
    except (ValueError, AttributeError) as err:
        raise UnsupportedModelError(f"{type(model).__name__}: no vision sites: {err}") from None


def vision_tokens_per_image(config: PreTrainedConfig, processor: Any = None) -> int | None:
    """Vision tokens one image contributes under `config` (and its processor); None when it varies per image."""
    return for_config(config).tokens_per_image(config, processor)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' -> CUDA when present, else CPU; anything else as torch understands it."""
    if isinstance(device, torch.device):
        return device
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ModelConfigError(f"device={device!r} is not a device; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from err
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelConfigError(f"device={device!r} asked for CUDA but none is available; use device=auto or cpu")
    return resolved


def resolve_dtype(dtype: str | torch.dtype = "auto", device: torch.device | None = None) -> torch.dtype:
    """'auto' -> float16 on CUDA, float32 on CPU; else one of float32/float16/bfloat16."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.float16 if device is not None and device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ModelConfigError(f"dtype={dtype!r} is not supported; use one of 'auto', {sorted(set(_DTYPES))}")
    return _DTYPES[dtype]


def resolve_source(source: str | Path) -> str:
    """Map the aliases ('demo') to their directories; hub ids and paths pass through."""
    key = str(source)
    if key in SOURCE_ALIASES:
        path = SOURCE_ALIASES[key]
        if not (path / "config.json").exists():
            raise ModelConfigError(
                f"the embedded demo model is missing at {path}; it ships with the repository "
                "(re-clone, or train it with `python -m vlm.shapes.train`)"
            )
        return str(path)
    return key


def check_architecture(config: Any) -> type[ModelArch]:
    """The family of `config`; UnsupportedModelError (naming the supported architectures) if there is none."""
    return for_config(config)


def load_model(
    source: str | Path,
    *,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "auto",
    attn_implementation: str = "sdpa",
    name: str | None = None,
    local_files_only: bool | None = None,
    revision: str | None = None,
    processor: Any = None,
) -> LoadedModel:
    """Load a supported checkpoint (hub id, local directory, or 'demo') with its processor, in eval mode.
    `processor`, when given, is used instead of the processor files of `source`."""
    path = resolve_source(source)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    hub_kwargs: dict[str, Any] = {}
    if local_files_only is not None:
        hub_kwargs["local_files_only"] = local_files_only
    if revision is not None:
        hub_kwargs["revision"] = revision
    local = check_model_source(source, path)
    try:
        config = AutoConfig.from_pretrained(path, **hub_kwargs)
    except (OSError, ValueError) as err:
        raise ModelConfigError(f"model.source={str(source)!r} cannot be loaded: {_first_line(err)}") from None
    family = check_architecture(config)
    if local is not None and not any(next(local.glob(pattern), None) is not None for pattern in WEIGHT_PATTERNS):
        _not_a_model(source, local)
    try:
        model = family.model_class(config).from_pretrained(
            path, dtype=torch_dtype, attn_implementation=attn_implementation, **hub_kwargs
        )
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:
        broken = _unreadable_weights(local) if local is not None else None
        if broken is not None:
            raise ModelConfigError(
                f"model.source={str(source)!r}: the weights file {str(broken[0])!r} cannot be read ({broken[1]}); it is "
                "truncated or corrupted: copy or save it again"
            ) from None
        raise ModelConfigError(f"model.source={str(source)!r}: loading the weights failed: {_first_line(err)}") from None
    model.to(dev).eval()
    if processor is not None:
        return LoadedModel(model=model, processor=processor, source=str(source), name=name or str(source))
    try:
        processor = AutoProcessor.from_pretrained(path, **hub_kwargs)
    except (OSError, ValueError) as err:
        raise ModelConfigError(
            f"model.source={str(source)!r} has no usable processor (tokenizer + image processor files, as written by "
            f"the processor's save_pretrained): {_first_line(err)}"
        ) from None
    return LoadedModel(model=model, processor=processor, source=str(source), name=name or str(source))


WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _looks_like_path(source: str) -> bool:
    """A source written as a path (absolute, ./, ../, ~, or a trailing slash) rather than a hub id 'org/name'."""
    return source.startswith(("/", "./", "../", "~", "\\")) or source.endswith(("/", "\\")) or source.count("/") > 1


def check_model_source(source: str | Path, resolved: str) -> Path | None:
    """The local model directory `resolved` names, checked; None for a hub id. Raises ModelConfigError for a path
    that does not exist, a file, or a directory without config.json and weights."""
    local = Path(resolved).expanduser()
    if not local.exists():
        if _looks_like_path(str(resolved)):
            raise ModelConfigError(
                f"model.source={str(source)!r}: the path {str(local)!r} does not exist; give a model directory "
                "written by save_pretrained, a hub id such as llava-hf/llava-1.5-7b-hf, or 'demo'"
            )
        return None
    if not local.is_dir():
        raise ModelConfigError(f"model.source={str(source)!r} is a file, not a model directory (config.json + weights)")
    if not (local / "config.json").is_file():
        _not_a_model(source, local)
    return local


def _not_a_model(source: str | Path, local: Path) -> None:
    found = sorted(p.name for p in local.iterdir())[:12]
    raise ModelConfigError(
        f"model.source={str(source)!r}: the directory {str(local)!r} is not a model; expected config.json and "
        f"weights ({', '.join(WEIGHT_PATTERNS)}) as written by save_pretrained, plus the processor's files; "
        f"found {found or 'nothing'}"
    )


def _unreadable_weights(local: Path) -> tuple[Path, str] | None:
    """The first *.safetensors file in `local` whose header cannot be read, with the reason; None if all open."""
    for path in sorted(local.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as handle:
                handle.keys()
        except (SafetensorError, OSError) as err:
            return path, _first_line(err)
    return None


def config_from_dict(arch: Mapping[str, Any]) -> PreTrainedConfig:
    """A model config from a plain mapping with text_config / vision_config sub-mappings; `model_type` picks the
    family (default llava)."""
    arch = dict(arch)
    for key in ("text_config", "vision_config"):
        if key not in arch:
            raise ModelConfigError(f"model arch is missing {key!r}; give a mapping with its sizes (see configs/model/)")
        arch[key] = dict(arch[key])
    return _arch_family(arch).config_from_dict(arch)


def _arch_family(arch: Mapping[str, Any]) -> type[ModelArch]:
    return arch_class(arch.get("model_type", DEFAULT_FAMILY))


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_random_model(
    arch: Mapping[str, Any] | PreTrainedConfig,
    *,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "auto",
    attn_implementation: str = "sdpa",
    seed: int = 0,
    name: str = "random",
    processor: Any = None,
) -> LoadedModel:
    """A random-weight model of a supported family built directly in the target dtype on the target device (no download, no second copy).

    `device="meta"` builds it without allocating memory, e.g. to count parameters.
    """
    config = arch if isinstance(arch, PreTrainedConfig) else config_from_dict(arch)
    config._attn_implementation = attn_implementation
    dev = torch.device("meta") if str(device) == "meta" else resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    torch.manual_seed(seed)
    with _default_dtype(torch_dtype), dev:
        model = for_config(config).model_class(config)(config)
    model.eval()
    return LoadedModel(model=model, processor=processor, source=f"random:{name}", name=name)


# Processors built in code (vlm/shapes/processor.py) by name: the shapes world's words in each family's form.
BUILT_PROCESSORS: dict[str, str] = {
    "shapes": "build_processor", "shapes_qwen2_vl": "build_qwen2_vl_processor",
    "shapes_qwen2_vl_dynamic": "build_qwen2_vl_dynamic_processor",  # each image keeps its size (and token count)
    "shapes_llava_next": "build_llava_next_processor", "shapes_llava_onevision": "build_llava_onevision_processor",
}


def load_processor(source: str) -> Any:
    """A processor by name: one of BUILT_PROCESSORS (the demo world's, built in code), or anything AutoProcessor
    loads."""
    if source in BUILT_PROCESSORS:
        from vlm.shapes import processor as shapes_processor

        return getattr(shapes_processor, BUILT_PROCESSORS[source])()
    return AutoProcessor.from_pretrained(resolve_source(source))


def match_processor(arch: Mapping[str, Any], processor: Any) -> dict[str, Any]:
    """Size a random model's vocabulary and special tokens to a processor's tokenizer, so its prompts fit."""
    return _arch_family(arch).match_processor(arch, processor)


def load_from_config(cfg: Mapping[str, Any]) -> LoadedModel:
    """Load the model a `configs/model/*.yaml` preset describes: `source` (hub id/path/demo) or `arch` (random)."""
    cfg = dict(cfg)
    name = cfg.get("name", "model")
    common = {
        "dtype": cfg.get("dtype", "auto"),
        "device": cfg.get("device", "auto"),
        "attn_implementation": cfg.get("attn_implementation", "sdpa"),
    }
    if cfg.get("source"):
        processor = load_processor(cfg["processor"]) if cfg.get("processor") else None
        return load_model(cfg["source"], name=name, revision=cfg.get("revision"), processor=processor, **common)
    if cfg.get("arch"):
        arch = {k: dict(v) if isinstance(v, Mapping) else v for k, v in dict(cfg["arch"]).items()}
        processor = None
        if cfg.get("processor"):
            processor = load_processor(cfg["processor"])
            arch = match_processor(arch, processor)
        return build_random_model(arch, seed=int(cfg.get("seed", 0)), name=name, processor=processor, **common)
    raise ModelConfigError(f"model preset {name!r} needs either `source` (hub id, path or 'demo') or `arch`")
