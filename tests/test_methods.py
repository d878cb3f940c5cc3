"""The compared methods (issue 18): DART, DivPrune, CDPruner, VisPruner, pooling and SparseVLM with recycling.

Each against a case whose right answer is known by construction, an independent naive computation, or torch's
own op; then through the engine: exact budgets, padded batches, generation on the tiny and the demo model.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pruning.engine import PruningEngine
from pruning.schedule import MethodInfeasible, Schedule
from pruning.scorers import dart_pick, density_peak_clusters, recycle_split
from pruning.selectors import (
    SelectorContext, cdpruner_relevance, divprune_order, dpp_greedy, pooling_shape, run_selector, vispruner_select,
)
from tests.conftest import eager_cls_attention, make_prompts, pixel_values, tiny_arch
from vlm.layout import TokenLayout
from vlm.models import build_random_model

N_VISION = 16  # tiny_arch: 56 px / patch 14 -> a 4 x 4 grid
SELECTORS = ["divprune", "cdpruner", "vispruner", "pooling", "visionzip"]
# name -> stages [(layer, keep)] on the 6-layer model with 16 vision tokens
STAGES = {name: [(-1, 8)] for name in SELECTORS}
STAGES.update(dart=[(1, 7)], sparsevlm_recycle=[(0, 10), (2, 5)])
METHODS = sorted(STAGES)


@pytest.fixture(scope="module")
def model6():
    return build_random_model(tiny_arch(layers=6, kv_heads=2, init_range=0.2), dtype="float32", device="cpu", seed=11).model


def _schedule(stages, positions="keep"):
    return Schedule.from_dict({"stages": [{"layer": l, "keep": k} for l, k in stages], "positions": positions})


def _inputs(lengths, seed=0):
    inputs = make_prompts(N_VISION, lengths, seed=seed)
    inputs["pixel_values"] = pixel_values(len(lengths), seed=seed)
    return inputs


def _expected_vision(stages, layers=6, initial=N_VISION):
    out, cur = [], initial
    for layer in range(-1, layers):
        if layer >= 0:
            out.append(cur)
        for l, k in stages:
            if l == layer:
                cur = k
    return out


def _ctx(projected, text=None, text_mask=None, **kw):
    b, v, d = projected.shape
    text = torch.randn(b, 3, d) if text is None else text
    side = math.isqrt(v)
    return SelectorContext(projected=projected, text_embeds=text,
                           text_mask=torch.ones(text.shape[:2], dtype=torch.bool) if text_mask is None else text_mask,
                           grid=(side, side) if side * side == v else None, **kw)


def _saver(seen: dict):
    """A pre-hook for a decoder layer's input_layernorm that saves the hidden states the layer processes (the first
    call's) in seen["h"]: inside the layer's forward, so after the engine's step (which runs as the layer's forward,
    after the layer's own pre-hooks)."""
    def hook(module, args, kwargs):
        seen.setdefault("h", (args[0] if args else kwargs["hidden_states"]).clone())

    return hook


# -- DivPrune ---------------------------------------------------------------------------------------------------
def test_divprune_reference_worked_example():
    e1, e2 = torch.eye(2)
    x = torch.stack([e1, nn.functional.normalize(e1 + 0.01 * e2, dim=0), e2, -e1])[None]  # [1, 4, 2]
    assert divprune_order(x, 2).tolist() == [[3, 0]]


def test_divprune_drops_duplicates():
    g = torch.Generator().manual_seed(0)
    distinct = torch.randn(6, 8, generator=g)
    x = torch.cat([distinct, distinct[[2, 0, 5, 1]]])[None]  # tokens 6..9 copy 2, 0, 5, 1
    kept = run_selector("divprune", _ctx(x), 6).kept[0].tolist()
    assert kept == [0, 1, 2, 3, 4, 5]  # one of each, and the copies (later) go: a copy is at distance 0
    # the first pick is the token whose nearest other token is farthest: 3 or 4 (no copy)
    assert divprune_order(x, 1)[0, 0].item() in (3, 4)


