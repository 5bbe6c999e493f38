"""Bad input: each case is refused with one line on stderr, a non-zero exit, no traceback, and nothing
already written is changed (docs/RELIABILITY.md lists the cases and their messages)."""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from frod_cli.cli import main, run_verb

from test_reliability import tiny, write_csv  # noqa: E402  (tests/ is on sys.path under pytest)


def one_error_line(capsys) -> str:
    err = [l for l in capsys.readouterr().err.strip().splitlines() if l.strip()]
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    return err[0]


def digest(d: Path) -> dict:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file() and p.name != "train.log"}


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    return {
        "good": write_csv(d / "good.csv"),
        "columns": write_csv(d / "columns.csv", header=("sentence", "target")),
        "labels": write_csv(d / "labels.csv", labels=("neg", "pos", "meh")),
        "empty": write_csv(d / "empty.csv", n=0),
        "txt": _write(d / "data.txt", "good day\tpos\n"),
        "dir": d,
    }


# (id, extra overrides, expected text in the one error line)
CONFIG_CASES = [
    ("unknown_recipe", ["recipe=nope"], "recipe/nope"),
    ("unknown_model", ["model=nope"], "model/nope"),
    ("unknown_task", ["task=nope"], "task/nope"),
    ("unknown_method", ["method=nope"], "method/nope"),
    ("misspelt_key", ["train.bach_size=3"], "batch_size"),
    ("wrong_type", ["train.batch_size=abc"], "train.batch_size"),
    ("non_numeric_lr", ["optimizer.lr=fast"], "optimizer.lr"),
    ("negative_lr", ["optimizer.lr=-1"], "optimizer.lr must be a positive number"),
    ("non_numeric_group_lr", ["optimizer.group_lr.sparse=fast"], "group_lr"),
    ("sparse_rate_above_1", ["method.sparse_rate=1.5"], "sparse_rate must lie in (0, 1)"),
    ("sparse_rate_zero", ["method.sparse_rate=0"], "sparse_rate must lie in (0, 1)"),
    ("unknown_scheduler", ["optimizer.scheduler=nope"], "optimizer.scheduler"),
    ("bad_mixed_precision", ["train.mixed_precision=fp8"], "mixed_precision"),
    ("zero_batch_size", ["train.batch_size=0"], "train.batch_size must be a positive integer"),
    ("zero_grad_accum", ["train.grad_accum=0"], "train.grad_accum must be a positive integer"),
    ("unknown_task_type", ["task.type=nope"], "unknown task type 'nope'"),
    ("unknown_method_name", ["method.name=nope"], "unknown method 'nope'"),
    ("target_modules_match_nothing", ["method.target_modules=[nope]"], "no linear layer matches"),
    ("missing_model_dir", ["model.name_or_path=/nonexistent/model"], "model directory not found"),
    ("unknown_config_override", ["+model.config_overrides.no_such_key=1"], "no_such_key"),
    ("unknown_tiny_family", ["model.name_or_path=tiny:nope"], "unknown tiny model"),
    ("negative_max_steps", ["train.max_steps=-5"], "train.max_steps must be a positive number of steps, or -1"),
    ("zero_max_steps", ["train.max_steps=0"], "train.max_steps must be a positive number of steps, or -1"),
    ("zero_max_length", ["task.max_length=0"], "task.max_length must be at least 1 token"),
    ("key_of_another_method", ["method=lora", "method.sparse_rate=0.5"], "method dora/lora/pissa has no key 'sparse_rate'"),
    ("unknown_tracker", ["train.log_with=[nope]"], "unknown tracker 'nope'"),
    ("target_modules_not_strings", ["method.target_modules=[1,2]"], "method.target_modules must be"),
]


