"""Scorers against independent computations: naive loops, hand-built attention and transformers' own eager attention."""
from __future__ import annotations

import math

import pytest
import torch

from pruning.scorers import (
    ScoringContext,
    available_scorers,
    get_scorer,
    register_scorer,
    score,
    scorer_rows,
    select,
)
from pruning.selectors import visionzip_merge, visionzip_select, visionzip_split

HEADS = 3


def padded_batch(seed: int = 0) -> dict:
    """Two rows over K = 12 keys: row 0 left-padded, row 1 right-padded, with full causal attention.

    row 0: [pad pad][sys][vis x4][text x5]   row 1: [sys][vis x4][text x4][pad pad pad]
    """
    g = torch.Generator().manual_seed(seed)
    k_len, b = 12, 2
    key_mask = torch.zeros(b, k_len, dtype=torch.bool)
    key_mask[0, 2:] = True
    key_mask[1, :9] = True
    vision_index = torch.tensor([[3, 4, 5, 6], [1, 2, 3, 4]])
    text_index = torch.tensor([[7, 8, 9, 10, 11], [5, 6, 7, 8, 8]])  # row 1's last entry is filler
    text_mask = torch.tensor([[True] * 5, [True] * 4 + [False]])
    logits = torch.randn(b, HEADS, k_len, k_len, generator=g) * 2
    causal = torch.ones(k_len, k_len, dtype=torch.bool).tril()
    allowed = causal[None, None] & key_mask[:, None, None, :]
    full = logits.masked_fill(~allowed, -math.inf).softmax(-1).nan_to_num(0.0)  # [B, H, K, K]
    rows = full.gather(2, text_index[:, None, :, None].expand(b, HEADS, 5, k_len))  # [B, H, T, K]
    return dict(full=full, attn=rows, key_mask=key_mask, vision_index=vision_index, text_index=text_index,
                text_mask=text_mask)


def context(batch: dict, attn: torch.Tensor | None = None, **kw) -> ScoringContext:
    return ScoringContext(
        attn=batch["attn"] if attn is None else attn,
        query_index=batch["text_index"],
        query_mask=batch["text_mask"],
        vision_index=batch["vision_index"],
        text_index=batch["text_index"],
        text_mask=batch["text_mask"],
        key_mask=batch["key_mask"],
        **kw,
    )


def naive_adaptinfer(full: torch.Tensor, text_pos: list[list[int]], vision_pos: list[list[int]], lb: float = 1.0):
    """The REFERENCE.md formula by explicit loops over valid text tokens, in float64, on the full attention."""
    out = []
    for b in range(full.shape[0]):
        a = full[b].double()
        tp, vp = text_pos[b], vision_pos[b]
        heads = a.shape[0]
        s_mat = [[[a[h, i, j] + a[h, j, i] - (a[h, j, j] if i == j else 0.0) for j in tp] for i in tp]
                 for h in range(heads)]
        mean = sum(s_mat[h][ii][jj] for h in range(heads) for ii in range(len(tp)) for jj in range(len(tp)))
        mean = mean / (heads * len(tp) ** 2)
        scores = []
        for v in vp:
            total = 0.0
            for h in range(heads):
                for jj, j in enumerate(tp):
                    w = sum((1 - lb) * mean + lb * s_mat[h][ii][jj] for ii in range(len(tp)))
                    total += w * a[h, j, v]
            scores.append(float(total))
        out.append(scores)
    return torch.tensor(out, dtype=torch.float64)


def valid_positions(batch: dict) -> tuple[list[list[int]], list[list[int]]]:
    text = [batch["text_index"][b][batch["text_mask"][b]].tolist() for b in range(2)]
    return text, batch["vision_index"].tolist()


# ---------------------------------------------------------------- adaptinfer
@pytest.mark.parametrize("lb", [1.0, 0.5, 0.0])
def test_adaptinfer_matches_naive_loops(lb):
    batch = padded_batch()
    text, vision = valid_positions(batch)
    expected = naive_adaptinfer(batch["full"], text, vision, lb)
    got = score("adaptinfer", context(batch, options={"text_weight_blend": lb}))
    assert got.shape == (2, 4) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-7)


