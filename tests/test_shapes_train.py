"""The demo model's training script: progress is shown, and a run interrupted mid-way resumes from its
checkpoints to the same weights as a run that was never stopped."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from vlm.shapes import train
from vlm.shapes.model_config import build_demo_model
from vlm.shapes.processor import build_processor
from vlm.shapes.world import FAMILIES, IMAGE_SIZE, WorldOptions, make_scene

# a few steps of both stages, a checkpoint after every step, a tiny final evaluation
COMMON = ["--threads", "1", "--stage1-steps", "2", "--stage1-batch", "2", "--stage2-steps", "4",
          "--stage2-minutes", "1000000", "--stage2-batch", "1", "--eval-every", "1000", "--eval-scenes", "8",
          "--save-every", "1", "--log-every", "1"]


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "final" / "model.safetensors"))


def test_interrupted_training_resumes_to_the_same_weights(tmp_path, monkeypatch, capsys):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train.main(["--out", str(straight)] + COMMON)

    calls = {"n": 0}
    pack = train.Packer.pack

    def interrupted_pack(self, scenes, with_eos=True):
        calls["n"] += 1
        if calls["n"] == 3:  # the third stage-2 step: steps 0 and 1 are done and checkpointed
            raise KeyboardInterrupt
        return pack(self, scenes, with_eos)

    monkeypatch.setattr(train.Packer, "pack", interrupted_pack)
    with pytest.raises(KeyboardInterrupt):
        train.main(["--out", str(resumed)] + COMMON)
    assert not (resumed / "final").exists()
    monkeypatch.setattr(train.Packer, "pack", pack)
    capsys.readouterr()
    train.main(["--out", str(resumed)] + COMMON)
    log = capsys.readouterr().out

    assert "[stage1] resumed at step 2" in log
    assert "[stage2] resumed at step 2" in log
    assert "[stage2] step 4 " in log  # progress lines (loss, accuracy, time) are printed
    assert "[stage2] done at step 4" in log

    a, b = _weights(straight), _weights(resumed)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-6, rtol=1e-5, msg=name)
    # and training did change the language model (the comparison above is not between two fresh models)
    fresh = build_demo_model(0).state_dict()
    name = next(n for n in a if "language_model" in n and n.endswith("q_proj.weight"))
    key = next(k for k in fresh if k.endswith(name.split("language_model.", 1)[1]) and "language_model" in k)
    assert not torch.allclose(a[name], fresh[key])
    # the finished run saved a loadable save_pretrained directory with its processor
    assert {"config.json", "model.safetensors"} <= {p.name for p in (resumed / "final").iterdir()}


FINETUNE = ["--threads", "1", "--stage2-steps", "3", "--stage2-minutes", "1000000", "--stage2-batch", "1",
            "--eval-every", "1000", "--eval-scenes", "8", "--save-every", "1", "--log-every", "1",
            "--stage2-position-weight", "0.5", "--stage2-locate-weight", "1.0", "--stage2-curriculum", "relations"]


def test_fine_tuning_from_a_trained_model_resumes_with_its_read_out_heads(tmp_path, monkeypatch, capsys):
    base = tmp_path / "base"
    train.main(["--out", str(base)] + COMMON)
    capsys.readouterr()
    init = ["--init-model", str(base / "final")]
    with pytest.raises(SystemExit, match="stage-1 heads"):  # a tuned tower keeps its labels only with its heads
        train.main(["--out", str(tmp_path / "no_heads"), "--stage2-tower-lr-scale", "0.1", "--stage2-patch-weight",
                    "0.5"] + init + FINETUNE)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train.main(["--out", str(straight)] + init + FINETUNE)
    log = capsys.readouterr().out
    assert "[stage1]" not in log  # fine-tuning starts from the given model, not from a new tower
    assert "pos-mse" in log and "locate-mse" in log

    calls = {"n": 0}
    pack = train.Packer.pack

    def interrupted_pack(self, scenes, with_eos=True):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return pack(self, scenes, with_eos)

    monkeypatch.setattr(train.Packer, "pack", interrupted_pack)
    with pytest.raises(KeyboardInterrupt):
        train.main(["--out", str(resumed)] + init + FINETUNE)
    monkeypatch.setattr(train.Packer, "pack", pack)
    train.main(["--out", str(resumed)] + init + FINETUNE)
    assert "[stage2] resumed at step 2" in capsys.readouterr().out
    saved = torch.load(resumed / "stage2.pt", map_location="cpu")
    assert saved["position"]["xy.weight"].abs().sum() > 0  # the heads trained and were checkpointed
    torch.testing.assert_close(saved["locate"]["xy.weight"],
                               torch.load(straight / "stage2.pt", map_location="cpu")["locate"]["xy.weight"])

    a, b, start = _weights(straight), _weights(resumed), _weights(base)
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-6, rtol=1e-5, msg=name)
    name = next(n for n in a if n.endswith("multi_modal_projector.linear_2.weight"))
    assert not torch.allclose(a[name], start[name])  # the projector was tuned from the given model's weights
    tower = next(n for n in a if "vision_tower" in n and n.endswith("q_proj.weight"))
    torch.testing.assert_close(a[tower], start[tower])  # and the tower kept them (frozen)


def test_init_model_must_be_a_saved_model(tmp_path):
    with pytest.raises(SystemExit, match="config.json"):
        train.main(["--out", str(tmp_path / "o"), "--init-model", str(tmp_path)] + FINETUNE)


def test_position_head_measures_linear_position_in_the_embeddings():
    torch.manual_seed(0)
    head = train.PositionHead(32)
    content = torch.randn(4, 576, 32, requires_grad=True)
    head.loss(content).backward()
    # a fresh head already pulls on the features (a zero-initialised one would not, and where the features hold
    # no position it would then never find a direction to learn)
    assert content.grad.abs().sum() > 0
    content = content.detach()
    start = float((head.target ** 2).mean())  # the error of always predicting the mean position

    def fit(embeds: torch.Tensor) -> float:
        h = train.PositionHead(32)
        opt = torch.optim.Adam(h.parameters(), lr=0.05)
        for _ in range(200):
            opt.zero_grad()
            loss = h.loss(embeds)
            loss.backward()
            opt.step()
        return loss.item()

    with_position = content.clone()
    with_position[..., :2] = head.target * 3  # x and y written along two directions
    assert fit(with_position) < 0.1 * start
    assert fit(content) > 0.8 * start  # random content holds no position to read


def test_relation_curriculum_mixes_the_full_world_with_position_scenes():
    rng = np.random.default_rng(0)
    for progress in (0.0, 0.4, 0.99):
        opts = [train.relation_curriculum(progress, rng).check() for _ in range(200)]
        aux = [o for o in opts if o.families == ("position", "relative")]
        assert 60 < len(aux) < 140
        assert all(o.families == FAMILIES for o in opts if o not in aux)
        assert max(o.max_objects for o in aux) == (3 if progress < 0.3 else 6)
    with pytest.raises(ValueError, match="unknown curriculum"):
        train.run_stage2(build_demo_model(0), None, Path("."), 1, 1.0, 1, 0, 1e-3, 10, schedule="nope")


def test_position_loss_counts_only_the_given_patches():
    torch.manual_seed(0)
    head = train.PositionHead(16)
    torch.nn.init.normal_(head.xy.weight)
    embeds = torch.randn(2, 576, 16)
    on = torch.zeros(2, 576, dtype=torch.bool)
    on[0, :30], on[1, 100:110] = True, True
    changed = embeds.clone()
    changed[~on] = head.xy.weight[0].detach()  # off the mask: far from any position; it must not count
    assert head.loss(changed, on).item() == pytest.approx(head.loss(embeds, on).item(), rel=1e-6)
    assert head.loss(changed).item() != pytest.approx(head.loss(embeds).item(), rel=1e-2)


def test_packed_batches_carry_the_named_objects_centres():
    opts = WorldOptions(families=("relative", "count", "color"), questions_per_family=2)
    scene = next(s for s in (make_scene(seed, opts) for seed in range(50))
                 if {"relative", "count", "color"} <= {q.family for q in s.questions})
    batch = train.Packer(build_processor()).pack([scene])
    answers = [k for k in range(len(batch.families)) if batch.is_answer[k]]
    assert len(answers) == len(scene.questions)
    assert torch.isnan(batch.named_xy[~batch.is_answer]).all()  # the closing </s> reads nothing
    for k, q in zip(answers, scene.questions):
        xy = batch.named_xy[k]
        if q.family == "count":
            assert torch.isnan(xy).all()
            continue
        for n in range(4):
            if n // 2 < len(q.objects):
                o = scene.objects[q.objects[n // 2]]
                assert xy[n].item() == pytest.approx((o.cx if n % 2 == 0 else o.cy) / IMAGE_SIZE * 2 - 1)
            else:
                assert torch.isnan(xy[n])
    rel = next(k for k, q in zip(answers, scene.questions) if q.family == "relative")
    q = scene.questions[answers.index(rel)]
    a, b = (scene.objects[i] for i in q.objects)
    side = {"left": a.cx < b.cx, "right": a.cx > b.cx, "above": a.cy < b.cy, "below": a.cy > b.cy}
    assert side[q.answer]  # the first centre is the object asked about, the second the reference


def test_locate_loss_counts_only_known_coordinates_and_can_be_learned():
    torch.manual_seed(0)
    hidden = torch.randn(64, 16)
    target = torch.full((64, 4), float("nan"))
    target[:, :2] = hidden[:, :2] / 3  # x, y of a first object, written in the hidden states
    target[:32, 2:] = hidden[:32, 2:4] / 3  # a second object for half of them
    head = train.LocateHead(16)
    base = head.loss(hidden, target).item()
    other = target.clone()
    other[32:, 2:] = 5.0  # had these been known, the loss would differ
    assert head.loss(hidden, target).item() == pytest.approx(base)
    assert head.loss(hidden, other).item() != pytest.approx(base)
    assert head.loss(hidden, torch.full((64, 4), float("nan"))).item() == 0.0
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    for _ in range(300):
        opt.zero_grad()
        loss = head.loss(hidden, target)
        loss.backward()
        opt.step()
    assert loss.item() < 0.1 * base


def test_batches_made_by_worker_processes_equal_those_made_in_process():
    """A GPU run makes its batches in worker processes (mask left to the device); they must be the same batches."""
    packer = train.Packer(build_processor())
    source = train.Prefetcher(train.stage2_worker_batch, workers=2, depth=3)
    try:
        for step in (0, 1, 2, 5):  # in order, then a jump (a resumed run asks for a later step first)
            args = (0, step, 0.5, 2, "shipped", True)
            got, got_targets = source.get(step, lambda s: (0, s, 0.5, 2, "shipped", True))
            ref, ref_targets = train.stage2_batch(packer, *args)
            assert got.attention_mask is None and got.pixel_values.dtype == torch.uint8  # compact form to send
            got = got.to("cpu")
            for f in ("input_ids", "position_ids", "attention_mask", "pixel_values", "target_ids", "named_mask",
                      "segments"):
                torch.testing.assert_close(getattr(got, f), getattr(ref, f), rtol=0, atol=0, msg=f)
            torch.testing.assert_close(got.named_xy, ref.named_xy, equal_nan=True)
            for k in ref_targets:
                assert torch.equal(got_targets[k], ref_targets[k])
    finally:
        source.close()


def test_packed_mask_lets_each_question_see_the_image_and_itself_only():
    many = next(s for s in (make_scene(seed, WorldOptions(questions_per_family=1)) for seed in range(50))
                if len(s.questions) >= 3)
    one = next(s for s in (make_scene(seed, WorldOptions(families=("shape",), questions_per_family=1))
                           for seed in range(50)) if len(s.questions) == 1)
    scenes = [many, one]
    batch = train.Packer(build_processor()).pack(scenes)
    allowed = batch.attention_mask[:, 0] == 0  # [B, T, T]
    seg = batch.segments
    for b in range(2):
        q1 = (seg[b] == 1).nonzero()[:, 0]
        q2 = (seg[b] == 2).nonzero()[:, 0]
        img = (seg[b] == 0).nonzero()[:, 0]
        assert allowed[b][q1[-1]][img].all() and allowed[b][q1[-1]][q1].all()
        if len(q2):
            assert not allowed[b][q2[-1]][q1].any()  # the second question never sees the first (or its answer)
        pad = (seg[b] == -1).nonzero()[:, 0]
        if len(pad):
            assert not allowed[b][:, pad].any(dim=1)[seg[b] >= 0].any()  # nobody reads padding
    assert (seg[1] == -1).any()  # the one-question row is padded to the longer one


def test_training_with_worker_processes_reaches_the_same_weights(tmp_path):
    train.main(["--out", str(tmp_path / "inline")] + COMMON)
    train.main(["--out", str(tmp_path / "workers"), "--workers", "1"] + COMMON)
    a, b = _weights(tmp_path / "inline"), _weights(tmp_path / "workers")
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-6, rtol=1e-5, msg=name)
    with pytest.raises(SystemExit, match="--device"):
        train.main(["--out", str(tmp_path / "x"), "--device", "tpu"] + COMMON)


def test_grounding_loss_is_the_attention_share_on_the_named_patches():
    torch.manual_seed(0)
    model = build_demo_model(0)
    model.model.language_model.config._attn_implementation = "eager"
    scene = make_scene(7, WorldOptions(families=("color", "count"), questions_per_family=2))
    batch = train.Packer(build_processor()).pack([scene])
    _, ground, _ = train.packed_forward(model, batch, attn_layers=(2,))
    out = model.model(input_ids=batch.input_ids, pixel_values=batch.pixel_values, attention_mask=batch.attention_mask,
                      position_ids=batch.position_ids, output_attentions=True)
    terms = []
    for n in range(len(batch.families)):
        if batch.named_mask[n].any():
            row = out.attentions[2][0, :, batch.target_cols[n]].mean(0)[batch.image_start:batch.image_start + 576]
            terms.append(-torch.log(row[batch.named_mask[n]].sum() / row.sum()))
    assert len(terms) == len(scene.questions)  # every answer names objects; the closing </s> tokens do not count
    assert ground.item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-5)
