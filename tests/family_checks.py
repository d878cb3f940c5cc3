"""Checks every model family must pass, shared by tests/test_arch_*.py: a padded batch prunes and predicts what each
row does alone, the compiled prefill equals eager, and generate with the pruned cache equals greedy decoding by
repeated pruned prefills."""
from __future__ import annotations

from pathlib import Path
import torch

from pruning.engine import PruningEngine
from pruning.schedule import Schedule
from pruning.scorers import register_scorer

REPO = Path(__file__).resolve().parents[1]


@register_scorer("test_first_vision", rows="text", replace=True)
def first_vision(ctx):
    """Prefers the earliest vision tokens, whatever the text: the same picks with or without generated tokens."""
    v = ctx.vision_index.shape[1]
    return -torch.arange(v, dtype=torch.float32).expand(ctx.vision_index.shape[0], v)


def assert_padded_batch_equals_rows_alone(model, both: dict, alone: list[dict], schedule: Schedule, scorer: str) -> None:
    """`both`: a left-padded batch; alone[r]: row r by itself. Same next-token logits and kept positions."""
    with PruningEngine(model, schedule, scorer) as engine, torch.no_grad():
        logits = model(**both).logits[:, -1]
        kept_both = [p.clone() for p in engine.record.kept_positions]
        pad = (both["attention_mask"] == 0).sum(1)  # left padding per row
        for row, inputs in enumerate(alone):
            single = model(**inputs).logits[:, -1]
            torch.testing.assert_close(single[0], logits[row], atol=1e-4, rtol=1e-4)
            for stage, kept in enumerate(engine.record.kept_positions):
                assert torch.equal(kept[0] + pad[row], kept_both[stage][row])


def assert_compiled_equals_eager(model, inputs: dict, schedule: Schedule) -> None:
    """The compiled prefill (pruning inside one graph): the same logits and kept tokens as eager."""
    import torch._dynamo

    torch._dynamo.reset()
    try:
        with torch.no_grad():
            with PruningEngine(model, schedule) as engine:
                eager = model(**inputs).logits
                kept = [k.tolist() for k in engine.record.kept_positions]
            with PruningEngine(model, schedule, compile=True) as engine:
                compiled = model(**inputs).logits
                assert engine.compiled and engine.compile_fallback is None
                assert [k.tolist() for k in engine.record.kept_positions] == kept
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)


def assert_generate_uses_the_pruned_cache(loaded, inputs: dict, keep_all: Schedule, pruned: Schedule,
                                          vision_per_layer: list[int]) -> None:
    """Keep-all generate equals unpruned generate; with text-independent picks (test_first_vision) every full forward
    over the tokens so far prunes the same vision tokens, so the cached, pruned generate must equal greedy decoding by
    repeated pruned prefills (no cache), each over the prompt extended by the family (`ModelArch.extend_text`)."""
    model, prompt_len = loaded.model, inputs["input_ids"].shape[1]
    gen = dict(max_new_tokens=4, do_sample=False)
    with torch.no_grad():
        plain = model.generate(**inputs, **gen)
        with PruningEngine(model, keep_all):
            assert torch.equal(model.generate(**inputs, **gen), plain)
        with PruningEngine(model, pruned, "test_first_vision") as engine:
            out = model.generate(**inputs, **gen)
            assert engine.record.vision_per_layer == vision_per_layer
            ids = inputs["input_ids"]
            for _ in range(gen["max_new_tokens"]):
                step = model(**loaded.arch.extend_text(inputs, ids[:, prompt_len:]), use_cache=False)
                ids = torch.cat([ids, step.logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, ids)


def assert_collector_records_are_the_adaptinfer_scores(loaded, inputs: dict, n_vision: int, k: int) -> None:
    """The collector's adaptinfer records of layer 1 rank the vision tokens as the engine's adaptinfer stage there."""
    from analysis.collector import AttentionCollector
    from vlm.layout import TokenLayout

    with AttentionCollector(loaded, reducer="adaptinfer") as collector, torch.no_grad():
        loaded.model(**inputs)
        records = collector.consume()
    t2v = records.t2v  # [B, L, V]
    assert tuple(t2v.shape) == (inputs["input_ids"].shape[0], loaded.num_layers, n_vision)
    assert torch.isfinite(t2v).all()
    schedule = Schedule.from_dict({"stages": [{"layer": 1, "keep": k}]})
    with PruningEngine(loaded.model, schedule, "adaptinfer") as engine, torch.no_grad():
        loaded.model(**inputs)
    picks = t2v[:, 1].topk(k, dim=-1).indices.sort(-1).values
    layout = TokenLayout.from_batch(inputs["input_ids"], inputs["attention_mask"], loaded.image_token_id)
    assert torch.equal(layout.vision_index.gather(1, picks), engine.record.kept_positions[0])


def run_module(module: str, args: list[str]) -> "subprocess.CompletedProcess":
    """`python -m module args` from the repository root (its code first on the path); fails the test on a non-zero
    exit with the end of stderr."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc
