"""Load a LLaVA-family model and its processor (hub id, local directory, the embedded demo, or random weights)."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import AutoConfig, AutoProcessor, LlavaConfig, LlavaForConditionalGeneration

from vlm.errors import UserError

SUPPORTED_ARCHITECTURES: tuple[str, ...] = ("LlavaForConditionalGeneration",)
SUPPORTED_MODEL_TYPES: tuple[str, ...] = ("llava",)
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


class UnsupportedModelError(UserError, ValueError):
    """The checkpoint is not an architecture this toolkit can prune."""


class ModelConfigError(UserError, ValueError):
    """A model preset or loading option is wrong; the message names the field and the allowed values."""


@dataclass
class LoadedModel:
    """A model ready for inference, with its processor (None for random-weight presets without one)."""

    model: LlavaForConditionalGeneration
    processor: Any
    source: str
    name: str

    @property
    def config(self) -> LlavaConfig:
        return self.model.config

    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    @property
    def language_model(self) -> nn.Module:
        return self.model.model.language_model

    @property
    def decoder_layers(self) -> nn.ModuleList:
        return self.language_model.layers

    @property
    def num_layers(self) -> int:
        return len(self.decoder_layers)

    @property
    def vision_tokens_per_image(self) -> int:
        return vision_tokens_per_image(self.model.config)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


def find_decoder_layers(model: nn.Module) -> nn.ModuleList | None:
    """The language model's decoder layers of a LLaVA model (or of a bare causal LM); None if there are none."""
    for path in ("model.language_model.layers", "language_model.layers", "model.layers", "layers"):
        obj: Any = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList):
            return obj
    return None


@dataclass
class VisionSites:
    """Where a LLaVA-style model keeps its vision side: the only place outside `vlm/arch/` (to come) that names it."""

    tower: nn.Module  # the vision tower (CLIP/SigLIP vision model)
    projector: nn.Module  # vision features F [.., Dv] -> LM input embeddings P [.., D]
    encoder_layers: nn.ModuleList | None  # the tower's encoder layers, when it has them
    feature_layer: Any  # config.vision_feature_layer: hidden_states index of the features fed to the projector
    select_strategy: str  # "default" (patch tokens only, CLS dropped) or "full"
    has_cls: bool  # the tower prepends a CLS token (CLIP: yes; SigLIP: no)

    def feature_attention(self) -> nn.Module:
        """The self-attention module of the encoder layer whose output is the projector's input.

        hidden_states[f] is the output of encoder layer f-1 (hidden_states[0] = the embeddings). Raises
        ValueError when there is no such layer (several feature layers, or the embeddings themselves).
        """
        if not isinstance(self.feature_layer, int):
            raise ValueError(f"vision_feature_layer = {self.feature_layer!r}: need a single int layer")
        if self.encoder_layers is None:
            raise ValueError(f"{type(self.tower).__name__} has no encoder layers to read attention from")
        n = len(self.encoder_layers)
        index = self.feature_layer - 1 if self.feature_layer >= 0 else n + self.feature_layer
        if not 0 <= index < n:
            raise ValueError(f"vision_feature_layer = {self.feature_layer} has no attention layer (encoder has {n})")
        return self.encoder_layers[index].self_attn


def vision_sites(model: nn.Module) -> VisionSites:
    """The vision tower, projector and their facts of a LlavaForConditionalGeneration."""
    inner = getattr(model, "model", model)
    tower = getattr(inner, "vision_tower", None)
    projector = getattr(inner, "multi_modal_projector", None)
    if tower is None or projector is None:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no model.vision_tower / model.multi_modal_projector (a LLaVA model has both)"
        )
    vision_model = getattr(tower, "vision_model", tower)
    encoder = getattr(vision_model, "encoder", None)
    layers = getattr(encoder, "layers", None) if encoder is not None else None
    embeddings = getattr(vision_model, "embeddings", None)
    config = model.config
    return VisionSites(
        tower=tower, projector=projector, encoder_layers=layers if isinstance(layers, nn.ModuleList) else None,
        feature_layer=config.vision_feature_layer, select_strategy=str(config.vision_feature_select_strategy),
        has_cls=embeddings is not None and hasattr(embeddings, "class_embedding"),
    )