def test_adaptinfer_default_is_lb_one():
    batch = padded_batch(1)
    torch.testing.assert_close(score("adaptinfer", context(batch)),
                               score("adaptinfer", context(batch, options={"text_weight_blend": 1.0})))


def test_adaptinfer_lb_zero_weighs_every_text_token_the_same():
    batch = padded_batch(2)
    got = score("adaptinfer", context(batch, options={"text_weight_blend": 0.0}))
    text, vision = valid_positions(batch)
    for b in range(2):
        a = batch["full"][b].double()
        # plain sum of attention to v over heads and valid text rows
        plain = torch.tensor([sum(float(a[h, j, v]) for h in range(HEADS) for j in text[b]) for v in vision[b]])
        ratio = got[b].double() / plain
        torch.testing.assert_close(ratio, ratio[0].expand_as(ratio), rtol=1e-5, atol=0)
    # with lb = 1 the text weights differ, so the ratio is not constant
    full = score("adaptinfer", context(batch)).double()
    plain0 = torch.tensor([sum(float(batch["full"][0, h, j, v]) for h in range(HEADS) for j in text[0])
                           for v in vision[0]], dtype=torch.float64)
    assert (full[0] / plain0).std() > 1e-3


@pytest.mark.parametrize("name", ["adaptinfer", "sparsevlm"])
def test_padding_rows_and_filler_columns_contribute_nothing(name):
    batch = padded_batch(3)
    before = score(name, context(batch))
    garbage = batch["attn"].clone()
    garbage[1, :, 4, :] = torch.tensor(float("nan"))  # row 1's padded text row
    after_nan = score(name, context(batch, attn=garbage))
    garbage[1, :, 4, :] = 7.0
    after_big = score(name, context(batch, attn=garbage))
    moved = dict(batch, text_index=batch["text_index"].clone())
    moved["text_index"][1, 4] = 2  # filler pointing at a vision token instead
    after_moved = score(name, ScoringContext(
        attn=batch["attn"], query_index=moved["text_index"], query_mask=batch["text_mask"],
        vision_index=batch["vision_index"], text_index=moved["text_index"], text_mask=batch["text_mask"],
        key_mask=batch["key_mask"]))
    for other in (after_nan, after_big, after_moved):
        torch.testing.assert_close(other, before)
    # and changing a valid row does change the scores
    changed = batch["attn"].clone()
    changed[1, :, 0, 1:5] = torch.tensor([0.4, 0.1, 0.3, 0.2])
    assert not torch.allclose(score(name, context(batch, attn=changed)), before)


def test_text_rows_must_be_the_text_tokens():
    batch = padded_batch()
    ctx = context(batch)
    ctx.query_index = ctx.query_index.flip(-1)
    with pytest.raises(ValueError, match="query_index must equal ctx.text_index"):
        score("adaptinfer", ctx)
    with pytest.raises(ValueError, match="R = 1"):
        score("fastv", context(batch))
    with pytest.raises(ValueError, match="unknown to scorer 'adaptinfer'.*text_weight_blend"):
        score("adaptinfer", context(batch, options={"blend": 0.5}))
    with pytest.raises(ValueError, match="text_weight_blend = 2"):
        score("adaptinfer", context(batch, options={"text_weight_blend": 2}))


# ---------------------------------------------------------------- fastv and sparsevlm on hand-built attention
def hand_context(attn: torch.Tensor, vision: list[int], text: list[int], key_len: int) -> ScoringContext:
    b = attn.shape[0]
    return ScoringContext(
        attn=attn, query_index=torch.tensor([text] * b), query_mask=torch.ones(b, len(text), dtype=torch.bool),
        vision_index=torch.tensor([vision] * b), text_index=torch.tensor([text] * b),
        text_mask=torch.ones(b, len(text), dtype=torch.bool), key_mask=torch.ones(b, key_len, dtype=torch.bool))


