"""Bad input: each case is refused with one line on stderr, exit code 2, no traceback, and nothing already
written is changed: every case runs next to (or into) finished run directories whose every file is hashed
before and after, train.log and .hydra/ included (docs/RELIABILITY.md lists the cases and their messages)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from frod_cli.cli import main

from conftest import digest, one_error_line, train_run  # noqa: E402  (tests/ is on sys.path under pytest)
from test_reliability import tiny, write_csv  # noqa: E402  (tests/ is on sys.path under pytest)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    (d / "a_directory").mkdir()
    (d / "empty_model").mkdir()
    return {
        "good": write_csv(d / "good.csv"),
        "columns": write_csv(d / "columns.csv", header=("sentence", "target")),
        "labels": write_csv(d / "labels.csv", labels=("neg", "pos", "meh")),
        "one_class": write_csv(d / "one_class.csv", labels=("pos",)),
        "empty": write_csv(d / "empty.csv", n=0),
        "empty_jsonl": _write(d / "empty.jsonl", ""),
        "bad_json": _write(d / "bad.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "c", "output"\n'),
        "no_output": _write(d / "no_output.jsonl", '{"instruction": "a", "response": "b"}\n' * 20),
        "txt": _write(d / "data.txt", "good day\tpos\n"),
        "prompts_empty": _write(d / "prompts.txt", "\n\n"),
        "existing": _write(d / "existing.json", "{}"),
        "dir": d,
    }


@pytest.fixture(scope="module")
def finished(files, tmp_path_factory):
    """A finished classifier run (tiny BERT): every case must leave it byte for byte as it is."""
    return train_run(tmp_path_factory, "finished", [*tiny(files["good"]), "train.max_steps=2", "train.eval_every=2",
                                                    "train.keep_checkpoints=true"])[0]


@pytest.fixture(scope="module")
def finished_lm(tmp_path_factory):
    """A finished causal-LM run (tiny LLaMA, packaged instruction set), for generate and eval."""
    run, _ = train_run(tmp_path_factory, "finished_lm", ["recipe=sft_smoke", "train.max_steps=2", "train.eval_every=2",
                                                         "train.progress=false", "task.max_eval_samples=8",
                                                         "task.generation.max_examples=4"])
    return run


# ---------------------------------------------------------------------------------------------------
# The battery: (id, verb, arguments given (files, classifier run, LM run, tmp), text of the one error line).
# `frod train` cases that get as far as the output directory go INTO the finished run with train.overwrite=true:
# the refusal must come before the replacement run is even started.
# ---------------------------------------------------------------------------------------------------
INTO = lambda f, run: [*tiny(f["good"]), f"hydra.run.dir={run}", "train.overwrite=true"]  # noqa: E731
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
    ("key_of_another_task_type", ["task.loss=ipo"], "task.loss is read by task.type=preference only"),
    ("unknown_tracker", ["train.log_with=[nope]"], "unknown tracker 'nope'"),
    ("target_modules_not_strings", ["method.target_modules=[1,2]"], "method.target_modules must be"),
    ("objective_not_a_metric", ["task.objective=f1"], "task.objective 'f1' is not among the metrics"),
    ("unknown_metric", ["task.metrics=[nope]"], "unknown metric 'nope'"),
    ("generation_max_new_tokens", ["task.type=causal_lm", "task.generation.max_new_tokens=0"], "task.generation.max_new_tokens must be at least 1"),
    ("generation_top_p", ["task.type=causal_lm", "task.generation.do_sample=true", "task.generation.top_p=2"], "task.generation.top_p must be in (0, 1]"),
    ("fsdp_version_1", ["train.fsdp.enabled=true", "train.fsdp.version=1"], "only FSDP2"),
    ("fsdp_state_dict_type", ["train.fsdp.enabled=true", "train.fsdp.state_dict_type=nope"], "state_dict_type must be one of"),
    ("resume_and_overwrite", ["resume=/tmp"], "drop one of the two"),
]


@pytest.mark.parametrize("case,extra,expected", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_bad_config(case, extra, expected, files, finished, capsys):
    before = digest(finished)
    assert main(["train", *INTO(files, finished), *extra]) == 2
    line = one_error_line(capsys)
    assert expected in line, line
    assert digest(finished) == before
    assert not Path(str(finished.parent / f".{finished.name}.frod-overwrite")).exists()


DATA_CASES = [
    ("missing_local_file", lambda f: ["task.data_files.train=/nonexistent/train.csv"], "not found"),
    ("dataset_without_columns", lambda f: [f"task.data_files.train={f['columns']}"], "has no column 'text'"),
    ("label_outside_class_list", lambda f: [f"task.data_files.train={f['labels']}", "task.labels=[neg,pos]"],
     "not one of task.labels"),
    ("empty_dataset", lambda f: [f"task.data_files.train={f['empty']}"], "empty"),
    ("unknown_file_format", lambda f: [f"task.data_files.train={f['txt']}"], "cannot tell the format"),
    ("one_class_labels", lambda f: [f"task.data_files.train={f['one_class']}"], "holds 1 class ('pos')"),
    ("empty_jsonl", lambda f: [f"task.data_files.train={f['empty_jsonl']}"], "is empty"),
    ("malformed_json_line", lambda f: [f"task.data_files.train={f['bad_json']}"], "bad.jsonl line 2"),
    ("directory_as_file", lambda f: [f"task.data_files.train={f['dir'] / 'a_directory'}", "task.format=csv"],
     "is a directory"),
    ("data_file_of_unknown_split", lambda f: [f"+task.data_files.dev={f['good']}"], "task.data_files.dev: not a split"),
    ("no_training_rows_left", lambda f: ["task.validation_fraction=1.0", "task.test_fraction=0"], "cannot take 80"),
]


@pytest.mark.parametrize("case,extra,expected", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_bad_data(case, extra, expected, files, finished, capsys):
    before = digest(finished)
    args = [a for a in INTO(files, finished) if not a.startswith("task.data_files.train=")]
    if not any(a.lstrip("+~").startswith("task.data_files.train") for a in extra(files)):
        args.append(f"task.data_files.train={files['good']}")
    assert main(["train", *args, *extra(files)]) == 2
    line = one_error_line(capsys)
    assert expected in line, line
    assert digest(finished) == before


def test_causal_lm_data_refused_on_the_lm_recipe(files, finished_lm, capsys):
    """The user's file on the LM recipe: its rows lack the recipe's output column: refused in one line."""
    before = digest(finished_lm)
    assert main(["train", "recipe=sft_smoke", f"task.data_files.train={files['no_output']}",
                 f"hydra.run.dir={finished_lm}", "train.overwrite=true"]) == 2
    assert "output" in one_error_line(capsys)
    assert digest(finished_lm) == before


# verb, arguments (files f, classifier run c, LM run m, tmp t), expected text
VERB_CASES = [
    # train: the directory it is pointed at
    ("train_into_finished_run", "train", lambda f, c, m, t: [*tiny(f["good"]), f"hydra.run.dir={c}"],
     "holds a finished run"),
    ("train_another_recipe_into_finished_run", "train", lambda f, c, m, t: ["recipe=sft_smoke", f"hydra.run.dir={c}"],
     "holds a finished run"),
    ("train_into_foreign_directory", "train", lambda f, c, m, t: [*tiny(f["good"]), f"hydra.run.dir={f['dir']}"],
     "holds files that are not a frod run"),
    ("train_validation_file_without_train", "train",
     lambda f, c, m, t: ["recipe=sft_smoke", f"task.data_files.validation={f['good']}", f"hydra.run.dir={m}",
                         "train.overwrite=true"], "but no 'train' file"),
    ("train_output_dir_under_a_file", "train", lambda f, c, m, t: [*tiny(f["good"]), f"output_dir={f['good']}/run"],
     "is not writable"),
    # eval
    ("eval_missing_path", "eval", lambda f, c, m, t: [f"path={t / 'nope'}"], "no such run directory"),
    ("eval_zero_batch_size", "eval", lambda f, c, m, t: [f"path={c}", "batch_size=0"], "batch_size must be at least 1"),
    ("eval_unknown_split", "eval", lambda f, c, m, t: [f"path={c}", "splits=[dev]"], "unknown split 'dev'"),
    ("eval_no_split", "eval", lambda f, c, m, t: [f"path={c}", "splits=[]"], "splits is empty"),
    ("eval_existing_output", "eval", lambda f, c, m, t: [f"path={c}", f"output={f['existing']}"], "the file exists"),
    ("eval_adapter_of_a_model_dir", "eval", lambda f, c, m, t: [f"path={m / 'merged'}", "use_adapter=true",
                                                                 "task=sft_tiny", f"output={t / 'e.json'}"],
     "use_adapter"),
    ("eval_model_dir_without_task", "eval", lambda f, c, m, t: [f"path={m / 'merged'}", f"output={t / 'e.json'}"],
     "name its task"),
    ("eval_empty_model_dir", "eval", lambda f, c, m, t: [f"path={f['dir'] / 'empty_model'}", "task=local_text",
                                                          f"task.data_files.train={f['good']}", f"output={t / 'e.json'}"],
     "holds no saved model"),
    ("eval_harness_with_splits", "eval", lambda f, c, m, t: [f"path={m}", "harness.tasks=[frod_arith]", "splits=[test]"],
     "splits chooses frod's own evaluation"),
    ("eval_harness_on_a_classifier", "eval", lambda f, c, m, t: [f"path={c}", "harness=smoke"],
     "scores causal language models"),
    # push (frod_cli/share/hub.py): refused before anything is sent
    ("push_not_a_run", "push", lambda f, c, m, t: [f"path={f['dir']}", "repo=me/model"], "is not a run directory"),
    ("push_bad_repo_id", "push", lambda f, c, m, t: [f"path={c}", "repo=me/two words"], "is not a Hub repo id"),
    ("push_unknown_upload", "push", lambda f, c, m, t: [f"path={c}", "repo=me/model", "upload=all"],
     "upload must be one of"),
    # merge
    ("merge_not_a_run", "merge", lambda f, c, m, t: [f"run={f['dir']}"], "not a run directory"),
    ("merge_existing_merged", "merge", lambda f, c, m, t: [f"run={m}"], "overwrite=true replaces it"),
    ("merge_zero_check_batch", "merge", lambda f, c, m, t: [f"run={c}", "check_batch_size=0", f"output={t / 'm'}"],
     "check_batch_size must be at least 1"),
    # generate: sampling settings refused before any model loads
    ("generate_negative_max_new_tokens", "generate", lambda f, c, m, t: [f"path={m}", "prompt=hi", "max_new_tokens=-3"],
     "max_new_tokens must be at least 1"),
    ("generate_zero_temperature", "generate", lambda f, c, m, t: [f"path={m}", "prompt=hi", "do_sample=true",
                                                                  "temperature=0"], "temperature must be > 0"),
    ("generate_top_p_above_one", "generate", lambda f, c, m, t: [f"path={m}", "prompt=hi", "do_sample=true", "top_p=1.5"],
     "top_p must be in (0, 1]"),
    ("generate_negative_top_k", "generate", lambda f, c, m, t: [f"path={m}", "prompt=hi", "do_sample=true", "top_k=-1"],
     "top_k must be >= 0"),
    ("generate_zero_beams", "generate", lambda f, c, m, t: [f"path={m}", "prompt=hi", "num_beams=0"],
     "num_beams must be at least 1"),
    ("generate_zero_batch", "generate", lambda f, c, m, t: [f"path={m}", "prompt=hi", "batch_size=0"],
     "batch_size must be at least 1"),
    ("generate_empty_prompt", "generate", lambda f, c, m, t: [f"path={m}", "prompt=' '"], "prompt is empty"),
    ("generate_missing_prompts_file", "generate", lambda f, c, m, t: [f"path={m}", f"prompts={t / 'nope.txt'}"],
     "prompts file not found"),
    ("generate_empty_prompts_file", "generate", lambda f, c, m, t: [f"path={m}", f"prompts={f['prompts_empty']}"],
     "holds no prompts"),
    ("generate_existing_output", "generate", lambda f, c, m, t: [f"path={m}", "prompt=hi", f"output={f['existing']}"],
     "the file exists"),
    ("generate_nothing", "generate", lambda f, c, m, t: [f"path={m}"], "nothing to generate from"),
    ("generate_missing_path", "generate", lambda f, c, m, t: [f"path={t / 'nope'}", "prompt=hi"], "no such run"),
    ("generate_classifier_run", "generate", lambda f, c, m, t: [f"path={c}", "prompt=hi"], "needs a causal LM run"),
    ("generate_empty_model_dir", "generate", lambda f, c, m, t: [f"path={f['dir'] / 'empty_model'}", "prompt=hi"],
     "no config.json"),
    # compare
    ("compare_with_multirun", "compare", lambda f, c, m, t: ["-m", *tiny(f["good"])], "drop -m"),
    ("compare_unknown_stage", "compare", lambda f, c, m, t: [*tiny(f["good"]), "compare.stage=nope",
                                                             f"hydra.run.dir={t / 'cmp'}"], "compare.stage must be"),
    ("compare_zero_jobs", "compare", lambda f, c, m, t: [*tiny(f["good"]), "compare.jobs=0", f"hydra.run.dir={t / 'cmp'}"],
     "compare.jobs must be >= 1"),
    ("compare_report_of_nothing", "compare", lambda f, c, m, t: [str(t / "nope")], "no run directory"),
    # outputs and output directories (frod_cli/runs/lock.py, the checks before Hydra)
    ("eval_relative_output_exists", "eval", lambda f, c, m, t: [f"path={c}", "output=metrics.json"],
     "metrics.json: the file exists"),  # a relative output= lies in the run directory
    ("train_sweep_dir_under_a_file", "train", lambda f, c, m, t: ["-m", *tiny(f["good"]), "train.seed=1,2",
                                                                  f"hydra.sweep.dir={f['good']}/sweep"],
     "is not writable"),
]


@pytest.mark.parametrize("case,verb,args,expected", VERB_CASES, ids=[c[0] for c in VERB_CASES])
def test_bad_input_of_every_verb(case, verb, args, expected, files, finished, finished_lm, tmp_path, capsys):
    before, before_lm = digest(finished), digest(finished_lm)
    assert main([verb, *args(files, finished, finished_lm, tmp_path)]) == 2
    line = one_error_line(capsys)
    assert expected in line, line
    assert digest(finished) == before and digest(finished_lm) == before_lm


def test_the_battery_covers_every_verb_with_forty_cases():
    verbs = {v for _, v, _, _ in VERB_CASES}
    assert {"train", "eval", "merge", "generate", "compare"} <= verbs
    assert len(CONFIG_CASES) + len(DATA_CASES) + len(VERB_CASES) >= 40


def test_a_refused_run_leaves_no_directory_behind(files, tmp_path, capsys, monkeypatch):
    """Hydra creates the run directory (and its parents) before frod sees the command; a refused run removes
    what Hydra made, and only that: an existing (empty) parent stays."""
    run = tmp_path / "new_run"
    assert main(["train", *tiny(files["good"]), "task.objective=f1", f"hydra.run.dir={run}"]) == 2
    one_error_line(capsys)
    assert not run.exists()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "kept").mkdir()
    assert main(["train", *tiny(files["good"]), "task.objective=f1"]) == 2  # runs/<recipe>/<time>
    one_error_line(capsys)
    assert main(["train", *tiny(files["good"]), "task.objective=f1", "hydra.run.dir=kept/a/b"]) == 2
    one_error_line(capsys)
    assert not (tmp_path / "runs").exists() and list((tmp_path / "kept").iterdir()) == []


# ---------------------------------------------------------------------------------------------------
# Against an existing run: refused, and the run is left as it was
# ---------------------------------------------------------------------------------------------------
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
    (run_copy / "merged").mkdir(exist_ok=True)
    (run_copy / "merged" / "keep").write_text("previous")
    f = run_copy / "adapter" / "adapter.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    assert main(["merge", f"run={run_copy}", "overwrite=true"]) == 2
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


def test_verbs_writing_into_a_run_another_command_holds_are_refused(finished, finished_lm, tmp_path, capsys):
    """While another frod command holds a run (frod train of it, say), eval, merge, export and generate refuse to
    write into it, each in one line naming the holder's pid, and change nothing."""
    from test_reliability import hold_in_another_process

    before, before_lm = digest(finished), digest(finished_lm)
    holder = hold_in_another_process(finished, finished_lm)
    try:
        for verb, args in (("eval", [f"path={finished}"]), ("merge", [f"run={finished}", "overwrite=true"]),
                           ("export", [f"path={finished}", "format=merged"]),
                           ("generate", [f"path={finished_lm}", "prompt=hi", "output=answers.jsonl"]),
                           ("eval", [f"path={finished_lm}/merged", "task=sft_tiny"])):
            if verb == "generate":
                args[-1] = f"output={finished_lm / 'answers.jsonl'}"
            assert main([verb, *args]) == 2, verb
            line = one_error_line(capsys)
            assert f"is in use by another frod command (pid {holder.pid})" in line, line
            assert str(finished_lm if "lm" in " ".join(args) else finished) in line, line
    finally:
        holder.kill()
        holder.wait()
    assert digest(finished) == before and digest(finished_lm) == before_lm