def vision_tokens_per_image(config: LlavaConfig) -> int:
    """Vision tokens one image contributes: the tower's tokens ((image_size / patch_size)^2 patches, plus CLS on
    towers that have one: CLIP yes, SigLIP no), less the first token under the 'default' strategy (which drops it)."""
    vc = config.vision_config
    n = (vc.image_size // vc.patch_size) ** 2
    tower = n + (0 if "siglip" in str(getattr(vc, "model_type", "")) else 1)
    return tower - 1 if config.vision_feature_select_strategy == "default" else tower


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


def check_architecture(config: Any) -> None:
    """Raise UnsupportedModelError unless the config is a LLaVA (LlavaForConditionalGeneration) checkpoint."""
    archs = list(getattr(config, "architectures", None) or [])
    model_type = getattr(config, "model_type", None)
    if model_type in SUPPORTED_MODEL_TYPES or any(a in SUPPORTED_ARCHITECTURES for a in archs):
        return
    raise UnsupportedModelError(
        f"model_type={model_type!r} (architectures={archs}) is not supported; supported architectures: "
        f"{list(SUPPORTED_ARCHITECTURES)} (model_type {list(SUPPORTED_MODEL_TYPES)}), e.g. llava-hf/llava-1.5-7b-hf"
    )


def load_model(
    source: str | Path,
    *,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "auto",
    attn_implementation: str = "sdpa",
    name: str | None = None,
    local_files_only: bool | None = None,
    revision: str | None = None,
) -> LoadedModel:
    """Load a LLaVA checkpoint (hub id, local directory, or 'demo') with its processor, in eval mode."""
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
    check_architecture(config)
    if local is not None and not any(next(local.glob(pattern), None) is not None for pattern in WEIGHT_PATTERNS):
        _not_a_model(source, local)
    try:
        model = LlavaForConditionalGeneration.from_pretrained(
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


def llava_config_from_dict(arch: Mapping[str, Any]) -> LlavaConfig:
    """Build a LlavaConfig from a plain mapping with text_config / vision_config sub-mappings."""
    arch = dict(arch)
    for key in ("text_config", "vision_config"):
        if key not in arch:
            raise ModelConfigError(f"model arch is missing {key!r}; give a mapping with its sizes (see configs/model/)")
        arch[key] = dict(arch[key])
    return LlavaConfig(**arch)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_random_model(
    arch: Mapping[str, Any] | LlavaConfig,
    *,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "auto",
    attn_implementation: str = "sdpa",
    seed: int = 0,
    name: str = "random",
    processor: Any = None,
) -> LoadedModel:
    """A random-weight LLaVA built directly in the target dtype on the target device (no download, no second copy).

    `device="meta"` builds it without allocating memory, e.g. to count parameters.
    """
    config = arch if isinstance(arch, LlavaConfig) else llava_config_from_dict(arch)
    config._attn_implementation = attn_implementation
    dev = torch.device("meta") if str(device) == "meta" else resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    torch.manual_seed(seed)
    with _default_dtype(torch_dtype), dev:
        model = LlavaForConditionalGeneration(config)
    model.eval()
    return LoadedModel(model=model, processor=processor, source=f"random:{name}", name=name)


def load_processor(source: str) -> Any:
    """A processor by name: 'shapes' (the demo world's, built in code), or anything AutoProcessor loads."""
    if source == "shapes":
        from vlm.shapes.processor import build_processor

        return build_processor()
    return AutoProcessor.from_pretrained(resolve_source(source))


def match_processor(arch: Mapping[str, Any], processor: Any) -> dict[str, Any]:
    """Size a random model's vocabulary and image token to a processor's tokenizer, so its prompts fit."""
    tokenizer = processor.tokenizer
    image_token = getattr(processor, "image_token", "<image>")
    arch = dict(arch)
    arch["image_token_id"] = int(tokenizer.convert_tokens_to_ids(image_token))
    arch["text_config"] = {**arch["text_config"], "vocab_size": len(tokenizer)}
    if tokenizer.pad_token_id is not None:
        arch["text_config"]["pad_token_id"] = int(tokenizer.pad_token_id)
    return arch


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
        return load_model(cfg["source"], name=name, revision=cfg.get("revision"), **common)
    if cfg.get("arch"):
        arch = {k: dict(v) if isinstance(v, Mapping) else v for k, v in dict(cfg["arch"]).items()}
        processor = None
        if cfg.get("processor"):
            processor = load_processor(cfg["processor"])
            arch = match_processor(arch, processor)
        return build_random_model(arch, seed=int(cfg.get("seed", 0)), name=name, processor=processor, **common)
    raise ModelConfigError(f"model preset {name!r} needs either `source` (hub id, path or 'demo') or `arch`")
