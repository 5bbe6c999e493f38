"""Shared fixtures. The `debug` config group (recipes/debug/: a tiny model, tiny data, a few steps) is
composed once per session, as lightning-hydra-template does; tests copy it and add what they vary."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import pytest  # noqa: E402

DEBUG = ["debug=default"]  # the command-line form, for tests that go through `frod train`


def compose_train(overrides):
    """The composed `frod train` config for `overrides` (Hydra's compose API, no run directory)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from frod_cli.cli import recipes_dir
    from frod_cli.config import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=recipes_dir(), version_base="1.3"):
            return compose(config_name="config", overrides=list(overrides))
    finally:
        GlobalHydra.instance().clear()


@pytest.fixture(scope="session")
def cfg_debug_global():
    return compose_train(DEBUG)


@pytest.fixture
def cfg_debug(cfg_debug_global, tmp_path):
    """A fresh copy of the debug config whose output directory is this test's tmp_path."""
    from omegaconf import open_dict

    cfg = cfg_debug_global.copy()
    with open_dict(cfg):
        cfg.output_dir = str(tmp_path / "run")
    return cfg


@pytest.fixture
def debug_args():
    return list(DEBUG)