def test_fastv_is_head_mean_of_last_row():
    # keys: [sys, v0, v1, v2, t0, t1]; last token t1; two heads
    attn = torch.zeros(1, 2, 1, 6)
    attn[0, 0, 0] = torch.tensor([0.1, 0.5, 0.1, 0.0, 0.1, 0.2])
    attn[0, 1, 0] = torch.tensor([0.2, 0.1, 0.0, 0.3, 0.2, 0.2])
    ctx = hand_context(attn, [1, 2, 3], [5], 6)
    got = score("fastv", ctx)
    torch.testing.assert_close(got, torch.tensor([[0.3, 0.05, 0.15]]))
    assert select(got, 2).tolist() == [[0, 2]]
    assert scorer_rows("fastv") == "last"


def test_sparsevlm_raters_are_the_text_tokens_above_mean_relevance():
    # keys: [sys, v0, v1, v2, t0, t1, t2]; rows t0, t1, t2; head 1 = head 0 + a per-row offset pattern
    vis = torch.tensor([[0.3, 0.2, 0.1],    # t0: mean 0.2    -> rater
                        [0.0, 0.0, 0.03],   # t1: mean 0.01   -> not a rater (mean over text = 0.137)
                        [0.1, 0.4, 0.1]])   # t2: mean 0.2    -> rater
    attn = torch.zeros(1, 2, 3, 7)
    attn[0, 0, :, 1:4] = vis + torch.tensor([[0.05], [0.0], [-0.05]])
    attn[0, 1, :, 1:4] = vis - torch.tensor([[0.05], [0.0], [-0.05]])
    attn[..., 0] = 1 - attn[..., 1:4].sum(-1)  # remaining mass on the system token
    got = score("sparsevlm", hand_context(attn, [1, 2, 3], [4, 5, 6], 7))
    torch.testing.assert_close(got, torch.tensor([[0.2, 0.3, 0.1]]))  # mean of rows t0 and t2
    # equal relevance everywhere: no token above the mean, all valid tokens rate
    flat = torch.full((1, 1, 2, 5), 0.2)
    torch.testing.assert_close(score("sparsevlm", hand_context(flat, [1, 2], [3, 4], 5)), torch.tensor([[0.2, 0.2]]))


# ---------------------------------------------------------------- pyramiddrop against transformers' eager attention
def test_pyramiddrop_matches_eager_attention_of_next_layer():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                         num_hidden_layers=2, vocab_size=16, max_position_embeddings=64)
    config._attn_implementation = "eager"
    layer = LlamaDecoderLayer(config, layer_idx=1).eval()
    with torch.no_grad():
        layer.input_layernorm.weight.uniform_(0.5, 1.5)
    rotary = LlamaRotaryEmbedding(config)
    b, k_len = 2, 10
    key_mask = torch.ones(b, k_len, dtype=torch.bool)
    key_mask[0, :2] = False  # row 0 left-padded
    key_mask[1, 8:] = False  # row 1 right-padded
    # original RoPE positions with a gap, as after an earlier drop with positions kept
    position_ids = torch.stack([torch.tensor([0, 0, 0, 1, 2, 5, 6, 7, 8, 9]), torch.tensor([0, 1, 2, 3, 7, 8, 9, 10, 10, 10])])
    hidden = torch.randn(b, k_len, 32)
    cos, sin = rotary(hidden, position_ids)
    vision_index = torch.tensor([[3, 4, 5], [1, 2, 3]])
    ctx = ScoringContext(attn=None, query_index=torch.zeros(b, 0, dtype=torch.long),
                         query_mask=torch.zeros(b, 0, dtype=torch.bool), vision_index=vision_index,
                         text_index=torch.tensor([[6, 7, 8, 9], [4, 5, 6, 7]]), text_mask=torch.ones(b, 4, dtype=torch.bool),
                         key_mask=key_mask, hidden_states=hidden, next_layer=layer, position_embeddings=(cos, sin))
    with torch.no_grad():
        got = score("pyramiddrop", ctx)
        causal = torch.ones(k_len, k_len, dtype=torch.bool).tril()[None, None] & key_mask[:, None, None, :]
        mask = torch.zeros(b, 1, k_len, k_len).masked_fill(~causal, torch.finfo(torch.float32).min)
        _, weights = layer.self_attn(layer.input_layernorm(hidden), position_embeddings=(cos, sin), attention_mask=mask)
    assert weights.shape == (b, 4, k_len, k_len)
    last = [9, 7]
    expected = torch.stack([weights[r, :, last[r], vision_index[r]].mean(0) for r in range(b)])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert scorer_rows("pyramiddrop") == "none"


