"""The CLI in-process: help, composition of every recipe, and one-line errors for bad input."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from frod_cli.cli import main, recipes_dir


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    return err[0]


def test_top_level_help(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for verb in ("train", "eval", "merge", "recipes"):
        assert verb in out


def test_train_help_lists_groups(capsys):
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    for group in ("recipe:", "model:", "task:", "method:", "optimizer:", "quickstart", "vit_cifar"):
        assert group in out, group


def test_every_verb_has_its_own_help(capsys):
    """`frod <verb> --help` opens with that verb: each verb's YAML names it in Hydra's help (read for every verb,
    push included; test_train_help_lists_groups runs one), and `frod compare --help` (which composes frod train's
    config) prints compare's, not train's."""
    from omegaconf import OmegaConf

    from frod_cli.cli import verbs

    for verb, spec in verbs().items():
        own = OmegaConf.load(Path(recipes_dir()) / f"{spec.config}.yaml").hydra.help
        if verb != "compare":
            assert own.app_name == f"frod {verb}" and own.header.startswith(f"frod {verb}: "), verb
    assert main(["compare", "--help"]) == 0
    first = capsys.readouterr().out.strip().splitlines()[0]
    assert first.startswith("frod compare: "), first


def test_the_progress_bar_keeps_its_times_whole_in_a_log(capsys):
    """Outside a terminal the bar's last line is written whole (rich would cut it to 80 columns: '0:00:…')."""
    from frod_cli.console import progress_bar

    bar = progress_bar(True)
    task = bar.add_task("a_long_recipe_name [frod]", total=4, completed=0, loss="1.0986", lr="1.00e-03", sps="64")
    bar.start()
    bar.update(task, completed=4)
    bar.stop()
    out = capsys.readouterr().out
    assert "4/4" in out and "…" not in out, out