def test_a_run_peft_cannot_rebuild_says_so_at_its_start(finished_lm):
    """sft_smoke's tiny LLaMA has 2 blocks: k_proj, v_proj and down_proj stack to square matrices, which PEFT's FRoD
    rebuilds differently at load; the run's log says, before its first step, that format=peft will be refused."""
    log = (finished_lm / "train.log").read_text()
    note = next(l for l in log.splitlines() if "stacking to a square matrix" in l)
    assert "k_proj" in note and "down_proj" in note and "format=peft" in note
    assert log.index("stacking to a square matrix") < log.index(" validation loss=")  # before the first evaluation


def test_generate_logs_the_runs_config_once(finished_lm, capsys):
    """The run's config (and its per_method line) is read once, not once to check it and once to load it."""
    assert main(["generate", f"path={finished_lm}", "prompt=hi", "max_new_tokens=2"]) == 0
    out = capsys.readouterr().out
    assert out.count("per_method.frod settings") == 1, out


# ---------------------------------------------------------------------------------------------------
# Conversation and tool-calling data a new user writes by hand (issue 24): each refused in one line, exit 2,
# on the LM recipe pointed INTO the finished LM run (train.overwrite=true), which stays as it was.
# ---------------------------------------------------------------------------------------------------
def _share(*turns, **columns) -> str:
    import json

    good = {"conversations": [{"from": "human", "value": "What is 2 plus 3?"}, {"from": "gpt", "value": "5"}]}
    bad = {"conversations": [{"from": "human", "value": "What is 2 plus 3?"}, *turns], **columns}
    return "".join(json.dumps(r) + "\n" for r in [good] * 9 + [bad] + [good] * 10)