# -- DART -------------------------------------------------------------------------------------------------------
def test_dart_drops_copies_of_its_pivots():
    eye = torch.eye(12)
    pivots = eye[:4]  # vision tokens 4..7 carry the largest key norms
    distinct = eye[4:8] - 0.1 * eye[:4].sum(0)  # negatively similar to every pivot
    h = torch.cat([pivots, pivots, distinct])  # tokens 0..3 copy the pivots, 4..7 pivots, 8..11 distinct
    norm = torch.tensor([1.0] * 4 + [9.0, 8.0, 7.0, 6.0] + [1.0] * 4)
    kept, _ = dart_pick(h, torch.zeros(0, 12), norm, torch.zeros(0), k=8)
    assert kept.tolist() == [4, 5, 6, 7, 8, 9, 10, 11]


@pytest.mark.parametrize("k", [0, 2, 4, 5, 13, 20, 31])
def test_dart_each_pick_is_less_similar_to_its_pivot_than_the_pool_and_k_is_exact(k):
    g = torch.Generator().manual_seed(k)
    h_v, h_t = torch.randn(40, 16, generator=g), torch.randn(5, 16, generator=g)
    norm_v, norm_t = torch.rand(40, generator=g), torch.rand(5, generator=g)
    kept, steps = dart_pick(h_v, h_t, norm_v, norm_t, k)
    assert kept.shape == (k,) and kept.unique().numel() == k
    assert set(torch.topk(norm_v, min(4, k)).indices.tolist()) <= set(kept.tolist())  # vision pivots kept
    assert len(steps) == (min(4, k) + 4 if k else 4)
    for step in steps:
        cos = nn.functional.cosine_similarity(h_v, step.pivot[None], dim=-1)
        if step.picks and step.pool_after:
            assert cos[step.picks].max() <= cos[step.pool_after].min()


# -- CDPruner ---------------------------------------------------------------------------------------------------
def _naive_greedy_logdet(kernel, k):
    chosen = []
    for _ in range(k):
        best, best_val = None, -math.inf
        for j in range(kernel.shape[0]):
            if j in chosen:
                continue
            idx = chosen + [j]
            val = torch.logdet(kernel[idx][:, idx]).item()
            if val > best_val + 1e-12:
                best, best_val = j, val
        chosen.append(best)
    return chosen


def test_dpp_greedy_equals_naive_log_det_and_first_pick_is_most_relevant():
    g = torch.Generator().manual_seed(1)
    p = torch.randn(2, 10, 8, generator=g, dtype=torch.float64)
    text = torch.randn(2, 3, 8, generator=g, dtype=torch.float64)
    rel = cdpruner_relevance(p, text, torch.ones(2, 3, dtype=torch.bool))
    assert torch.allclose(rel.amin(-1), torch.zeros(2, dtype=torch.float64)) and torch.allclose(rel.amax(-1), torch.ones(2, dtype=torch.float64))
    unit = nn.functional.normalize(p, dim=-1)
    kernel = rel[:, :, None] * (unit @ unit.transpose(1, 2)) * rel[:, None, :]
    picks = dpp_greedy(kernel, 5)
    for b in range(2):
        assert picks[b].tolist() == _naive_greedy_logdet(kernel[b], 5)
        assert picks[b, 0].item() == rel[b].argmax().item()


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_cdpruner_keeps_the_token_made_relevant_to_the_instruction(sign):
    """Token 5 is made the most relevant under the configured sign (like the question's words for sign = +1, unlike
    them for the official code's sign = -1): with k = 2 it is kept, and it is the DPP's first pick."""
    g = torch.Generator().manual_seed(2)
    p = torch.randn(1, 12, 16, generator=g)
    text = torch.randn(1, 4, 16, generator=g)
    p[0, 5] = sign * text[0].mean(0) * 3
    ctx = _ctx(p, text, options={"relevance_sign": sign})
    assert 5 in run_selector("cdpruner", ctx, 2).kept[0].tolist()
    assert cdpruner_relevance(p, text, torch.ones(1, 4, dtype=torch.bool), sign)[0].argmax().item() == 5
    p[0, 5] = -p[0, 5]  # now the least relevant: r = 0, never picked while the kernel has rank
    assert 5 not in run_selector("cdpruner", ctx, 2).kept[0].tolist()


