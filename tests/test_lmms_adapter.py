"""The lmms-eval adapter: requests in lmms-eval's shape in, pruned generations and log-likelihoods out.

Runs against lmms-eval's own `lmms` base, `Instance` and registry when lmms-eval is importable, otherwise against
a stand-in `Instance` with the same `args` tuples (lmms_eval/api/instance.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
import yaml

from pruning import lmms_adapter
from pruning.lmms_adapter import AdapterError, PrunedLLaVA
from tests.bench_fixtures import CONFIGS, save_processor, tiny_model_cfg

try:
    from lmms_eval.api.instance import Instance as _RealInstance
except Exception:  # lmms-eval is not installed here
    _RealInstance = None


@dataclass
class _FakeInstance:
    """lmms-eval's Instance as the model sees it: request_type, arguments (-> args), idx, metadata."""

    request_type: str
    arguments: tuple
    idx: int
    metadata: dict = field(default_factory=dict)

    @property
    def args(self) -> tuple:
        return self.arguments


def instance(request_type: str, arguments: tuple, idx: int):
    meta = {"task": arguments[4], "doc_id": arguments[3], "repeats": 1}
    cls = _RealInstance or _FakeInstance
    return cls(request_type=request_type, arguments=arguments, idx=idx, metadata=meta)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    from vlm.models import load_from_config

    return load_from_config(tiny_model_cfg(save_processor(tmp_path_factory.mktemp("proc"))))


@pytest.fixture(scope="module")
def docs():
    from vlm.shapes.world import make_scene, render_scene

    out = []
    for seed in range(3):
        scene = make_scene(seed)
        out.append({"image": render_scene(scene), "question": scene.questions[0].text})
    return out


def _adapter(loaded, docs, **kwargs) -> PrunedLLaVA:
    model = PrunedLLaVA(loaded=loaded, **kwargs)
    model.task_dict = {"toy": {"test": docs}}
    return model


def _gen_requests(docs, gen_kwargs):
    return [instance("generate_until", (d["question"], dict(gen_kwargs), lambda doc: [doc["image"]], i, "toy", "test"), i)
            for i, d in enumerate(docs)]


def test_is_an_lmms_eval_model_when_lmms_eval_is_installed():
    if not lmms_adapter.HAVE_LMMS_EVAL:
        pytest.skip("lmms-eval not installed: the adapter runs on its stand-in base (the other tests use a fake Instance)")
    from lmms_eval.api.model import lmms
    from lmms_eval.api.registry import get_model

    assert issubclass(PrunedLLaVA, lmms)
    assert get_model(lmms_adapter.REGISTERED_NAME) is PrunedLLaVA


def test_generate_until_prunes_and_keeps_request_order(loaded, docs):
    model = _adapter(loaded, docs, method="fastv", budget=128, convention="paper", batch_size=2)
    assert model.schedule is not None and model.schedule.stages[0].layer == 0
    seen: list[int] = []
    handle = loaded.decoder_layers[-1].register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1]) if a else None)
    try:
        out = model.generate_until(_gen_requests(docs, {"max_new_tokens": 3, "until": ["\n\n"]}))
    finally:
        handle.remove()
    assert len(out) == 3 and all(isinstance(t, str) for t in out)
    assert max(seen) < loaded.vision_tokens_per_image  # the last layer never saw all 576 vision tokens
    # the same requests one by one give the same answers (batching and grouping keep the order)
    single = _adapter(loaded, docs, method="fastv", budget=128, convention="paper", batch_size=1)
    assert single.generate_until(_gen_requests(docs, {"max_new_tokens": 3})) == out


def test_until_cuts_the_generation(loaded, docs):
    model = _adapter(loaded, docs, method="unpruned")
    full = model.generate_until(_gen_requests(docs[:1], {"max_new_tokens": 4}))[0]
    if len(full) < 2:
        pytest.skip(f"the random model generated {full!r}: nothing to cut")
    # cut inside the generated text (a stop string need not start at a word): what precedes it is kept
    cut = model.generate_until(_gen_requests(docs[:1], {"max_new_tokens": 4, "until": ["@@", full[1:]]}))[0]
    assert cut == full[:1]
    kept = model.generate_until(_gen_requests(docs[:1], {"max_new_tokens": 4, "until": ["@@"]}))[0]
    assert kept == full  # a stop string that never appears cuts nothing


