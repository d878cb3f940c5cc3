"""The attention probe: rows equal eager output_attentions, outputs unchanged, model restored on exit."""
from __future__ import annotations

import copy

import pytest
import torch

from tests.conftest import make_prompts, pixel_values, tiny_arch
from vlm.layout import TokenLayout
from vlm.models import build_random_model
from vlm.probe import AttentionProbe, ProbeError

N_VISION = 16  # 56 px / 14 -> 4x4 patches


def _eager_attentions(model, inputs, pix):
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(**inputs, pixel_values=pix, output_attentions=True)
    finally:
        model.set_attn_implementation("sdpa")
    return out.attentions  # per layer [B, H, N, N]


@pytest.mark.parametrize("padding_side", ["left", "right", None])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_probe_rows_equal_eager_attention(padding_side, kv_heads):
    loaded = build_random_model(tiny_arch(kv_heads=kv_heads), dtype="float32", device="cpu", seed=1)
    model = loaded.model
    lengths = [5, 9, 2] if padding_side else [6, 6, 6]
    inputs = make_prompts(N_VISION, lengths, padding_side=padding_side or "left", seed=3)
    if padding_side is None:
        inputs["attention_mask"] = None
    pix = pixel_values(3)
    layout = TokenLayout.from_batch(inputs["input_ids"], inputs["attention_mask"], loaded.image_token_id)
    eager = _eager_attentions(model, inputs, pix)
    with AttentionProbe(model, layers=[0, 2, 3], rows=layout.text_index, row_mask=layout.text_mask) as probe:
        with torch.no_grad():
            model(**inputs, pixel_values=pix)
    for layer in (0, 2, 3):
        got = probe.rows[layer]  # [B, H, T, N]
        want = eager[layer].gather(
            2, layout.text_index[:, None, :, None].expand(-1, got.shape[1], -1, got.shape[-1])
        ) * layout.text_mask[:, None, :, None]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        # padding keys receive no attention; rows of real tokens sum to one
        assert torch.allclose(got.sum(-1)[layout.text_mask[:, None, :].expand_as(got.sum(-1))], torch.tensor(1.0))


def test_probe_all_rows_and_logits_unchanged(tiny_model):
    model = tiny_model.model
    inputs = make_prompts(N_VISION, [4, 7, 3], seed=5)
    pix = pixel_values(3)
    with torch.no_grad():
        plain = model(**inputs, pixel_values=pix).logits
    eager = _eager_attentions(model, inputs, pix)
    with AttentionProbe(model, layers=[1, 3]) as probe:
        with torch.no_grad():
            probed = model(**inputs, pixel_values=pix).logits
    assert torch.equal(plain, probed)
    valid = inputs["attention_mask"].bool()
    for layer in (1, 3):
        rows = probe.rows[layer]
        # compare only real query rows (padding rows are fully masked: eager gives uniform rows there)
        sel = valid[:, None, :, None].expand_as(rows)
        torch.testing.assert_close(rows[sel], eager[layer][sel], atol=1e-5, rtol=0)


def test_probe_detaches_completely(tiny_model):
    model = tiny_model.model
    state = copy.deepcopy(model.state_dict())
    impls = (model.config._attn_implementation, model.config.text_config._attn_implementation,
             model.config.vision_config._attn_implementation)
    attn = model.model.language_model.layers[1].self_attn
    other = model.model.language_model.layers[0].self_attn
    own_config = attn.config
    before_attrs = set(vars(attn))
    with pytest.raises(RuntimeError, match="boom"):
        with AttentionProbe(model, layers=[1]):
            assert attn.config._attn_implementation.startswith("probe_")  # the probed layer alone calls the wrapper
            assert other.config._attn_implementation == impls[1] == model.config.text_config._attn_implementation
            raise RuntimeError("boom")
    assert attn.config is own_config
    assert (model.config._attn_implementation, model.config.text_config._attn_implementation,
            model.config.vision_config._attn_implementation) == impls
    assert set(vars(attn)) == before_attrs
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])


def test_probe_skips_decode_and_half_precision_softmax_in_fp32():
    loaded = build_random_model(tiny_arch(), dtype="bfloat16", device="cpu", seed=2)
    inputs = make_prompts(N_VISION, [3, 5], seed=7)
    calls = []
    with AttentionProbe(loaded.model, layers=[0], on_rows=lambda call, rows, idx, m: calls.append((call.q_len, rows))):
        with torch.no_grad():
            loaded.model.generate(**inputs, pixel_values=pixel_values(2).bfloat16(), max_new_tokens=3, do_sample=False)
    assert len(calls) == 1  # prefill only, decode steps skipped
    q_len, rows = calls[0]
    assert rows.dtype == torch.float32
    assert q_len == inputs["input_ids"].shape[1]


def test_probe_rejects_bad_layer(tiny_model):
    with pytest.raises(ProbeError, match="out of range"):
        AttentionProbe(tiny_model.model, layers=[99])


@pytest.mark.parametrize("masked", [False, True])
def test_rows_given_as_a_slice_equal_rows_given_as_an_index(masked):
    """The engine asks for the text rows as one slice when they are every row's last tokens; the rows equal those of
    the index tensor (causal masking alone, or a 4-D mask through the general path)."""
    from vlm.probe import attention_rows

    g = torch.Generator().manual_seed(2)
    query, key = torch.randn(2, 4, 10, 8, generator=g), torch.randn(2, 2, 10, 8, generator=g)
    mask = None
    if masked:  # additive causal mask, with the first key of row 1 padded
        allowed = torch.ones(10, 10, dtype=torch.bool).tril()[None, None].repeat(2, 1, 1, 1)
        allowed[1, :, :, 0] = False
        mask = torch.zeros(2, 1, 10, 10).masked_fill(~allowed, torch.finfo(torch.float32).min)
    index = torch.arange(6, 10).expand(2, -1)
    want = attention_rows(query, key, mask, index, 0.3)
    torch.testing.assert_close(attention_rows(query, key, mask, slice(6, 10), 0.3), want, rtol=1e-6, atol=1e-7)


def test_slice_rows_reuse_one_causal_bias_as_the_sequence_shrinks():
    """The stages of one prefill ask for the same text rows over fewer and fewer keys (and other prompts for other
    row counts): the causal bias kept from the widest call must mask exactly what a fresh one would, at every width,
    whichever width came first."""
    from vlm.probe import _BIASES, attention_rows

    g = torch.Generator().manual_seed(3)
    query, key = torch.randn(1, 4, 30, 8, generator=g), torch.randn(1, 4, 30, 8, generator=g)
    for order in ([30, 22, 17, 25], [12, 30]):
        _BIASES.clear()
        for n in order:
            for rows in (slice(n - 5, n), slice(n - 7, n - 2)):  # text at the end, and rows that stop short of it
                q, k = query[:, :, :n], key[:, :, :n]
                want = attention_rows(q, k, None, torch.arange(n)[rows].expand(1, -1), 0.4)  # a masked_fill, no bias
                torch.testing.assert_close(attention_rows(q, k, None, rows, 0.4), want, rtol=1e-6, atol=1e-7)
        # one bias per kind of rows (5 at the end, 5 ending 2 short of it), as wide as the widest call
        assert sorted(_BIASES) == [(5, -7, torch.device("cpu")), (5, -5, torch.device("cpu"))]
        assert {bias.shape for bias in _BIASES.values()} == {(5, max(order))}
