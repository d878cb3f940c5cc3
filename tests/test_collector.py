"""AttentionCollector: records equal hand computations from eager output_attentions; bounded memory; clean exit."""
from __future__ import annotations

import pytest
import torch

from analysis.collector import REDUCERS, SCALAR_NAMES, AttentionCollector, CollectorError
from tests.conftest import IMAGE_TOKEN_ID, benchmark_script, make_prompts, pixel_values, tiny_arch
from vlm.layout import TokenLayout
from vlm.models import build_random_model

N_VISION = 16  # 56 px / 14 -> 4x4 patches
LENGTHS = [5, 9, 2]  # text tokens per row: a left-padded batch of 3
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")])]


def _eager_attentions(model, inputs, pix):
    """Every layer's full attention from the eager implementation: list of [B, H, N, N]."""
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(**inputs, pixel_values=pix, output_attentions=True)
    finally:
        model.set_attn_implementation("sdpa")
    return [a.float().cpu() for a in out.attentions]


def _by_hand(attentions, input_ids, attention_mask, reducer):
    """t2v [B, L, V] and scalars {name: [B, L]} computed per sample with explicit positions."""
    batch = input_ids.shape[0]
    t2v, share, entropy = [], [], []
    for b in range(batch):
        valid = attention_mask[b].bool()
        positions = torch.nonzero(valid).flatten()
        vis = torch.nonzero((input_ids[b] == IMAGE_TOKEN_ID) & valid).flatten()
        text = positions[positions > vis.max()]
        last = int(positions.max())
        rows_t2v, rows_share, rows_entropy = [], [], []
        for attn in attentions:
            a = attn[b]  # [H, N, N]
            a_tv = a[:, text][:, :, vis]  # [H, T, V]
            tt = a[:, text][:, :, text]  # [H, T, T]
            s = tt + tt.transpose(1, 2) - torch.diag_embed(torch.diagonal(tt, dim1=1, dim2=2))
            w = s.sum(dim=1)  # [H, T]: w[h, j] = sum_i S[h, i, j]
            if reducer == "mean":
                rows_t2v.append(a_tv.mean(dim=(0, 1)))
            elif reducer == "last":
                rows_t2v.append(a[:, last, vis].mean(0))
            else:
                rows_t2v.append((w[:, :, None] * a_tv).sum(dim=(0, 1)) / w.sum())
            rows_share.append(a_tv.sum(-1).mean())
            p = w / w.sum(-1, keepdim=True)
            rows_entropy.append(-(p * p.log()).sum(-1).mean())
        t2v.append(torch.stack(rows_t2v))
        share.append(torch.stack(rows_share))
        entropy.append(torch.stack(rows_entropy))
    return torch.stack(t2v), {"vision_share": torch.stack(share), "prior_entropy": torch.stack(entropy)}


@pytest.fixture(scope="module")
def model4():
    return build_random_model(tiny_arch(kv_heads=2), dtype="float32", device="cpu", seed=11)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reducer", sorted(REDUCERS))
def test_records_equal_hand_computation_from_eager_attention(model4, reducer, device):
    model = model4.model.to(device)
    inputs = make_prompts(N_VISION, LENGTHS, padding_side="left", seed=4)
    pix = pixel_values(3, seed=2)
    eager = _eager_attentions(model, {k: v.to(device) for k, v in inputs.items()}, pix.to(device))
    want_t2v, want_scalars = _by_hand(eager, inputs["input_ids"], inputs["attention_mask"], reducer)
    with AttentionCollector(model4, reducer=reducer) as collector:
        with torch.no_grad():
            model(**{k: v.to(device) for k, v in inputs.items()}, pixel_values=pix.to(device))
        got = collector.consume()
    model.to("cpu")
    assert got.layers == [0, 1, 2, 3]
    assert got.t2v.shape == (3, 4, N_VISION) and got.t2v.device.type == "cpu" and got.t2v.dtype == torch.float32
    assert sorted(got.scalars) == sorted(SCALAR_NAMES)
    torch.testing.assert_close(got.t2v, want_t2v, atol=1e-5, rtol=0)
    for name in SCALAR_NAMES:
        torch.testing.assert_close(got.scalars[name], want_scalars[name], atol=1e-5, rtol=0)
    # the records carry signal: not uniform over vision tokens, shares strictly inside (0, 1)
    assert float(got.t2v.std(-1).min()) > 0
    assert 0 < float(got.scalars["vision_share"].min()) and float(got.scalars["vision_share"].max()) < 1


def test_adaptinfer_records_are_the_scorers_scores_over_the_total_prior(model4):
    """The collector's AdaptInfer reducer and the `adaptinfer` scorer share one text prior (pruning.scorers.text_prior):
    a record is the scorer's score divided by the total prior weight, so both rank vision tokens alike."""
    from analysis.collector import reduce_adaptinfer, text_prior
    from pruning.scorers import ScoringContext, score

    inputs = make_prompts(N_VISION, LENGTHS, padding_side="left", seed=5)
    eager = _eager_attentions(model4.model, inputs, pixel_values(3, seed=5))
    layout = TokenLayout.from_batch(inputs["input_ids"], inputs["attention_mask"], IMAGE_TOKEN_ID)
    b, h, _, n = eager[0].shape
    index = layout.text_index[:, None, :, None].expand(b, h, layout.text_index.shape[1], n)
    for attn in eager:
        rows = attn.gather(2, index) * layout.text_mask[:, None, :, None]  # [B, H, T, N]: the probe's text rows
        ctx = ScoringContext(attn=rows, query_index=layout.text_index, query_mask=layout.text_mask,
                             vision_index=layout.vision_index, text_index=layout.text_index,
                             text_mask=layout.text_mask, key_mask=layout.valid)
        scores = score("adaptinfer", ctx)  # [B, V]
        total = text_prior(rows, layout).sum(dim=(1, 2))  # [B]
        assert torch.equal(reduce_adaptinfer(rows, layout), scores / total[:, None])