def _manual_logprob(loaded, model: PrunedLLaVA, doc, continuation: str) -> float:
    inputs = model._encode([doc["question"]], [doc["image"]])
    cont = model.tokenizer(continuation, add_special_tokens=False, return_tensors="pt")["input_ids"]
    ids = torch.cat([inputs["input_ids"], cont], 1)
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(cont)], 1)
    with torch.inference_mode():
        logits = loaded.model(input_ids=ids, attention_mask=mask, pixel_values=inputs["pixel_values"]).logits
    n = inputs["input_ids"].shape[1]
    logp = logits[0, n - 1:-1].log_softmax(-1)
    return float(logp.gather(-1, cont[0][:, None]).sum())


def test_loglikelihood_matches_a_manual_forward_unpruned_and_differs_pruned(loaded, docs):
    reqs = [instance("loglikelihood", (d["question"], "red circle", lambda doc: [doc["image"]], i, "toy", "test"), i)
            for i, d in enumerate(docs)]
    plain = _adapter(loaded, docs, method="unpruned")
    got = plain.loglikelihood(reqs)
    for (logprob, greedy), doc in zip(got, docs):
        assert logprob == pytest.approx(_manual_logprob(loaded, plain, doc, "red circle"), abs=1e-4)
        assert isinstance(greedy, bool) and logprob < 0
    pruned = _adapter(loaded, docs, method="adaptinfer", budget=64, convention="paper").loglikelihood(reqs)
    assert all(lp < 0 for lp, _ in pruned)
    assert any(abs(a[0] - b[0]) > 1e-4 for a, b in zip(got, pruned))  # pruning changed the model's view


def test_loglikelihood_greedy_flag_agrees_with_generation(loaded, docs):
    model = _adapter(loaded, docs, method="adaptinfer", budget=64, convention="paper")
    inputs = model._encode([docs[0]["question"]], [docs[0]["image"]])
    with model._engine(True), torch.inference_mode():
        first = int(loaded.model.generate(**inputs, max_new_tokens=1, do_sample=False,
                                          pad_token_id=model.tokenizer.pad_token_id)[0, -1])
    word = model.tokenizer.convert_ids_to_tokens(first)
    if word in model.tokenizer.all_special_tokens or model.tokenizer(word, add_special_tokens=False)["input_ids"] != [first]:
        pytest.skip(f"the random model's greedy token {word!r} is not a plain word")
    other = "yes" if word != "yes" else "no"
    req = lambda cont: instance("loglikelihood", (docs[0]["question"], cont, lambda d: [d["image"]], 0, "toy", "test"), 0)
    (lp_greedy, is_greedy), (lp_other, other_greedy) = model.loglikelihood([req(word), req(other)])
    assert is_greedy and not other_greedy and lp_greedy > lp_other


def test_multi_round_and_bad_options_are_refused(loaded, docs):
    model = _adapter(loaded, docs, method="unpruned")
    with pytest.raises(AdapterError, match="not supported"):
        model.generate_until_multi_round([])
    with pytest.raises(AdapterError, match="unknown model_args"):
        PrunedLLaVA(loaded=loaded, method="unpruned", temperature=0.2)
    with pytest.raises(AdapterError, match="needs a budget"):
        PrunedLLaVA(loaded=loaded, method="adaptinfer", budget=None)
    bad = _adapter(loaded, docs, method="unpruned")
    bad.task_dict = {}
    with pytest.raises(AdapterError, match="task_dict"):
        bad.generate_until(_gen_requests(docs[:1], {}))


def test_builds_from_a_model_preset_path_like_lmms_eval_model_args(tmp_path):
    preset = tiny_model_cfg(save_processor(tmp_path / "proc"))
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(preset))
    # lmms-eval passes model_args as parsed strings/numbers: model=...,method=visionzip,budget=32
    model = PrunedLLaVA(model=str(path), method="visionzip", budget=32)
    assert model.schedule.stages[0].layer == -1 and model.schedule.stages[0].keep == 32
    assert model.scorer == "visionzip"


# -- Qwen2-VL through the same adapter (the family comes from vlm.arch) ----------------------------------------------
QWEN_PRESET = CONFIGS / "model" / "qwen2-vl-tiny.yaml"