def test_dpp_greedy_returns_exactly_k_past_the_kernel_rank():
    x = torch.randn(1, 6, 2, dtype=torch.float64)  # rank 2
    picks = dpp_greedy(x @ x.transpose(1, 2), 6)
    assert sorted(picks[0].tolist()) == list(range(6))


# -- VisPruner --------------------------------------------------------------------------------------------------
def _naive_vispruner(attn, feats, k, ratio, step=8):
    order = sorted(range(len(attn)), key=lambda i: (-float(attn[i]), i))
    n_imp = int(k * ratio)
    imp, rest = order[:n_imp], order[n_imp:]
    unit = nn.functional.normalize(feats.double(), dim=-1)
    while len(rest) > k - n_imp:
        a, b = rest[0::2], rest[1::2]
        n_drop = min(step, len(rest) - (k - n_imp), len(a))
        score = [max((float(unit[i] @ unit[j]) for j in b), default=0.0) for i in a]
        drop = set(sorted(range(len(a)), key=lambda t: (-score[t], t))[:n_drop])
        rest = [i for t, i in enumerate(a) if t not in drop] + b
    return sorted(imp), sorted(imp + rest)


@pytest.mark.parametrize("k, ratio", [(10, 0.5), (7, 0.75), (3, 0.0), (40, 0.5)])
def test_vispruner_equals_naive_loop_and_important_is_top_cls(k, ratio):
    g = torch.Generator().manual_seed(k)
    attn, feats = torch.rand(2, 40, generator=g), torch.randn(2, 40, 6, generator=g)
    feats[:, 20:30] = feats[:, 10:20] + 1e-3  # near-duplicates
    important, kept = vispruner_select(attn, feats, k, ratio)
    for b in range(2):
        imp, full = _naive_vispruner(attn[b], feats[b], k, ratio)
        assert important[b].tolist() == imp and kept[b].tolist() == full
        assert set(important[b].tolist()) == set(attn[b].topk(int(k * ratio)).indices.tolist())


def test_vispruner_important_tokens_are_the_top_cls_attention_of_the_tower(model6):
    inputs = _inputs([5, 3], seed=10)
    cls = eager_cls_attention(model6, inputs["pixel_values"])  # feature layer -2: the CLS row, head-mean [B, P]
    with PruningEngine(model6, _schedule([(-1, 8)]), "vispruner") as engine, torch.no_grad():
        model6(**inputs)
    layout = TokenLayout.from_batch(inputs["input_ids"], inputs["attention_mask"], model6.config.image_token_id)
    for b in range(2):
        important = set(layout.vision_index[b][cls[b].topk(4).indices].tolist())
        assert important <= set(engine.record.kept_positions[0][b].tolist())


# -- pooling ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k, shape", [(64, (8, 8)), (128, (8, 16)), (192, (12, 16)), (576, (24, 24)), (96, (8, 12)),
                                      (160, (10, 16)), (23, (1, 23))])
def test_pooling_shape_is_the_factor_pair_closest_to_square(k, shape):
    assert pooling_shape(k, 24, 24) == shape


def test_pooling_non_factorable_budget_is_infeasible_with_the_nearest_counts():
    with pytest.raises(MethodInfeasible, match="127 has no factor pair.*126 and 128"):
        pooling_shape(127, 24, 24)