@pytest.mark.parametrize("case,extra,expected", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_bad_config(case, extra, expected, files, tmp_path, capsys):
    assert main(["train", *tiny(files["good"]), *extra, f"hydra.run.dir={tmp_path / 'run'}"]) == 2
    line = one_error_line(capsys)
    assert expected in line, line
    assert not (tmp_path / "run" / "metrics.json").exists()


DATA_CASES = [
    ("missing_local_file", lambda f: ["task.data_files.train=/nonexistent/train.csv"], "not found"),
    ("dataset_without_columns", lambda f: [f"task.data_files.train={f['columns']}"], "has no column 'text'"),
    ("label_outside_class_list", lambda f: [f"task.data_files.train={f['labels']}", "task.labels=[neg,pos]"],
     "not one of task.labels"),
    ("empty_dataset", lambda f: [f"task.data_files.train={f['empty']}"], "empty"),
    ("unknown_file_format", lambda f: [f"task.data_files.train={f['txt']}"], "cannot tell the format"),
]


@pytest.mark.parametrize("case,extra,expected", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_bad_data(case, extra, expected, files, tmp_path, capsys):
    assert main(["train", *tiny(files["good"]), *extra(files), f"hydra.run.dir={tmp_path / 'run'}"]) == 2
    line = one_error_line(capsys)
    assert expected in line, line


# ---------------------------------------------------------------------------------------------------
# Against an existing run: refused, and the run is left as it was
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished(files, tmp_path_factory):
    run = tmp_path_factory.mktemp("finished") / "run"
    code, _ = run_verb("train", [*tiny(files["good"]), "train.max_steps=2", "train.eval_every=2",
                                 "train.keep_checkpoints=true", f"hydra.run.dir={run}"])
    assert code == 0
    return run


@pytest.fixture
def run_copy(finished, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(finished, run)
    return run


def _eval_adapter(run: Path, tmp_path: Path, *extra: str) -> int:
    return main(["eval", f"path={run}", "use_adapter=true", f"output={tmp_path / 'eval.json'}", *extra])


def test_adapter_for_another_base_model(run_copy, tmp_path, capsys):
    before = digest(run_copy)
    # seed=7 builds the tiny base model with another initialization: not the adapter's base model
    assert _eval_adapter(run_copy, tmp_path, "seed=7") == 2
    assert "different base model" in one_error_line(capsys)
    assert digest(run_copy) == before and not (tmp_path / "eval.json").exists()


def test_truncated_adapter_file(run_copy, tmp_path, capsys):
    f = run_copy / "adapter" / "adapter.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    before = digest(run_copy)
    assert _eval_adapter(run_copy, tmp_path) == 2
    assert "truncated or corrupt" in one_error_line(capsys)
    assert digest(run_copy) == before


def test_corrupt_adapter_config(run_copy, tmp_path, capsys):
    (run_copy / "adapter" / "adapter_config.json").write_text('{"format": ')
    assert _eval_adapter(run_copy, tmp_path) == 2
    assert "not valid JSON" in one_error_line(capsys)


def test_corrupt_adapter_weights(run_copy, tmp_path, capsys):
    (run_copy / "adapter" / "adapter.safetensors").write_bytes(b"\x00" * 64)
    assert _eval_adapter(run_copy, tmp_path) == 2
    assert "truncated or corrupt" in one_error_line(capsys)


def _incomplete(run: Path) -> Path:
    (run / "metrics.json").unlink()
    return run


def test_resume_a_run_of_another_recipe(run_copy, files, tmp_path, capsys):
    run = _incomplete(run_copy)
    before = digest(run)
    assert main(["train", *tiny(files["good"]), "train.max_steps=2", "train.eval_every=2", "recipe_name=other",
                 "method.sparse_rate=0.05", f"resume={run}"]) == 2
    line = one_error_line(capsys)
    assert "another recipe" in line and "sparse_rate" in line
    assert digest(run) == before


def test_resume_with_another_method(run_copy, files, tmp_path, capsys):
    run = _incomplete(run_copy)
    before = digest(run)
    assert main(["train", *tiny(files["good"]), "train.max_steps=2", "train.eval_every=2", "method=lora",
                 f"resume={run}"]) == 2
    assert "method.name" in one_error_line(capsys)
    assert digest(run) == before


def test_incomplete_run_of_another_config_in_the_output_dir(run_copy, files, capsys):
    run = _incomplete(run_copy)
    before = digest(run)
    assert main(["train", *tiny(files["good"]), "train.max_steps=3", "train.eval_every=2", f"hydra.run.dir={run}"]) == 2
    line = one_error_line(capsys)
    assert "cannot resume" in line and "train.max_steps" in line
    assert digest(run) == before


def test_resume_a_missing_directory(files, tmp_path, capsys):
    assert main(["train", *tiny(files["good"]), f"resume={tmp_path / 'nope'}"]) == 2
    assert "no such run directory" in one_error_line(capsys)


def test_resume_a_directory_without_checkpoint(files, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["train", *tiny(files["good"]), f"resume={tmp_path / 'empty'}"]) == 2
    assert "has no checkpoint" in one_error_line(capsys)


def test_resume_a_finished_run(run_copy, files, capsys):
    before = digest(run_copy)
    assert main(["train", *tiny(files["good"]), "train.max_steps=2", "train.eval_every=2", f"resume={run_copy}"]) == 2
    assert "finished run" in one_error_line(capsys)
    assert digest(run_copy) == before


def test_merge_with_corrupt_adapter_leaves_merged(run_copy, tmp_path, capsys):
    (run_copy / "merged").mkdir()
    (run_copy / "merged" / "keep").write_text("previous")
    f = run_copy / "adapter" / "adapter.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    assert main(["merge", f"run={run_copy}"]) == 2
    assert "truncated or corrupt" in one_error_line(capsys)
    assert (run_copy / "merged" / "keep").read_text() == "previous"


def test_bug_shows_traceback_and_asks_for_a_report(files, tmp_path, capsys, monkeypatch):
    """An exception that is not a refusal of bad input is a bug: its traceback, one line asking to
    report it, exit 1; FROD_DEBUG=1 lets even a refusal raise with its traceback."""
    from frod_cli.training import recipe

    def broken(self):
        raise ZeroDivisionError("a bug inside frod")

    monkeypatch.setattr(recipe.FinetuneRecipe, "train", broken)
    assert main(["train", *tiny(files["good"]), f"hydra.run.dir={tmp_path / 'run'}"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "ZeroDivisionError: a bug inside frod" in err
    assert err.strip().splitlines()[-1].startswith("frod train: internal error: this is a bug in frod")
    monkeypatch.setenv("FROD_DEBUG", "1")
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException):
        main(["train", *tiny(files["good"]), "train.bach_size=3", f"hydra.run.dir={tmp_path / 'run2'}"])