@pytest.fixture(scope="module")
def qwen():
    """qwen2-vl-tiny at Qwen2-VL-2B's depth (28 layers, so the authors' presets fit) with the preset's processor
    (every square image -> 16 vision tokens)."""
    from omegaconf import OmegaConf

    from vlm.models import load_from_config

    cfg = OmegaConf.to_container(OmegaConf.load(QWEN_PRESET), resolve=True)
    cfg["device"] = "cpu"
    cfg["arch"]["text_config"].update(num_hidden_layers=28, initializer_range=0.2)
    return load_from_config(cfg)


@pytest.fixture(scope="module")
def qwen_dynamic(qwen):
    """The same model with a dynamic-resolution processor: the vision-token count follows the image size."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from vlm.models import LoadedModel
    from vlm.shapes.processor import build_qwen2_vl_processor

    processor = build_qwen2_vl_processor()
    processor.image_processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=224 * 224)
    return LoadedModel(model=qwen.model, processor=processor, source="random:qwen", name="qwen2-vl-tiny-dynamic")


@pytest.fixture(scope="module")
def sized_docs(docs):
    """Images of 112 x 112, 224 x 112 and 168 x 168 px: 16, 32 and 36 vision tokens under the dynamic processor."""
    return [{**d, "image": d["image"].resize(size)} for d, size in zip(docs, [(112, 112), (224, 112), (168, 168)])]


def _seq_lens(loaded, layers):
    """Pre-hooks recording the sequence length each of `layers` receives, per call. They run before the engine's
    (registered later): a stage at layer l drops its tokens in layer l+1's pre-hook, so layer l+2 shows the drop."""
    seen = {layer: [] for layer in layers}
    handles = [loaded.arch.decoder_layers[layer].register_forward_pre_hook(
        lambda m, a, k, layer=layer: seen[layer].append((a[0] if a else k["hidden_states"]).shape[1]), with_kwargs=True)
        for layer in layers]
    return seen, handles


def test_qwen_generate_until_prunes_a_budget_method_and_batches_like_one_by_one(qwen, docs):
    model = _adapter(qwen, docs, method="fastv", budget=8, convention="processed", batch_size=3)
    assert model.schedule.layers == [1] and model.schedule.stages[0].keep < 16
    seen, handles = _seq_lens(qwen, [0, 3])
    try:
        out = model.generate_until(_gen_requests(docs, {"max_new_tokens": 3}))
    finally:
        for h in handles:
            h.remove()
    assert len(out) == 3 and all(isinstance(t, str) for t in out)
    assert seen[3][0] == seen[0][0] - (16 - model.schedule.stages[0].keep)  # layer 3 lacks the dropped vision tokens
    single = _adapter(qwen, docs, method="fastv", budget=8, convention="processed", batch_size=1)
    assert single.generate_until(_gen_requests(docs, {"max_new_tokens": 3})) == out


def test_qwen_dynamic_resolution_runs_the_authors_preset_on_each_images_own_count(qwen_dynamic, sized_docs):
    model = _adapter(qwen_dynamic, sized_docs, schedule="adaptinfer_qwen2vl2b_10", scorer="adaptinfer", batch_size=3)
    assert model.schedule.rounding == "truncate" and model.schedule.layers == [0, 9, 19]
    seen, handles = _seq_lens(qwen_dynamic, [0, 2, 11])
    try:  # three rows with 16, 32 and 36 vision tokens: the batch runs one row at a time, in request order
        out = model.generate_until(_gen_requests(sized_docs, {"max_new_tokens": 2}))
    finally:
        for h in handles:
            h.remove()
    prefills = [i for i, n in enumerate(seen[0]) if n > 1]  # the three prefills (decode steps see one token)
    assert len(prefills) == 3
    for call, v in zip(prefills, [16, 32, 36]):
        k1 = min(int(0.17 * v), v - 1)  # the authors' rule on this image's own count: 2, 5, 6
        k2 = max(min(int(0.6 * k1), k1 - 1), 1)
        assert seen[2][call] == seen[0][call] - (v - k1)
        assert seen[11][call] == seen[0][call] - (v - k2)
    single = _adapter(qwen_dynamic, sized_docs, schedule="adaptinfer_qwen2vl2b_10", scorer="adaptinfer")
    assert single.generate_until(_gen_requests(sized_docs, {"max_new_tokens": 2})) == out


