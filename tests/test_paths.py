"""One resolver for frod's directories (frod_cli/paths.py): FROD_CACHE moves the offline assets and the FRoD basis
cache together; FROD_BASIS_CACHE (or the older FROD_CACHE_DIR) moves the basis cache alone; FROD_OUTPUT moves the
default run directories."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from frod_cli import paths

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def frod_cache(tmp_path, monkeypatch):
    for name in (paths.BASIS_CACHE, paths.LEGACY_BASIS_CACHE):  # conftest points the basis cache at a temp dir
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(paths.CACHE, str(tmp_path / "frod-home"))
    return tmp_path / "frod-home"


def script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_frod_cache_moves_assets_and_the_basis_cache_together(frod_cache):
    from frod_cli import models
    from frod_cli.methods import build_method, method_config
    from tiny_models import bert

    # what `make assets` writes, and where frod then reads it
    assert script("prepare_smollm2").default_out() == frod_cache / "smollm2-135m"
    assert script("pretrain_vit").default_out() == frod_cache / "vit-fmnist"
    with pytest.raises(ValueError, match=str(frod_cache / "smollm2-135m")):
        models.OFFLINE_MODELS["smollm2-135m"]()
    (frod_cache / "vit-fmnist").mkdir(parents=True)
    (frod_cache / "vit-fmnist" / "config.json").write_text("{}")
    assert models.OFFLINE_MODELS["vit-fmnist"]() == str(frod_cache / "vit-fmnist")
    # the basis cache of a FRoD adaptation lands under the same root
    method = build_method(method_config("frod", target_modules=["query", "value"]))
    method.adapt(bert()[0])
    assert method.basis["cache_dir"] == str(frod_cache / "basis")
    assert any((frod_cache / "basis").iterdir())


def test_the_basis_cache_alone_and_the_default(tmp_path, monkeypatch):
    monkeypatch.delenv(paths.CACHE, raising=False)
    monkeypatch.delenv(paths.BASIS_CACHE, raising=False)
    monkeypatch.setenv(paths.LEGACY_BASIS_CACHE, str(tmp_path / "old-name"))
    assert paths.basis_cache_dir() == str(tmp_path / "old-name")
    monkeypatch.setenv(paths.BASIS_CACHE, str(tmp_path / "new-name"))  # the current name wins
    assert paths.basis_cache_dir() == str(tmp_path / "new-name")
    monkeypatch.delenv(paths.BASIS_CACHE)
    monkeypatch.delenv(paths.LEGACY_BASIS_CACHE)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert paths.basis_cache_dir() == str(tmp_path / "xdg" / "frod" / "basis")


def test_frod_output_moves_the_default_run_directories(tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    monkeypatch.delenv(paths.OUTPUT, raising=False)
    assert (paths.output_dir("runs"), paths.output_dir("multirun")) == ("runs", "multirun")
    monkeypatch.setenv(paths.OUTPUT, str(tmp_path))
    paths.register_resolver()
    node = OmegaConf.create({"run": "${frod_dir:runs}/r", "sweep": "${frod_dir:multirun}/r"})
    assert (node.run, node.sweep) == (f"{tmp_path}/runs/r", f"{tmp_path}/multirun/r")
    recipe = (ROOT / "recipes" / "config.yaml").read_text()
    assert "dir: ${frod_dir:runs}/" in recipe and "dir: ${frod_dir:multirun}/" in recipe
