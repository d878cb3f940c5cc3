"""Analytic prefill FLOPs of a decoder stack from the real token count at each layer.

Per layer, with n tokens, hidden width d and FFN width m (REFERENCE.md, the AdaptInfer code's formula):
``4nd^2`` (q, k, v, o projections) ``+ 2n^2d`` (attention scores and weighted values) ``+ 3ndm``
(gated FFN: gate, up, down). Counted as multiply-accumulates, like the paper; TFLOPs = FLOPs / 1e12.
"""
from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import Any

TERA = 10**12


def _check_count(name: str, value: Any, minimum: int) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} = {value!r}: must be an int >= {minimum}")
    return int(value)


def layer_flops(n: int, d: int, m: int) -> int:
    """FLOPs of one decoder layer on n tokens: 4nd^2 + 2n^2d + 3ndm."""
    n = _check_count("n", n, 0)
    d = _check_count("d", d, 1)
    m = _check_count("m", m, 1)
    return 4 * n * d * d + 2 * n * n * d + 3 * n * d * m


def prefill_flops(tokens_per_layer: Sequence[int], d: int, m: int) -> int:
    """Prefill FLOPs of a decoder stack: sum of layer_flops over the total token count each layer processes."""
    return sum(layer_flops(n, d, m) for n in tokens_per_layer)


def text_dims(config: Any) -> tuple[int, int, int]:
    """(hidden_size, intermediate_size, num_hidden_layers) of a transformers text config, a LLaVA config or a mapping."""
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    elif isinstance(config, Mapping) and "text_config" in config:
        config = config["text_config"]
    get = config.get if isinstance(config, Mapping) else lambda k, default=None: getattr(config, k, default)
    values = []
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers"):
        value = get(key, None)
        if value is None:
            raise ValueError(f"config has no {key!r}: a text config with hidden_size, intermediate_size and "
                             f"num_hidden_layers is needed")
        values.append(_check_count(key, value, 1))
    return values[0], values[1], values[2]


def config_prefill_flops(config: Any, tokens_per_layer: Sequence[int] | int) -> int:
    """Prefill FLOPs for a model config; an int means that many tokens at every one of its layers."""
    d, m, num_layers = text_dims(config)
    if isinstance(tokens_per_layer, numbers.Integral):
        tokens_per_layer = [int(tokens_per_layer)] * num_layers
    if len(tokens_per_layer) != num_layers:
        raise ValueError(
            f"tokens_per_layer has {len(tokens_per_layer)} entries: must have one per decoder layer ({num_layers})"
        )
    return prefill_flops(tokens_per_layer, d, m)


def sequence_tokens_per_layer(vision_per_layer: Sequence[int], other_tokens: int) -> list[int]:
    """Total tokens per layer = vision tokens at that layer (Schedule.tokens_per_layer) + the other tokens."""
    other_tokens = _check_count("other_tokens", other_tokens, 0)
    return [int(v) + other_tokens for v in vision_per_layer]


def to_tflops(flops: int | float) -> float:
    """FLOPs -> TFLOPs (1e12)."""
    return flops / TERA