def test_qwen_dynamic_resolution_refuses_a_method_solved_from_a_budget(qwen_dynamic):
    with pytest.raises(AdapterError, match="follows the image size.*schedule=adaptinfer_qwen2vl2b_10"):
        PrunedLLaVA(loaded=qwen_dynamic, method="fastv", budget=8)
    with pytest.raises(AdapterError, match="schedule='nope'.*known"):
        PrunedLLaVA(loaded=qwen_dynamic, schedule="nope", scorer="adaptinfer")


def test_qwen_loglikelihood_matches_a_manual_forward_unpruned_and_differs_pruned(qwen, docs):
    reqs = [instance("loglikelihood", (d["question"], "red circle", lambda doc: [doc["image"]], i, "toy", "test"), i)
            for i, d in enumerate(docs)]
    plain = _adapter(qwen, docs, method="unpruned")
    got = plain.loglikelihood(reqs)
    for (logprob, _), doc in zip(got, docs):
        inputs = plain._encode([doc["question"]], [doc["image"]])
        cont = plain.tokenizer("red circle", add_special_tokens=False, return_tensors="pt")["input_ids"]
        n = inputs["input_ids"].shape[1]
        full = {**inputs, "input_ids": torch.cat([inputs["input_ids"], cont], 1),
                "attention_mask": torch.cat([inputs["attention_mask"], torch.ones_like(cont)], 1),
                "mm_token_type_ids": torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(cont)], 1)}  # text: 0
        with torch.inference_mode():
            logits = qwen.model(**full).logits
        want = float(logits[0, n - 1:-1].log_softmax(-1).gather(-1, cont[0][:, None]).sum())
        assert logprob == pytest.approx(want, abs=1e-4)
    pruned = _adapter(qwen, docs, schedule="adaptinfer_qwen2vl2b_30", scorer="adaptinfer").loglikelihood(reqs)
    assert any(abs(a[0] - b[0]) > 1e-4 for a, b in zip(got, pruned))


def test_qwen_text_only_request_has_no_vision_tokens(qwen, docs):
    model = _adapter(qwen, docs, schedule="adaptinfer_qwen2vl2b_10", scorer="adaptinfer")
    ids = model._encode(["what is two plus two ?"], [None])["input_ids"][0].tolist()
    special = model.tokenizer.convert_tokens_to_ids(["<|vision_start|>", "<|image_pad|>", "<|vision_end|>"])
    assert not set(ids) & set(special)
    req = instance("generate_until", ("what is two plus two ?", {"max_new_tokens": 2}, lambda d: [], 0, "toy", "test"), 0)
    assert isinstance(model.generate_until([req])[0], str)


# -- LLaVA-NeXT (anyres tiles and newline tokens) through the same adapter ------------------------------------------------
@pytest.fixture(scope="module")
def llava_next():
    """llava-next-tiny (88 vision tokens per shapes image: base tile, tile grid and newline tokens)."""
    from omegaconf import OmegaConf

    from vlm.models import load_from_config

    cfg = OmegaConf.to_container(OmegaConf.load(CONFIGS / "model" / "llava-next-tiny.yaml"), resolve=True)
    cfg["device"] = "cpu"
    return load_from_config(cfg)


def test_llava_next_generate_until_prunes_and_batches_like_one_by_one(llava_next, docs):
    last = llava_next.num_layers - 1
    lengths = {}
    for method in ("unpruned", "fastv"):
        model = _adapter(llava_next, docs, method=method, budget=32, convention="processed", batch_size=3)
        seen, handles = _seq_lens(llava_next, [last])
        try:
            out = model.generate_until(_gen_requests(docs, {"max_new_tokens": 3}))
        finally:
            for handle in handles:
                handle.remove()
        lengths[method] = max(seen[last])  # the prefill's length at the last layer
    assert len(out) == 3 and all(isinstance(t, str) for t in out)
    assert lengths["fastv"] < lengths["unpruned"] - 88 // 2  # more than half of the 88 vision tokens left early
    single = _adapter(llava_next, docs, method="fastv", budget=32, convention="processed", batch_size=1)
    assert single.generate_until(_gen_requests(docs, {"max_new_tokens": 3})) == out
