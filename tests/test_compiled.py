"""The compiled prefill (pruning/compiled.py, PruningEngine(compile=True)): equal to eager, one graph per bucket,
eager fallback with a reason, generation, the model restored on exit, and a compiled benchmark row."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch._dynamo

from pruning.compiled import CompileError, active, bucket_length, check_buckets, compiled_prefill, pad_to_bucket
from pruning.engine import PruningEngine
from pruning.schedule import Schedule
from pruning.scorers import register_scorer
from tests.bench_fixtures import save_processor
from tests.conftest import PAD_TOKEN_ID, make_prompts, pixel_values, tiny_arch
from vlm.models import build_random_model

N_VISION = 16
BUCKET = 48


@pytest.fixture(scope="module")
def model():
    return build_random_model(tiny_arch(layers=3, kv_heads=2, init_range=0.2), dtype="float32", device="cpu",
                              seed=5).model


def _inputs(lengths, seed=0):
    inputs = make_prompts(N_VISION, lengths, seed=seed)
    inputs["pixel_values"] = pixel_values(len(lengths), seed=seed)
    return pad_to_bucket(inputs, BUCKET, PAD_TOKEN_ID)


SCHEDULE = Schedule.from_dict({"stages": [{"layer": 0, "keep": 8}, {"layer": 1, "keep": 3}]})


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def test_compiled_pruned_prefill_equals_eager_and_compiles_once_per_bucket(model):
    first, second = _inputs([7]), _inputs([12], seed=1)  # different prompts, both padded to one bucket
    assert first["input_ids"].shape == second["input_ids"].shape == (1, BUCKET)
    with torch.no_grad():
        unpruned = model(**first).logits
        eager = {}
        for name, inputs in (("first", first), ("second", second)):
            with PruningEngine(model, SCHEDULE, "adaptinfer") as engine:
                eager[name] = (model(**inputs).logits, engine.record.kept_positions, engine.record.vision_per_layer)
        with PruningEngine(model, SCHEDULE, "adaptinfer", compile=True) as engine:
            out = model(**first).logits
            assert engine.compiled and engine.compile_fallback is None
            torch.testing.assert_close(out, eager["first"][0], rtol=1e-5, atol=1e-5)
            assert [k.tolist() for k in engine.record.kept_positions] == [k.tolist() for k in eager["first"][1]]
            assert engine.record.vision_per_layer == eager["first"][2] == [N_VISION, 8, 3]
            graphs = _graphs()
            with torch._dynamo.config.patch(error_on_recompile=True):  # another prompt of the bucket: no recompile
                out2 = model(**second).logits
            assert _graphs() == graphs
            torch.testing.assert_close(out2, eager["second"][0], rtol=1e-5, atol=1e-5)
            assert [k.tolist() for k in engine.record.kept_positions] == [k.tolist() for k in eager["second"][1]]
        # a new engine with the same schedule reuses the graph; the plain model is untouched afterwards
        with PruningEngine(model, SCHEDULE, "adaptinfer", compile=True) as engine, \
                torch._dynamo.config.patch(error_on_recompile=True):
            model(**first)
            assert engine.compiled
        assert "forward" not in vars(model.model.language_model) and active(model) is None
        assert torch.equal(model(**first).logits, unpruned)


def test_compiled_unpruned_prefill_and_generation(model):
    inputs = _inputs([9, 5], seed=2)
    with torch.no_grad():
        eager = model(**inputs).logits
        with compiled_prefill(model) as ctx:
            torch.testing.assert_close(model(**inputs).logits, eager, rtol=1e-5, atol=1e-5)
            assert ctx.compiled and active(model) is ctx
        with PruningEngine(model, SCHEDULE, "fastv") as engine:
            expected = model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=PAD_TOKEN_ID)
        with PruningEngine(model, SCHEDULE, "fastv", compile=True) as engine:
            got = model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=PAD_TOKEN_ID)
            assert engine.compiled  # the prefill ran compiled; decode steps ran eager
    assert torch.equal(got, expected)


def test_a_mode_that_replays_cuda_graphs_says_when_a_graph_does_not(model):
    """reduce-overhead on a CPU: inductor compiles the graph but cannot replay it as a CUDA graph and only logs (on a
    GPU, e.g. for a CPU tensor in the graph); the prefill warns once and says why, instead of being timed as a
    replay. A mode without CUDA graphs says nothing."""
    inputs = _inputs([7])
    with torch.no_grad():
        with PruningEngine(model, SCHEDULE, "adaptinfer"):
            eager = model(**inputs).logits
        with PruningEngine(model, SCHEDULE, "adaptinfer", compile="reduce-overhead") as engine:
            with pytest.warns(RuntimeWarning, match="replays CUDA graphs, but this prefill's graph does not"):
                out = model(**inputs).logits
            assert engine.compiled and "not CUDA" in engine.cudagraph_skip and active(model).cudagraphs is False
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # warned once
                model(**inputs)
        torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
        with compiled_prefill(model) as ctx, warnings.catch_warnings():
            warnings.simplefilter("error")
            model(**inputs)
            assert ctx.compiled and ctx.cudagraphs is None and ctx.cudagraph_skip is None


def test_the_reason_inductor_logs_for_skipping_cuda_graphs_is_kept(model):
    """On a GPU inductor logs why it skipped CUDA graphs (`log_cudagraph_skip_and_bump_counter`); that reason, not a
    guess, reaches `cudagraph_skip`, and the handler is gone once the prefill closes."""
    from torch._inductor.cudagraph_utils import cudagraphs_log, log_cudagraph_skip_and_bump_counter

    inputs = _inputs([7])
    handlers = list(cudagraphs_log.handlers)
    with torch.no_grad(), compiled_prefill(model, "reduce-overhead") as ctx:
        compiled = ctx._fn

        def skipping(*args, **kwargs):  # what inductor does when a graph cannot be a CUDA graph
            log_cudagraph_skip_and_bump_counter("skipping cudagraphs due to mutated inputs (1 instances)")
            return compiled(*args, **kwargs)

        ctx._fn = skipping
        with pytest.warns(RuntimeWarning, match=r"\(mutated inputs \(1 instances\)\)"):
            model(**inputs)
        assert ctx.cudagraph_skip == "mutated inputs (1 instances)" and ctx.cudagraphs is False
    assert cudagraphs_log.handlers == handlers


def _graphs_against_cuda_graphs(monkeypatch, run) -> list[tuple]:
    """What inductor holds against replaying each graph `run` compiles as a CUDA graph, the device aside: (reason it
    disabled them, failed checks, indices of the graph inputs it mutates) per graph. On a CPU inductor stops at the
    device; here its device check is switched off and the graphs are not wrapped, so the other checks show."""
    output_code = pytest.importorskip("torch._inductor.output_code")
    cudagraph_utils = pytest.importorskip("torch._inductor.cudagraph_utils")
    import torch._functorch.config
    from torch._inductor.utils import BoxedBool

    if not all(hasattr(output_code, name) for name in ("CompiledFxGraph", "cudagraph_post_compile",
                                                         "cudagraph_partition_post_compile")) \
            or not hasattr(cudagraph_utils, "check_lowering_disable_cudagraph"):
        pytest.skip(f"torch {torch.__version__}'s inductor checks CUDA graphs elsewhere than torch 2.13's")
    graphs, original = [], output_code.CompiledFxGraph.__init__

    def record(self, *args, **kwargs):
        original(self, *args, **kwargs)
        info = self.cudagraph_info
        graphs.append((self.disabled_cudagraphs_reason, list(info.cudagraph_fail_reasons) if info else None,
                       list(self.mutated_input_idxs)))

    def unwrapped(example_inputs, graph, cudagraphs, *args, **kwargs):
        BoxedBool.disable(cudagraphs)  # nothing to replay on a CPU

    monkeypatch.setattr(cudagraph_utils, "check_lowering_disable_cudagraph", lambda device_nodes: None)
    monkeypatch.setattr(output_code.CompiledFxGraph, "__init__", record)
    monkeypatch.setattr(output_code, "cudagraph_post_compile", unwrapped)
    monkeypatch.setattr(output_code, "cudagraph_partition_post_compile", unwrapped)
    with torch.no_grad(), torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):  # compile now: a cached graph skips the checks
        run()
    return graphs


def test_the_compiled_pruned_prefill_has_nothing_against_cuda_graphs_but_the_cpu(model, monkeypatch):
    """The batch-1 gain on a GPU is the CUDA-graph replay of the pruned prefill (issue 17's goals), and no GPU is here to
    see whether inductor would refuse it: the engine's graph must give inductor no reason to (no mutated inputs, no
    incompatible op, no input storage mutation, no non-tensor input), the CPU device aside, so that a change which
    would lose the replay fails here and not first on a lent GPU."""
    inputs = _inputs([7])

    def run():
        with PruningEngine(model, SCHEDULE, "adaptinfer", compile="reduce-overhead") as engine, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the device: inductor compiles without CUDA graphs here, and says so
            model(**inputs)
        assert engine.compiled and engine.compile_fallback is None

    graphs = _graphs_against_cuda_graphs(monkeypatch, run)
    assert graphs and graphs == [(None, [], [])] * len(graphs), graphs


def test_the_cuda_graph_check_sees_a_mutated_input(model, monkeypatch):
    """The check above can fail: a layer step that writes into the graph's input embeddings is seen."""
    from vlm.models import find_decoder_layers

    inputs = _inputs([7])
    handle = find_decoder_layers(model)[0].register_forward_pre_hook(lambda module, args: args[0].mul_(1.0))
    try:
        def run():
            with PruningEngine(model, SCHEDULE, "adaptinfer", compile="reduce-overhead"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model(**inputs)

        graphs = _graphs_against_cuda_graphs(monkeypatch, run)
    finally:
        handle.remove()
    assert any(mutated for _, _, mutated in graphs), graphs


@register_scorer("test_host_read", rows="last", replace=True)
def _host_read(ctx):
    """A scorer with code dynamo cannot trace (an explicit graph break stands for it): no single graph."""
    torch._dynamo.graph_break()
    return ctx.attn.float().mean(dim=(1, 2)).gather(1, ctx.vision_index)


def test_capture_impossible_falls_back_to_eager_with_the_reason(model):
    inputs = _inputs([7])
    with torch.no_grad():
        with PruningEngine(model, SCHEDULE, "test_host_read") as engine:
            eager = model(**inputs).logits
        with PruningEngine(model, SCHEDULE, "test_host_read", compile=True) as engine:
            with pytest.warns(RuntimeWarning, match="cannot be captured"):
                out = model(**inputs).logits
            assert not engine.compiled and engine.compile_fallback
            assert engine.record.vision_per_layer == [N_VISION, 8, 3]  # pruned, eager
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # warned once, not at every call
                model(**inputs)
    torch.testing.assert_close(out, eager)


def test_buckets_and_their_errors():
    assert bucket_length(91, 64) == 128 and bucket_length(128, 64) == 128
    assert bucket_length(91, [100, 640]) == 100
    with pytest.raises(CompileError, match="longer than every compile bucket"):
        bucket_length(700, [100, 640])
    for bad in (0, "64", [64, -1], [], True):
        with pytest.raises(CompileError, match="compile_buckets"):
            check_buckets(bad)
    inputs = make_prompts(N_VISION, [5, 2])
    padded = pad_to_bucket(inputs, 32, PAD_TOKEN_ID)
    assert padded["input_ids"].shape == (2, 32)
    assert torch.equal(padded["input_ids"][:, -inputs["input_ids"].shape[1]:], inputs["input_ids"])
    assert padded["attention_mask"].sum() == inputs["attention_mask"].sum()
    with pytest.raises(ValueError, match="compile mode 'fast' is unknown"):
        PruningEngine(build_random_model(tiny_arch(layers=2), dtype="float32", device="cpu").model, SCHEDULE.__class__
                      .from_dict({"stages": [{"layer": 0, "keep": 4}]}), "fastv", compile="fast")


def test_a_compiled_benchmark_row_says_so_and_its_baseline_is_compiled(tmp_path):
    from pruning.benchmark import BenchmarkError, run_benchmark
    from pruning.results import read_table
    from tests.test_benchmark import bench_cfg

    processor_dir = save_processor(tmp_path / "processor")
    tables = {}
    for name, extra in (("compiled", {"compile": True, "compile_buckets": 32}), ("eager", {}),
                        ("graphs", {"compile": True, "compile_buckets": 32, "compile_mode": "reduce-overhead"})):
        cfg = bench_cfg(processor_dir, tmp_path / name, ["fastv"], [320], limit=2, **extra)
        cfg["model"]["arch"]["text_config"]["num_hidden_layers"] = 2
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # "graphs": no CUDA graphs on a CPU (its own test)
            run_benchmark(cfg)
        tables[name] = read_table(tmp_path / name)
    compiled, eager = tables["compiled"], tables["eager"]
    assert not compiled["note"].fillna("").str.contains("CUDA graphs").any()
    # a mode that replays CUDA graphs, on a device that has none: the rows say their graphs were not replayed
    assert tables["graphs"]["note"].str.contains("no CUDA graphs: the graph runs on cpu, not CUDA").all()
    assert sorted(compiled["method"]) == ["fastv", "unpruned"]
    assert set(compiled["execution"]) == {"compiled"} and set(eager["execution"]) == {"eager"}
    assert compiled["model_settings"].str.contains("execution=compiled").all()
    assert set(compiled["setup_id"]).isdisjoint(eager["setup_id"])  # a compiled row never replaces an eager one
    assert compiled.set_index("method")["accuracy"].to_dict() == eager.set_index("method")["accuracy"].to_dict()
    assert compiled.set_index("method")["vision_per_layer"].to_dict() == \
        eager.set_index("method")["vision_per_layer"].to_dict()
    cfg = bench_cfg(processor_dir, tmp_path / "bad", ["fastv"], [320], limit=2, compile=True, compile_buckets=[])
    with pytest.raises(BenchmarkError, match="compile_buckets"):
        run_benchmark(cfg)
    assert not (tmp_path / "bad").exists()
