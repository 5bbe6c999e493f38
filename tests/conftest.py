"""Shared fixtures. The `debug` config group (recipes/debug/: a tiny model, tiny data, a few steps) is
composed once per session, as lightning-hydra-template does; tests copy it and add what they vary."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):  # make test runs a worker per core: one thread each, no oversubscription
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

DEBUG = ["debug=default"]  # the command-line form, for tests that go through `frod train`

# `make test` spreads the suite over two workers a scope at a time (pytest-xdist's loadscope: a module, or a class of
# test_readme). The longest scopes go first, so that the last ones to start are short and both workers end together
# (xdist's own order puts the scopes with the most tests first, which left a one-test, one-minute scope to the end
# while the other worker idled). Seconds of each scope as `pytest --durations=0` measured them on a 2-core machine;
# a scope not listed runs after these, in collection order.
LONGEST_SCOPES = {
    "tests/test_reliability.py": 121, "tests/test_fsdp.py": 103, "tests/test_readme.py::TestSweep": 75,
    "tests/test_preference.py": 71, "tests/test_readme.py::TestLm": 67, "tests/test_compare.py": 66,
    "tests/test_bad_input.py": 61, "tests/test_paper_recipes.py": 46, "tests/test_readme.py::TestLaunch": 43,
    "tests/test_export.py": 27, "tests/test_basis_cache.py": 26, "tests/test_readme.py::TestClassify": 26,
    "tests/test_quantized.py": 23, "tests/test_grpo.py": 22, "tests/test_train.py": 19, "tests/test_frod_core.py": 18,
    "tests/test_cli.py": 18, "tests/test_streaming.py": 17, "tests/test_harness.py": 11, "tests/test_sft.py": 11,
    "tests/test_share.py": 10, "tests/test_layouts.py": 9,
}


def scope_of(nodeid: str) -> str:
    """The unit pytest-xdist's loadscope gives a worker: the module, or module::Class."""
    parts = nodeid.split("::")
    return "::".join(parts[:2]) if len(parts) > 2 else parts[0]


def pytest_collection_modifyitems(config, items):
    order = {scope: -seconds for scope, seconds in LONGEST_SCOPES.items()}
    items.sort(key=lambda item: order.get(scope_of(item.nodeid), 0))  # stable: tests keep their order in a scope


def compose_train(overrides):
    """The composed `frod train` config for `overrides` (Hydra's compose API, no run directory)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from frod_cli.cli import recipes_dir
    from frod_cli.schemas import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=recipes_dir(), version_base="1.3"):
            return compose(config_name="config", overrides=list(overrides))
    finally:
        GlobalHydra.instance().clear()


@pytest.fixture(scope="session", autouse=True)
def basis_cache_session(tmp_path_factory):
    """The FRoD basis cache (method.basis_cache, on by default) never writes the user's ~/.cache from
    a test: session fixtures that train use this directory (subprocesses inherit it)..."""
    before = os.environ.get("FROD_BASIS_CACHE")
    os.environ["FROD_BASIS_CACHE"] = str(tmp_path_factory.mktemp("frod-basis-cache-session"))
    yield
    if before is None:
        os.environ.pop("FROD_BASIS_CACHE", None)
    else:
        os.environ["FROD_BASIS_CACHE"] = before


@pytest.fixture(autouse=True)
def basis_cache(tmp_path_factory, monkeypatch):
    """...and every test starts with an empty cache of its own (no test depends on another's entries);
    the directory, for tests that look into it."""
    path = tmp_path_factory.mktemp("frod-basis-cache")
    monkeypatch.setenv("FROD_BASIS_CACHE", str(path))
    return path


def digest(d, skip=()) -> dict:
    """Every file under the directory d (train.log and .hydra/ included, unless named in skip) -> its sha256."""
    import hashlib

    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file() and p.name not in skip}


def one_error_line(capsys) -> str:
    """The refusal a command printed: exactly one line on stderr, no traceback."""
    err = [l for l in capsys.readouterr().err.strip().splitlines() if l.strip()]
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    return err[0]


def train_run(tmp_path_factory, name: str, args) -> tuple:
    """A finished `frod train <args>` run in a fresh temp directory (for module fixtures): (run dir, objective)."""
    from frod_cli.cli import run_verb

    run = tmp_path_factory.mktemp(name) / "run"
    code, value = run_verb("train", [*args, f"hydra.run.dir={run}"])
    assert code == 0, f"frod train {' '.join(map(str, args))} exited {code}"
    return run, value


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


@pytest.fixture(scope="module", autouse=True)
def frozen_heap():
    """Each module runs with what was alive at its start (the libraries, session fixtures) out of the garbage
    collector's scans: the collections that runs make (Accelerate's at every run's end, Python's own) then scan only
    what the module makes. Collected first, so no garbage is kept; unfrozen at the module's end."""
    from frod_cli.memory import frozen_heap as frozen

    with frozen():
        yield