def test_pooling_64_of_576_equals_torch_adaptive_avg_pool():
    p = torch.randn(2, 576, 10)
    sel = run_selector("pooling", _ctx(p), 64)
    want = nn.functional.adaptive_avg_pool2d(p.view(2, 24, 24, 10).permute(0, 3, 1, 2), (8, 8))
    torch.testing.assert_close(sel.tokens, want.permute(0, 2, 3, 1).reshape(2, 64, 10))
    assert sel.kept[0].tolist() == [r * 3 * 24 + c * 3 for r in range(8) for c in range(8)]  # windows' top-left


def test_pooling_feeds_the_pooled_grid_to_layer_zero(model6):
    inputs = _inputs([4, 2], seed=3)
    layout = TokenLayout.from_batch(inputs["input_ids"], inputs["attention_mask"], model6.config.image_token_id)
    seen = {}
    layer0 = model6.model.language_model.layers[0]
    hook = layer0.input_layernorm.register_forward_pre_hook(_saver(seen), with_kwargs=True)
    try:
        with torch.no_grad():
            model6(**inputs)
    finally:
        hook.remove()
    full = seen.pop("h")
    with PruningEngine(model6, _schedule([(-1, 4)]), "pooling") as engine, torch.no_grad():
        hook = layer0.input_layernorm.register_forward_pre_hook(_saver(seen), with_kwargs=True)  # sees its output
        try:
            model6(**inputs)
        finally:
            hook.remove()
    p = full.gather(1, layout.vision_index[..., None].expand(-1, -1, full.shape[-1]))  # [B, 16, D]
    pooled = nn.functional.adaptive_avg_pool2d(p.view(2, 4, 4, -1).permute(0, 3, 1, 2), (2, 2)).permute(0, 2, 3, 1)
    kept = engine.record.kept_positions[0]  # [B, 4]
    assert engine.record.vision_per_layer == [4] * 6
    for b in range(2):
        start = int(layout.vision_index[b, 0])
        assert (kept[b] - start).tolist() == [0, 2, 8, 10]
        pos = torch.arange(4) + start  # after the drop the 4 vision tokens follow the padding and system prompt
        torch.testing.assert_close(seen["h"][b, pos], pooled[b].reshape(4, -1))


