"""The demo model's training script: progress is shown, and a run interrupted mid-way resumes from its
checkpoints to the same weights as a run that was never stopped."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vlm.shapes import train
from vlm.shapes.model_config import build_demo_model

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