def test_pyramiddrop_needs_hidden_states():
    batch = padded_batch()
    with pytest.raises(ValueError, match="ctx.hidden_states"):
        score("pyramiddrop", context(batch))


# ---------------------------------------------------------------- random
def test_random_is_reproducible_per_seed():
    batch = padded_batch()

    rows = batch["vision_index"].shape[0]

    def draw(*seeds: int) -> torch.Tensor:
        return score("random", context(batch, generators=[torch.Generator().manual_seed(s) for s in seeds]))

    a, b, c = draw(5, 7), draw(5, 7), draw(6, 7)
    torch.testing.assert_close(a, b)
    assert not torch.equal(a[0], c[0]) and torch.equal(a[1], c[1])  # each row draws from its own generator
    assert not torch.equal(a[0], a[1])
    assert ((a >= 0) & (a < 1)).all()
    assert rows == 2
    with pytest.raises(ValueError, match="ctx.generators, one seeded torch.Generator per row"):
        score("random", context(batch))
    with pytest.raises(ValueError, match="per row"):
        draw(5)


# ---------------------------------------------------------------- select
def test_select_sorted_count_and_tie_break():
    scores = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0], [5.0, 4.0, 3.0, 2.0, 1.0]])
    assert select(scores, 2).tolist() == [[1, 2], [0, 1]]  # ties go to the earlier token
    assert select(scores, 4).tolist() == [[1, 2, 3, 4], [0, 1, 2, 3]]
    assert select(scores, 0).shape == (2, 0)
    assert select(torch.tensor([[float("nan"), 0.0, -1.0]]), 2).tolist() == [[1, 2]]  # NaN ranks lowest
    g = torch.Generator().manual_seed(0)
    rand = torch.rand(3, 50, generator=g)
    kept = select(rand, 10)
    assert kept.shape == (3, 10)
    assert (kept.diff(dim=-1) > 0).all()
    for r in range(3):
        assert set(kept[r].tolist()) == set(torch.topk(rand[r], 10).indices.tolist())
    with pytest.raises(ValueError, match=r"k = 6: must be an int in 0\.\.5"):
        select(scores, 6)


# ---------------------------------------------------------------- registry
def test_registry_one_function_one_registration():
    @register_scorer("_test_first_vision", rows="none", options={"bonus": 0.0}, replace=True)
    def first_vision(ctx: ScoringContext, bonus: float) -> torch.Tensor:
        v = ctx.vision_index.shape[1]
        return (torch.arange(v, 0, -1, dtype=torch.float32) + bonus).expand(ctx.vision_index.shape[0], v)

    batch = padded_batch()
    assert "_test_first_vision" in available_scorers()
    assert select(score("_test_first_vision", context(batch)), 2).tolist() == [[0, 1], [0, 1]]
    with pytest.raises(ValueError, match="already registered"):
        register_scorer("_test_first_vision", rows="none")(first_vision)
    with pytest.raises(ValueError, match="rows = 'all'"):
        register_scorer("_x", rows="all")
    with pytest.raises(KeyError, match="unknown; available scorers"):
        score("nope", context(batch))
    assert {"adaptinfer", "fastv", "sparsevlm", "pyramiddrop", "random"} <= set(available_scorers())


# ---------------------------------------------------------------- visionzip
def test_visionzip_split_ratio():
    assert visionzip_split(64) == (54, 10)
    assert visionzip_split(128) == (108, 20)
    assert visionzip_split(192) == (162, 30)
    assert visionzip_split(0) == (0, 0)


