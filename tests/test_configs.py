"""Every Hydra config file composes: each top-level config, and each option of each group under it."""
from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TOP_LEVEL = sorted(p.stem for p in CONFIGS.glob("*.yaml"))
GROUP_FILES = sorted(p for p in CONFIGS.glob("*/*.yaml") if p.parent.name not in ("experiment", "launcher"))


def test_there_are_configs():
    assert TOP_LEVEL, "configs/ has no top-level config"
    assert {"model", "schedule"} <= {p.parent.name for p in GROUP_FILES}


@pytest.mark.parametrize("name", TOP_LEVEL)
def test_top_level_config_composes(name):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name=name)
    assert OmegaConf.to_container(cfg, resolve=False) is not None


@pytest.mark.parametrize("path", GROUP_FILES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_group_option_composes_and_resolves(path):
    """Each group file loads; under a top-level config that uses the group, it composes as an override."""
    group, option = path.parent.name, path.stem
    data = OmegaConf.load(path)
    OmegaConf.to_container(data, resolve=False)
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        for top in TOP_LEVEL:
            base = compose(config_name=top)
            if group in base:
                cfg = compose(config_name=top, overrides=[f"{group}={option}"])
                assert cfg[group] is not None
                break


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("experiment/*.yaml")), ids=lambda p: p.stem)
def test_experiment_composes(path):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name="benchmark", overrides=[f"+experiment={path.stem}"])
    assert cfg is not None
