"""Analytic FLOPs against hand-computed values for LLaVA-1.5-7B shapes."""
from __future__ import annotations

import pytest

from pruning.flops import (
    config_prefill_flops,
    layer_flops,
    prefill_flops,
    sequence_tokens_per_layer,
    text_dims,
    to_tflops,
)
from pruning.schedule import Schedule, Stage

D_7B, M_7B, L_7B = 4096, 11008, 32
# 576 vision tokens + about 60 others (system prompt, question, assistant prefix)
N_UNPRUNED = 576 + 60
# 636 * 4096 * (4*4096 + 2*636 + 3*11008) = 2_605_056 * 50_680, worked by hand
LAYER_7B_636 = 132_024_238_080


def test_layer_flops_small_by_hand():
    # n=2, d=3, m=5: 4*2*9 + 2*4*3 + 3*2*3*5 = 72 + 24 + 90
    assert layer_flops(2, 3, 5) == 186
    assert layer_flops(0, 3, 5) == 0


def test_llava_7b_unpruned_prefill():
    assert layer_flops(N_UNPRUNED, D_7B, M_7B) == LAYER_7B_636
    total = prefill_flops([N_UNPRUNED] * L_7B, D_7B, M_7B)
    assert total == 32 * LAYER_7B_636 == 4_224_775_618_560
    assert to_tflops(total) == pytest.approx(4.2248, abs=1e-4)  # about 4.22 TFLOPs per sample


def test_pruned_prefill_follows_processed_tokens():
    s = Schedule([Stage(1, 133), Stage(10, 27), Stage(20, 3)], num_layers=L_7B, vision_tokens=576)
    per_layer = sequence_tokens_per_layer(s.tokens_per_layer(), 60)

    def by_hand(n: int) -> int:
        return n * D_7B * (4 * D_7B + 2 * n + 3 * M_7B)

    expected = 2 * by_hand(636) + 9 * by_hand(193) + 10 * by_hand(87) + 11 * by_hand(63)
    assert prefill_flops(per_layer, D_7B, M_7B) == expected
    assert to_tflops(expected) == pytest.approx(0.9356, abs=1e-4)  # about 22% of the unpruned 4.22


def test_config_helpers():
    transformers = pytest.importorskip("transformers")
    text = transformers.LlamaConfig(hidden_size=D_7B, intermediate_size=M_7B, num_hidden_layers=L_7B,
                                    num_attention_heads=32)
    assert text_dims(text) == (D_7B, M_7B, L_7B)
    llava = transformers.LlavaConfig(text_config=text.to_dict())
    assert text_dims(llava) == (D_7B, M_7B, L_7B)
    assert text_dims({"text_config": {"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 2}}) == (8, 16, 2)
    assert config_prefill_flops(text, N_UNPRUNED) == 32 * LAYER_7B_636
    assert config_prefill_flops(llava, [N_UNPRUNED] * L_7B) == 32 * LAYER_7B_636
    with pytest.raises(ValueError, match="one per decoder layer"):
        config_prefill_flops(text, [N_UNPRUNED] * 3)
    with pytest.raises(ValueError, match="intermediate_size"):
        text_dims({"hidden_size": 8})


def test_bad_counts_raise():
    with pytest.raises(ValueError, match=r"n = -1"):
        layer_flops(-1, 8, 8)
    with pytest.raises(ValueError, match=r"d = 2.5"):
        layer_flops(1, 2.5, 8)