def test_visionzip_hand_built():
    cls_attn = torch.tensor([[0.1, 0.9, 0.05, 0.8, 0.02, 0.03, 0.04, 0.01]])
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    keys = torch.stack([e1, e1 + e2, e1 + 0.1 * e2, -e2, 2 * e1, e2, e2 + 0.2 * e1, -e1 + 3 * e2])[None]
    kept, groups = visionzip_select(cls_attn, keys, n_dominant=2, n_contextual=2)
    # dominant: patches 1, 3; remaining [0, 2, 4, 5, 6, 7]: targets at offsets 0 and 3 -> patches 0 and 5
    assert kept.tolist() == [[0, 1, 3, 5]]
    assert groups == [[(0, [0, 2, 4]), (5, [5, 6, 7])]]
    features = torch.arange(8, dtype=torch.float32)[None, :, None].expand(1, 8, 3)
    merged = visionzip_merge(features, kept, groups)
    torch.testing.assert_close(merged[0, :, 0], torch.tensor([2.0, 1.0, 3.0, 6.0]))  # mean(0,2,4), 1, 3, mean(5,6,7)
    # head-major input [B, H, P] is averaged over heads first
    kept_h, _ = visionzip_select(torch.stack([cls_attn, cls_attn], dim=1), keys, 2, 2)
    assert kept_h.tolist() == kept.tolist()


def test_visionzip_groups_partition_the_rest():
    g = torch.Generator().manual_seed(0)
    b, p, n_dom, n_ctx = 3, 40, 9, 4
    cls_attn = torch.rand(b, p, generator=g)
    keys = torch.randn(b, p, 6, generator=g)
    kept, groups = visionzip_select(cls_attn, keys, n_dom, n_ctx)
    assert kept.shape == (b, n_dom + n_ctx)
    assert (kept.diff(dim=-1) > 0).all()
    unit = torch.nn.functional.normalize(keys, dim=-1)
    for r in range(b):
        dominant = set(torch.topk(cls_attn[r], n_dom).indices.tolist())
        targets = [t for t, _ in groups[r]]
        assert set(kept[r].tolist()) == dominant | set(targets)
        members = [m for _, ms in groups[r] for m in ms]
        assert sorted(members) == sorted(set(range(p)) - dominant)  # each non-dominant patch in exactly one group
        for t, ms in groups[r]:
            assert t in ms
            for m in ms:
                if m != t:  # joined its most similar target
                    sims = torch.stack([unit[r, m] @ unit[r, tt] for tt in targets])
                    assert targets[int(sims.argmax())] == t
    _, none_groups = visionzip_select(cls_attn, keys, 5, 0)
    assert none_groups == [[], [], []]
    with pytest.raises(ValueError, match="n_dominant \\+ n_contextual = 41"):
        visionzip_select(cls_attn, keys, 40, 1)


def test_adaptinfer_with_shared_slices_equals_the_gathered_columns():
    """Without padding and with one vision run, the engine hands the scorer slices (views) for the text and vision
    positions; the scores are those of the index tensors."""
    g = torch.Generator().manual_seed(5)
    b, h, n, v0, v1 = 2, 3, 12, 2, 7  # vision at 2..6, text at 7..11 in both rows
    attn = torch.softmax(torch.randn(b, h, n - v1, n, generator=g), -1)
    text_index = torch.arange(v1, n).expand(b, -1)
    ctx = ScoringContext(attn=attn, query_index=text_index, query_mask=torch.ones(b, n - v1, dtype=torch.bool),
                         vision_index=torch.arange(v0, v1).expand(b, -1), text_index=text_index,
                         text_mask=torch.ones(b, n - v1, dtype=torch.bool), key_mask=torch.ones(b, n, dtype=torch.bool),
                         text_full=True)
    for lb in (1.0, 0.4):  # with a blend too: the slice form (the engine's batch-1 entry, on_slices) blends as well
        ctx.text_slice = ctx.vision_slice = None
        ctx.options = {"text_weight_blend": lb}
        gathered = score("adaptinfer", ctx)
        ctx.text_slice, ctx.vision_slice = slice(v1, n), slice(v0, v1)
        torch.testing.assert_close(score("adaptinfer", ctx), gathered, rtol=1e-6, atol=1e-7)
        on_slices = get_scorer("adaptinfer").on_slices(attn, slice(v1, n), slice(v0, v1), text_weight_blend=lb)
        torch.testing.assert_close(on_slices, gathered, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="text_weight_blend = 2"):
        get_scorer("adaptinfer").on_slices(attn, slice(v1, n), slice(v0, v1), text_weight_blend=2)