def test_recipes_listing(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert "quickstart" in out and "peft_frod" in out and "frod_optuna" in out


def test_the_default_targets_form_no_category_peft_cannot_rebuild():
    """MiniLM's targets (model/minilm.yaml, the quickstart's model) are the attention and intermediate layers of its
    blocks: not the pooler (a category of one layer, whose basis PEFT recomputes differently at load), which
    [query, key, value, dense] takes and a run of it is told at its start, nor the feed-forward output projection,
    whose near-equal HO-GSVD eigenvalues put PEFT's reload of a trained run past the export's tolerance (measured:
    README section 9)."""
    from transformers import AutoModelForSequenceClassification

    from frod_cli.export.peft_frod import peft_format_note, unrebuildable
    from frod_cli.frod.targets import find_linear_targets
    from frod_cli.models import OFFLINE_MODELS
    from conftest import compose_train

    cfg = compose_train([])
    assert cfg.model.name_or_path == "offline:all-minilm-l6-v2"
    model = AutoModelForSequenceClassification.from_pretrained(OFFLINE_MODELS["all-minilm-l6-v2"](), num_labels=3)
    assert unrebuildable(model, list(cfg.model.target_modules)) == []
    assert unrebuildable(model, ["query", "key", "value", "dense"]) == ["bert.pooler.dense|in=384"]
    adapted = [n for n, _ in find_linear_targets(model, list(cfg.model.target_modules))]
    assert len(adapted) == 6 * 5 and not any(n.endswith(".output.dense") and ".attention." not in n for n in adapted)
    assert peft_format_note(model) is None  # no FRoD layer yet: nothing to say


def test_default_is_quickstart(capsys):
    assert main(["train", "--cfg", "job"]) == 0
    out = capsys.readouterr().out
    assert "recipe_name: quickstart" in out
    assert "offline:all-minilm-l6-v2" in out and "name: frod" in out


@pytest.mark.parametrize("recipe", sorted(p.stem for p in (Path(recipes_dir()) / "recipe").glob("*.yaml")))
def test_every_recipe_composes(recipe, capsys):
    assert main(["train", f"recipe={recipe}", "--cfg", "job"]) == 0
    assert f"recipe_name: {recipe}" in capsys.readouterr().out


@pytest.mark.parametrize("method", ["frod", "full", "lora", "dora", "pissa", "vera", "peft_frod"])
def test_every_method_composes(method, capsys):
    assert main(["train", f"method={method}", "--cfg", "job"]) == 0
    assert f"name: {method}" in capsys.readouterr().out


def test_vit_cifar_composes_offline(capsys):
    assert main(["train", "recipe=vit_cifar", "--cfg", "job"]) == 0
    out = capsys.readouterr().out
    assert "google/vit-base-patch16-224-in21k" in out and "uoft-cs/cifar10" in out
    assert "sparse: 5.0e-05" in out and "scale: 0.0005" in out and "head: 0.0001" in out


def test_optuna_search_composes(capsys):
    assert main(["train", "hparams_search=frod_optuna", "--cfg", "hydra"]) == 0
    out = capsys.readouterr().out
    assert "OptunaSweeper" in out and "direction: maximize" in out


def test_recipe_files_open_with_their_command():
    for f in (Path(recipes_dir()) / "recipe").glob("*.yaml"):
        lines = f.read_text().splitlines()
        assert lines[0] == "# @package _global_", f
        # `frod train recipe=<name>`, or a launcher running frod's CLI on it (torchrun -m frod_cli.cli train ...)
        command = re.match(r"# (frod|torchrun .* -m frod_cli\.cli|accelerate launch .* -m frod_cli\.cli) train", lines[1])
        assert command, f
        assert f.stem == "quickstart" or f"recipe={f.stem}" in lines[1], f


def test_unknown_recipe_is_one_line(capsys):
    assert main(["train", "recipe=nope"]) == 2
    line = _one_error_line(capsys)
    assert "recipe/nope" in line and "quickstart" in line


def test_misspelt_key_is_one_line(capsys):
    assert main(["train", "train.bach_size=3"]) == 2
    line = _one_error_line(capsys)
    assert "bach_size" in line and "batch_size" in line


def test_wrong_type_is_one_line(capsys):
    assert main(["train", "train.batch_size=abc"]) == 2
    assert "train.batch_size" in _one_error_line(capsys)


def test_unknown_method_option_is_one_line(capsys):
    assert main(["train", "method=nope"]) == 2
    assert "method/nope" in _one_error_line(capsys)


def test_misspelt_key_in_a_recipe_file(tmp_path, capsys):
    extra = tmp_path / "recipe"
    extra.mkdir()
    (extra / "bad.yaml").write_text("# @package _global_\n# frod train recipe=bad\ntrain:\n  epoch: 3\n")
    code = main(["train", "recipe=bad", f"hydra.searchpath=[file://{tmp_path}]", "--cfg", "job"])
    assert code == 2
    assert "epoch" in _one_error_line(capsys)


def test_unknown_verb(capsys):
    assert main(["trian"]) == 2
    assert "train" in _one_error_line(capsys)


def test_eval_needs_a_path(capsys):
    assert main(["eval"]) == 2
    assert "path" in _one_error_line(capsys)


def test_eval_of_a_missing_dir(tmp_path, capsys):
    assert main(["eval", f"path={tmp_path / 'nope'}"]) == 2
    assert "nope" in _one_error_line(capsys)


def test_merge_of_a_non_run(tmp_path, capsys):
    assert main(["merge", f"run={tmp_path}"]) == 2
    assert "not a run directory" in _one_error_line(capsys)


def test_help_from_another_directory(tmp_path):
    """The recipes are found from any directory (packaged as frod_cli.recipes)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "frod_cli.cli", "train", "--help"], cwd=tmp_path,
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "quickstart" in r.stdout


def _terminal_output(message: str) -> str:
    """What a log record and a running progress bar print on one terminal console."""
    import io
    import logging
    import re

    from rich.console import Console

    import frod_cli.console as C

    buf, old = io.StringIO(), C._CONSOLE
    C._CONSOLE = Console(file=buf, force_terminal=True, width=100, soft_wrap=True)
    logger = logging.getLogger("frod.test_console")
    handler = C.log_handler()
    logger.addHandler(handler)
    logger.propagate = False
    try:
        bar = C.progress_bar(True)
        task = bar.add_task("run", total=4, loss="-", lr="-", sps="-")
        bar.start()
        bar.update(task, completed=1)
        bar.refresh()
        logger.warning(message)
        bar.update(task, completed=2)
        bar.stop()
    finally:
        logger.removeHandler(handler)
        C._CONSOLE = old
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", buf.getvalue()).replace("\r", "\n")


def test_log_lines_never_share_a_line_with_the_progress_bar():
    """In a terminal the log handler is rich's, on the bar's own console: the line is printed above the bar."""
    from rich.logging import RichHandler

    import frod_cli.console as C

    out = _terminal_output("step 1 validation accuracy=0.5")
    lines = [l for l in out.split("\n") if "validation accuracy" in l]
    assert lines and all("━" not in l and "loss" not in l for l in lines), lines
    old = C._CONSOLE
    try:
        from rich.console import Console

        C._CONSOLE = Console(force_terminal=True)
        assert isinstance(C.log_handler(), RichHandler)
        C._CONSOLE = Console(force_terminal=False)
        assert not isinstance(C.log_handler(), RichHandler)
    finally:
        C._CONSOLE = old


def test_non_terminal_output_is_never_cut(capsys):
    """Outside a terminal, log lines and the closing summary stay whole however long they are."""
    import logging

    from frod_cli.console import log_handler, print_final

    message = "a long log line " + "x" * 300
    logger = logging.getLogger("frod.test_plain")
    handler = log_handler()
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning(message)
    finally:
        logger.removeHandler(handler)
    final = {"validation": {f"metric_{i}": 0.5 for i in range(12)}, "objective": "metric_0", "objective_value": 0.5,
             "best_step": 2, "trainable_params": 10, "trainable_percent": 1.0, "wall_time_s": 3.0}
    print_final(final, "/tmp/run")
    out = capsys.readouterr().out
    assert message in out
    assert any(l.count("metric_") == 12 for l in out.splitlines())