def test_reducers_differ_and_outputs_are_unchanged(model4):
    model = model4.model
    inputs = make_prompts(N_VISION, LENGTHS, seed=6)
    pix = pixel_values(3, seed=3)
    with torch.no_grad():
        plain = model(**inputs, pixel_values=pix).logits
    results = {}
    for reducer in REDUCERS:
        with AttentionCollector(model4, reducer=reducer) as collector:
            with torch.no_grad():
                logits = model(**inputs, pixel_values=pix).logits
            results[reducer] = collector.consume()
        assert torch.equal(logits, plain)
    assert not torch.allclose(results["mean"].t2v, results["last"].t2v, atol=1e-4)
    assert not torch.allclose(results["mean"].t2v, results["adaptinfer"].t2v, atol=1e-4)
    for name in SCALAR_NAMES:  # scalars do not depend on the reducer
        torch.testing.assert_close(results["mean"].scalars[name], results["last"].scalars[name])


def test_memory_holds_only_the_current_batch(model4):
    model = model4.model
    with AttentionCollector(model4, reducer="adaptinfer") as collector:
        assert collector.buffered_samples() == 0 and not collector.pending
        for step in range(3):
            inputs = make_prompts(N_VISION, [3 + step, 4, 1 + step], seed=10 + step)
            with torch.inference_mode():
                model(**inputs, pixel_values=pixel_values(3, seed=step))
            assert collector.buffered_samples() == 3
            records = collector.consume()
            assert len(records) == 3
            assert not records.t2v.is_inference(), "consume() hands back ordinary tensors, not the buffers"
            assert collector.buffered_samples() == 0 and not collector.pending
            assert collector._probe.rows == {}, "rows are reduced in the callback, never kept per layer"
        # a second forward without consume() is refused rather than accumulated
        with torch.no_grad():
            model(**inputs, pixel_values=pixel_values(3))
        with pytest.raises(CollectorError, match="not consumed"):
            with torch.no_grad():
                model(**inputs, pixel_values=pixel_values(3))
        collector.discard()
        assert collector.buffered_samples() == 0
    with pytest.raises(CollectorError, match="no batch to consume"):
        collector.consume()


def test_exit_removes_everything(model4):
    model = model4.model
    impl = model.config.text_config._attn_implementation
    with pytest.raises(RuntimeError, match="boom"):
        with AttentionCollector(model4, layers=[1, 3]):
            assert len(model._forward_pre_hooks) == 1
            raise RuntimeError("boom")
    assert len(model._forward_pre_hooks) == 0
    assert model.config.text_config._attn_implementation == impl
    inputs = make_prompts(N_VISION, [2, 3], seed=1)
    with torch.no_grad():  # runs untouched afterwards
        model(**inputs, pixel_values=pixel_values(2))


def test_layer_subset_begin_batch_and_generate(model4):
    model = model4.model
    inputs = make_prompts(N_VISION, [4, 6], seed=8)
    pix = pixel_values(2, seed=8)
    with AttentionCollector(model4, reducer="mean") as collector:
        with torch.no_grad():
            model(**inputs, pixel_values=pix)
        full = collector.consume()
    with AttentionCollector(model4, reducer="mean", layers=[3, 1]) as collector:
        layout = TokenLayout.from_batch(inputs["input_ids"], inputs["attention_mask"], IMAGE_TOKEN_ID)
        collector.begin_batch(layout)
        with torch.no_grad():
            model(**inputs, pixel_values=pix)
        subset = collector.consume()
        with torch.no_grad():  # decode steps are skipped: the records are the prefill's
            model.generate(**inputs, pixel_values=pix, max_new_tokens=3, do_sample=False)
        generated = collector.consume()
    assert subset.layers == [1, 3]
    torch.testing.assert_close(subset.t2v, full.t2v[:, [1, 3]])
    torch.testing.assert_close(generated.t2v, subset.t2v, atol=1e-6, rtol=0)


def test_bad_arguments_are_clear_errors(model4):
    with pytest.raises(CollectorError, match="unknown reducer 'max'"):
        AttentionCollector(model4, reducer="max")
    with pytest.raises(CollectorError, match=r"layers=\[7\].*0\.\.3"):
        AttentionCollector(model4, layers=[7])
    model = model4.model
    inputs = make_prompts(N_VISION, [3], seed=2)
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    with AttentionCollector(model4):
        with pytest.raises(CollectorError, match="begin_batch"):
            with torch.no_grad():
                model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"])


def test_collect_overhead_benchmark_smoke():
    main = benchmark_script("collect_overhead").main

    result = main(["--model", "tiny", "--num-layers", "2", "--batch-size", "2", "--text-len", "6", "--repeats", "1",
                   "--device", "cpu"])
    assert result["num_layers"] == 2 and result["num_vision"] == 576
    assert set(result["ms_per_sample"]) == {"sdpa", "collector", "eager_output_attentions"}
    assert all(v > 0 for v in result["ms_per_sample"].values())
    # Qwen2-VL through the seam: its image inputs (patches, image_grid_thw, mm_token_type_ids), its tower's depth key
    qwen = main(["--model", "qwen2-vl-tiny", "--vision-layers", "1", "--batch-size", "2", "--text-len", "6",
                 "--repeats", "1", "--device", "cpu"])
    assert qwen["num_vision"] == 16 and qwen["vision_layers"] == 1 and qwen["num_layers"] == 4
    assert all(v > 0 for v in qwen["ms_per_sample"].values())