# -- SparseVLM recycling ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("v", [16, 576])
def test_recycle_split_meets_the_keep_count_exactly_with_sparsevlm_cluster_counts(v):
    for k in range(0, v + 1):
        m = recycle_split(v, k, 0.3, 10)
        kept = k - m
        assert 0 <= m <= k
        if kept > 0:  # the rule's cluster count for the tokens it deletes
            n_del = v - kept
            assert m == ((math.floor(0.3 * n_del) + 1) // 10 + 1 if n_del else 0)


def test_density_peak_clusters_find_separated_blobs():
    g = torch.Generator().manual_seed(4)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = torch.cat([c + 0.1 * torch.randn(7, 2, generator=g) for c in centres])[None]  # 3 blobs of 7
    labels = density_peak_clusters(x, 3)[0]
    groups = [set(labels[i * 7:(i + 1) * 7].tolist()) for i in range(3)]
    assert all(len(grp) == 1 for grp in groups) and len(set.union(*groups)) == 3


def test_recycled_token_is_the_mean_of_its_members_at_the_first_members_slot(model6):
    """One cluster of every dropped token (recycle_ratio 1, huge clusters): 9 kept + 1 merged = keep 10."""
    inputs = _inputs([5, 3], seed=5)
    layout = TokenLayout.from_batch(inputs["input_ids"], inputs["attention_mask"], model6.config.image_token_id)
    with torch.no_grad():
        out0 = model6(**inputs, output_hidden_states=True).hidden_states[1]  # layer 0's output, whole sequence
    seen = {}
    engine = PruningEngine(model6, _schedule([(0, 10)]), "sparsevlm_recycle",
                           scorer_options={"recycle_ratio": 1.0, "tokens_per_cluster": 1000})
    with engine, torch.no_grad():
        hook = model6.model.language_model.layers[1].input_layernorm.register_forward_pre_hook(_saver(seen),
                                                                                    with_kwargs=True)
        try:
            model6(**inputs)
        finally:
            hook.remove()
    assert engine.record.vision_per_layer == [16] + [10] * 5
    kept = engine.record.kept_positions[0]  # [B, 10] original positions, the merged token's slot included
    for b in range(2):
        dropped = sorted(set(layout.vision_index[b].tolist()) - set(kept[b].tolist()))
        assert len(dropped) == 6  # 7 dropped by score; the first of them holds the merged token
        cur = [p for p in range(layout.seq_len) if p not in set(dropped)]  # what layer 1 holds
        h = seen["h"][b]  # [N', D]
        changed = [p for i, p in enumerate(cur) if not torch.allclose(h[i], out0[b, p], atol=1e-6)]
        assert len(changed) == 1  # every other token is layer 0's output, unchanged
        members = sorted(dropped + changed)
        assert changed[0] == members[0]  # the first member's slot
        torch.testing.assert_close(h[cur.index(changed[0])], out0[b, members].mean(0), atol=1e-5, rtol=0)


# -- every method through the engine ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", METHODS)
def test_budget_is_met_exactly(model6, name):
    inputs = _inputs([5, 8, 3], seed=6)
    stages = STAGES[name]
    with PruningEngine(model6, _schedule(stages), name) as engine, torch.no_grad():
        model6(**inputs)
    assert engine.record.vision_per_layer == _expected_vision(stages)
    assert [p.shape for p in engine.record.kept_positions] == [(3, k) for _, k in stages]


@pytest.mark.parametrize("name", METHODS)
def test_padded_batch_selects_as_rows_alone(model6, name):
    lengths = [5, 9, 2]
    inputs = _inputs(lengths, seed=7)
    mask = inputs["attention_mask"]
    inputs["position_ids"] = (mask.cumsum(1) - 1).clamp(min=0)  # each row's own positions, as generate makes them
    schedule = _schedule(STAGES[name], "renumber" if name in SELECTORS else "keep")
    with PruningEngine(model6, schedule, name) as engine, torch.no_grad():
        batch_logits = model6(**inputs).logits
        batch_kept = [p.clone() for p in engine.record.kept_positions]
    seq = inputs["input_ids"].shape[1]
    for r, n in enumerate(lengths):
        real = mask[r].bool()
        single = {"input_ids": inputs["input_ids"][r:r + 1, real], "attention_mask": mask[r:r + 1, real],
                  "pixel_values": inputs["pixel_values"][r:r + 1]}
        with PruningEngine(model6, schedule, name) as engine, torch.no_grad():
            logits = model6(**single).logits
        pad = seq - int(real.sum())
        for a, b in zip(engine.record.kept_positions, batch_kept):
            assert (a[0] + pad).tolist() == b[r].tolist()
        torch.testing.assert_close(batch_logits[r, -n:], logits[0, -n:], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", METHODS)
def test_runs_inside_generate_on_the_tiny_model(tiny_model, name):
    model = tiny_model.model
    inputs = _inputs([4, 6], seed=8)
    stages = [(-1, 6)] if name in SELECTORS else ([(1, 6)] if name == "dart" else [(0, 10), (1, 6)])
    with PruningEngine(model, _schedule(stages), name) as engine, torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape == (2, inputs["input_ids"].shape[1] + 3)
    assert engine.record.vision_per_layer == _expected_vision(stages, layers=4)


def test_methods_run_inside_generate_on_the_demo_model():
    from vlm.models import load_model
    from vlm.prompts import encode_batch
    from vlm.tasks import build_task

    demo = load_model("demo", dtype="float32", device="cpu")
    samples = list(build_task("shapes", split="test").samples(limit=2))
    inputs = encode_batch(demo.processor, samples, device=torch.device("cpu"), dtype=torch.float32)
    for name in METHODS:
        stages = {"dart": [(0, 64)], "sparsevlm_recycle": [(1, 256), (2, 128), (4, 64), (5, 32)]}.get(name, [(-1, 64)])
        with PruningEngine(demo.model, _schedule(stages), name) as engine, torch.no_grad():
            out = demo.model.generate(**inputs, max_new_tokens=2, do_sample=False)
        assert engine.record.vision_per_layer == _expected_vision(stages, layers=8, initial=576), name
        assert out.shape[1] == inputs["input_ids"].shape[1] + 2


# -- infeasible -------------------------------------------------------------------------------------------------
def _siglip_model():
    arch = tiny_arch()
    arch["vision_feature_select_strategy"] = "full"
    arch["vision_config"] = {"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                             "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": 56, "patch_size": 14}
    return build_random_model(arch, dtype="float32", device="cpu", seed=0).model


@pytest.mark.parametrize("name", ["vispruner", "visionzip"])
def test_cls_methods_are_infeasible_on_a_tower_without_cls(name):
    model = _siglip_model()
    with pytest.raises(MethodInfeasible, match="no CLS token"):
        with PruningEngine(model, _schedule([(-1, 8)]), name):
            pass
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    with PruningEngine(model, _schedule([(-1, 8)]), "divprune") as engine, torch.no_grad():  # needs no CLS
        inputs = make_prompts(16, [3], seed=1)
        model(**inputs, pixel_values=pixel_values(1, seed=1))
    assert engine.record.vision_per_layer == [8] * 4


def test_benchmark_records_method_infeasible_as_an_infeasible_row(tmp_path):
    from pruning import results as res
    from pruning.benchmark import run_benchmark
    from tests.test_benchmark import bench_cfg
    from tests.bench_fixtures import save_processor

    cfg = bench_cfg(save_processor(tmp_path / "processor"), tmp_path / "out", ["pooling"], [127, 128], limit=2)
    table = res.read_table(run_benchmark(cfg)).set_index(["method", "budget"])
    assert table.loc[("pooling", 127), "status"] == res.STATUS_INFEASIBLE
    assert "126 and 128" in table.loc[("pooling", 127), "note"]
    assert table.loc[("pooling", 128), "status"] == res.STATUS_OK
    assert table.loc[("pooling", 128), "vision_per_layer"] == " ".join(["128"] * 8)


def test_every_method_config_names_a_registered_method():
    from pruning.methods import load_method
    from pruning.scorers import available_scorers
    from pruning.selectors import available_selectors

    for name in METHODS:
        method = load_method(name)
        assert method["scorer"] in available_scorers() + available_selectors()
        assert (method["layers"] == [-1]) == (method["scorer"] in available_selectors())



@pytest.mark.parametrize("name, budget", [("divprune", 64), ("cdpruner", 64), ("vispruner", 64), ("pooling", 64),
                                          ("dart", 128), ("sparsevlm_recycle", 192)])
def test_lmms_adapter_generates_with_each_method(tmp_path, name, budget):
    from pruning.lmms_adapter import PrunedLLaVA
    from tests.bench_fixtures import save_processor, tiny_model_cfg
    from tests.test_lmms_adapter import _adapter, _gen_requests
    from vlm.models import load_from_config
    from vlm.shapes.world import make_scene, render_scene

    loaded = load_from_config(tiny_model_cfg(save_processor(tmp_path / "proc")))
    docs = [{"image": render_scene(make_scene(s)), "question": make_scene(s).questions[0].text} for s in range(2)]
    model = _adapter(loaded, docs, method=name, budget=budget, batch_size=2, max_new_tokens=2)
    assert isinstance(model, PrunedLLaVA) and model.scorer == name
    assert abs(model.schedule.budget(loaded.num_layers, 576, "processed") - budget) <= 1.0
    assert len(model.generate_until(_gen_requests(docs, {}))) == 2