CALL = {"from": "function_call", "value": '{"name": "add", "arguments": {"a": 2, "b": 3}}'}
CONVERSATION_CASES = [  # (id, file text, extra overrides, expected text)
    ("unknown_role", _share({"from": "robot", "value": "5"}), [],
     "row 10: 'conversations' turn 2: role 'robot' is not in task.role_map"),
    ("tool_call_with_bad_json_arguments", _share({"from": "function_call", "value": '{"name": "add", "arguments": "{a: 2}"}'}),
     [], "row 10: 'conversations' turn 2 (function_call) 'value' (add) arguments is not valid JSON"),
    ("tools_column_not_a_list", _share(CALL, {"from": "observation", "value": "5"}, {"from": "gpt", "value": "5"},
                                       tools='{"name": "add"}'), [], "row 10: 'tools' is a dict, not a list of tool schemas"),
    ("role_map_to_no_role", _share({"from": "bot", "value": "5"}), ["task.role_map={bot: robot}"],
     "task.role_map maps 'bot' to 'robot': roles are system, user, assistant, tool, function_call"),
    ("tools_column_the_layout_does_not_read",
     "".join('{"instruction": "a", "output": "b", "tools": "[]"}\n' for _ in range(20)), [],
     "has a tools column 'tools', which the instruction layout does not read"),
    ("stream_too_short_to_hold_out_validation", _share({"from": "gpt", "value": "5"}), ["task.streaming=true"],
     "holds 20 rows: holding out the first 100 for validation leaves none to train on"),
]


@pytest.mark.parametrize("case,text,extra,expected", CONVERSATION_CASES, ids=[c[0] for c in CONVERSATION_CASES])
def test_bad_conversation_data(case, text, extra, expected, finished_lm, tmp_path, capsys):
    data = _write(tmp_path / "calls.jsonl", text)
    before = digest(finished_lm)
    fmt = [] if "layout_does_not_read" in case else ["task.data_format=sharegpt"]
    assert main(["train", "recipe=sft_smoke", *fmt, "task.chat_template=chatml", f"task.data_files.train={data}",
                 *extra, f"hydra.run.dir={finished_lm}", "train.overwrite=true"]) == 2
    line = one_error_line(capsys)
    assert expected in line, line
    assert digest(finished_lm) == before
