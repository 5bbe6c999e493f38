"""Reliability (docs/RELIABILITY.md): resume after SIGKILL, atomic checkpoints, NaN/inf and output-dir
faults, safety of what a recipe may load or instantiate, and 2-process (gloo) equivalence.
Tiny models (tiny:bert, hidden 32), a local 80-row CSV, temp dirs."""
from __future__ import annotations

import csv
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from frod_cli.training import checkpoint as ck
from frod_cli.cli import main, run_verb
from conftest import digest, one_error_line  # noqa: E402  (tests/ is on sys.path under pytest)
from fsdp_runs import launch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORDS = "good bad great awful fine ok terrible nice happy sad".split()


def write_csv(path: Path, n: int = 80, header=("text", "label"), labels=("neg", "pos"), seed: int = 0) -> Path:
    rng = random.Random(seed)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for _ in range(n):
            w.writerow([" ".join(rng.choice(WORDS) for _ in range(5)), rng.choice(labels)])
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_csv(tmp_path_factory.mktemp("data") / "train.csv")


def tiny(data: Path, *extra: str) -> list:
    return ["model=tiny_bert", "task=local_text", f"task.data_files.train={data}", "task.max_length=16",
            "train.batch_size=8", "train.eval_batch_size=16", "train.log_every=1", "train.progress=false",
            "train.save_merged=false", *extra]


def tree_digest(d: Path) -> dict:
    return digest(d, skip=("train.log",))


def jsonl_rows(run: Path) -> list:
    """metrics.jsonl without the timing fields (which differ between any two runs)."""
    drop = {"samples_per_s", "elapsed_s", "eta_s", "peak_memory_mb", "current_memory_mb"}
    return [{k: v for k, v in json.loads(l).items() if k not in drop} for l in (run / "metrics.jsonl").read_text().splitlines()]


def final_values(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(ck.latest_checkpoint(str(run))) / "trainable.safetensors"))


def assert_rows_close(a: list, b: list, tol: float) -> None:
    assert len(a) == len(b), (len(a), len(b))
    for ra, rb in zip(a, b):
        assert set(ra) == set(rb)
        for k in ra:
            if isinstance(ra[k], float):
                assert ra[k] == pytest.approx(rb[k], abs=tol), (k, ra, rb)
            elif isinstance(ra[k], dict):
                for g in ra[k]:
                    assert ra[k][g] == pytest.approx(rb[k][g], abs=tol)
            else:
                assert ra[k] == rb[k], (k, ra, rb)


# ---------------------------------------------------------------------------------------------------
# 1. Resume
# ---------------------------------------------------------------------------------------------------
# Two micro-batches per optimizer step with FRoD's accumulation window (dW built once per step): a resumed
# run must continue at a window boundary and match the uninterrupted one.
RESUME = ["train.max_steps=12", "train.eval_every=4", "train.checkpoint_every=1", "train.keep_checkpoints=true",
          "train.grad_accum=2", "method.accumulate=window",
          # dropout stays on: the restored RNG state must reproduce its masks
          "+model.config_overrides.hidden_dropout_prob=0.1"]


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    run = tmp_path_factory.mktemp("ref") / "run"
    code, _ = run_verb("train", [*tiny(data, *RESUME), f"hydra.run.dir={run}"])
    assert code == 0
    return run


def kill_seed() -> int:
    """The seed of a test's random kill moment: FROD_TEST_SEED to replay one, else drawn and printed
    (pytest shows it with a failure)."""
    return int(os.environ.get("FROD_TEST_SEED") or time.time_ns() % 1_000_003)


def kill_when(p: subprocess.Popen, log: Path, step: int, timeout: float = 240) -> None:
    """SIGKILL the run `p` once its metrics.jsonl `log` has logged `step`."""
    deadline = time.time() + timeout
    try:
        while time.time() < deadline and p.poll() is None:
            rows = [json.loads(l) for l in log.read_text().splitlines()] if log.exists() else []
            if any(r.get("step", 0) >= step for r in rows):
                break
            time.sleep(0.02)
        assert p.poll() is None, "the run finished before it could be killed"
        p.send_signal(signal.SIGKILL)
    finally:
        p.wait()


def train_then_kill(args, log: Path, step: int, cwd: Path) -> None:
    """`frod train <args>` in a process of its own (one thread), SIGKILLed once its metrics.jsonl `log` has
    logged `step`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    p = subprocess.Popen([sys.executable, "-m", "frod_cli.cli", "train", *args], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=cwd)
    kill_when(p, log, step)


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted(reference, data, tmp_path):
    run = tmp_path / "killed"
    seed = kill_seed()
    kill_at = random.Random(seed).randint(2, 7)
    print(f"FROD_TEST_SEED={seed}: kill after step {kill_at}")
    train_then_kill([*tiny(data, *RESUME), f"hydra.run.dir={run}"], run / "metrics.jsonl", kill_at, tmp_path)
    assert not (run / "metrics.json").exists()
    assert ck.latest_checkpoint(str(run)) is not None
    code, _ = run_verb("train", [*tiny(data, *RESUME), f"resume={run}"])
    assert code == 0
    m = json.loads((run / "metrics.json").read_text())
    assert m["resumed_from"] and m["steps"] == 12
    ref, got = final_values(reference), final_values(run)
    assert set(ref) == set(got)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=1e-6, rtol=0)
    assert_rows_close(jsonl_rows(run), jsonl_rows(reference), 1e-6)
    ref_m = json.loads((reference / "metrics.json").read_text())
    assert m["validation"] == ref_m["validation"] and m["test"] == ref_m["test"]


@pytest.mark.slow
def test_incomplete_run_in_same_directory_resumes_automatically(reference, data, tmp_path):
    run = tmp_path / "auto"
    import shutil

    shutil.copytree(reference, run)
    (run / "metrics.json").unlink()
    for step, d in ck.step_dirs(str(run)):
        if step > 11:
            shutil.rmtree(d)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    code, _ = run_verb("train", [*tiny(data, *RESUME), f"hydra.run.dir={run}"])
    assert code == 0
    assert json.loads((run / "metrics.json").read_text())["resumed_from"].endswith("step-00000011")
    assert len((run / "metrics.jsonl").read_text().splitlines()) == len(lines)
    assert_rows_close(jsonl_rows(run), jsonl_rows(reference), 1e-6)


@pytest.mark.slow
def test_overwrite_replaces_a_finished_run_only_when_the_new_one_finishes(reference, data, tmp_path):
    """train.overwrite=true: killed midway, the old run is whole (every byte); the same command again finishes
    the new run and swaps it in, and nothing of the old run (its eval.json) survives beside it."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(reference, run)
    (run / "eval.json").write_text("{}")
    before = digest(run)
    args = [*tiny(data, *RESUME), "train.seed=7", "train.overwrite=true", f"hydra.run.dir={run}"]
    staging = tmp_path / ".run.frod-overwrite"
    train_then_kill(args, staging / "metrics.jsonl", 3, tmp_path)
    assert digest(run) == before
    code, _ = run_verb("train", args)
    assert code == 0
    assert not staging.exists() and not (run / "eval.json").exists()
    m = json.loads((run / "metrics.json").read_text())
    assert m["resumed_from"] and m["steps"] == 12
    assert "train.seed=7" in (run / ".hydra" / "overrides.yaml").read_text()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".run.")]


# ---------------------------------------------------------------------------------------------------
# 2. Atomic writes
# ---------------------------------------------------------------------------------------------------
_SAVER = r"""
import sys, torch
from frod_cli.training import checkpoint as ck
run = sys.argv[1]
big = {"w": torch.randn(4_000_000)}
opt = {"state": {0: {"step": torch.tensor(1.0), "exp_avg": torch.randn(4_000_000)}}, "param_groups": [{"lr": 0.1, "params": [0]}]}
ck.save_checkpoint(run, 1, trainable=big, best=None, optimizer_sd=opt, scheduler_sd={"last_epoch": 1}, state={"step": 1}, config={"a": 1})
print("ready", flush=True)
step = 2
while True:
    ck.save_checkpoint(run, step, trainable=big, best=big, optimizer_sd=opt, scheduler_sd={"last_epoch": step}, state={"step": step}, config={"a": 1})
    step += 1
"""


@pytest.mark.slow
def test_sigkill_during_checkpoint_save_leaves_a_loadable_checkpoint(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    seed = kill_seed()
    rng = random.Random(seed)
    print(f"FROD_TEST_SEED={seed}: kill delays drawn from random.Random({seed})")
    for trial in range(3):
        run = tmp_path / f"r{trial}"
        p = subprocess.Popen([sys.executable, "-c", _SAVER, str(run)], env=env, stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.05, 1.5))
        p.send_signal(signal.SIGKILL)
        p.wait()
        latest = ck.latest_checkpoint(str(run))
        loaded = ck.load_checkpoint(latest)
        assert loaded["trainable"]["w"].numel() == 4_000_000
        assert loaded["state"]["step"] >= 1


def test_failed_save_keeps_previous_checkpoint_and_adapter(tmp_path, monkeypatch):
    from frod_cli.runs import atomic_dir, recover_atomic_dir

    t = {"w": torch.ones(3)}
    opt = {"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]}
    ck.save_checkpoint(str(tmp_path), 1, trainable=t, best=None, optimizer_sd=opt, scheduler_sd={}, state={"step": 1}, config={})

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ck.json, "dump", boom)
    with pytest.raises(OSError):
        ck.save_checkpoint(str(tmp_path), 2, trainable=t, best=None, optimizer_sd=opt, scheduler_sd={}, state={"step": 2}, config={})
    monkeypatch.undo()
    assert ck.latest_checkpoint(str(tmp_path)).endswith("step-00000001")
    assert ck.load_checkpoint(ck.latest_checkpoint(str(tmp_path)))["state"]["step"] == 1
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]
    # adapter/ (and merged/): a failed write leaves the previous version
    adapter = tmp_path / "adapter"
    atomic_dir(str(adapter), lambda d: Path(d, "v").write_text("1"))

    def half(d):
        Path(d, "v").write_text("2")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        atomic_dir(str(adapter), half)
    assert (adapter / "v").read_text() == "1"
    # a kill between the two renames of atomic_dir: the previous version is put back
    os.replace(adapter, tmp_path / ".adapter.old-xyz")
    recover_atomic_dir(str(adapter))
    assert (adapter / "v").read_text() == "1"


def test_corrupt_checkpoint_is_one_line(tmp_path):
    t = {"w": torch.ones(3)}
    path = ck.save_checkpoint(str(tmp_path), 1, trainable=t, best=None, optimizer_sd={"state": {}, "param_groups": []},
                              scheduler_sd={}, state={"step": 1}, config={})
    f = Path(path) / "trainable.safetensors"
    f.write_bytes(f.read_bytes()[:20])
    with pytest.raises(ck.FrodCliError, match="truncated or corrupt"):
        ck.load_checkpoint(path)


def test_optimizer_state_round_trip_without_pickle():
    p = torch.nn.Parameter(torch.randn(4))
    opt = torch.optim.AdamW([{"params": [p], "lr": 0.1, "name": "x"}], betas=(0.8, 0.9))
    p.grad = torch.ones(4)
    opt.step()
    tensors, meta = ck.flatten_optimizer(opt.state_dict())
    json.dumps(meta)
    sd = ck.unflatten_optimizer(tensors, json.loads(json.dumps(meta)))
    opt2 = torch.optim.AdamW([{"params": [torch.nn.Parameter(p.detach().clone())], "lr": 0.1, "name": "x"}])
    opt2.load_state_dict(sd)
    assert opt2.param_groups[0]["betas"] == (0.8, 0.9)
    torch.testing.assert_close(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


# ---------------------------------------------------------------------------------------------------
# 3. Faults
# ---------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_nan_loss_stops_with_the_step_and_keeps_checkpoint(data, tmp_path, monkeypatch, capsys):
    from frod_cli.tasks.common import ClassificationTask

    real = ClassificationTask.loss
    calls = {"n": 0}

    def loss(self, model, batch):
        calls["n"] += 1
        out = real(self, model, batch)
        return out * float("nan") if calls["n"] == 3 else out

    monkeypatch.setattr(ClassificationTask, "loss", loss)
    run = tmp_path / "nan"
    code = main(["train", *tiny(data, "train.max_steps=6", "train.checkpoint_every=1"), f"hydra.run.dir={run}"])
    assert code == 2
    line = one_error_line(capsys)
    assert "nan" in line and "step 3" in line and "step-00000002" in line
    assert ck.latest_checkpoint(str(run)).endswith("step-00000002")
    ck.load_checkpoint(ck.latest_checkpoint(str(run)))
    assert not (run / "metrics.json").exists()


def test_unwritable_output_dir_is_refused_before_training(data, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code = main(["train", *tiny(data), f"output_dir={blocker}/run", f"hydra.run.dir={tmp_path / 'h'}"])
    assert code == 2
    assert "not writable" in one_error_line(capsys)


def test_full_output_dir_is_refused_before_training(data, tmp_path, monkeypatch, capsys):
    import shutil
    from collections import namedtuple

    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10**9, 10**9 - 1000, 1000))
    run = tmp_path / "full"
    assert main(["train", *tiny(data), f"hydra.run.dir={run}"]) == 2
    assert "MiB free" in one_error_line(capsys)
    assert not (run / "checkpoints").exists() and not (run / "adapter").exists()


def test_unwritable_output_dir_is_refused_before_hydra_creates_it(data, tmp_path, monkeypatch, capsys):
    """A read-only directory (chmod stops no root, so the refusal is injected where the probe writes): one line,
    and Hydra never made the run directory or its parents."""
    import errno
    import tempfile

    real = tempfile.mkstemp

    def mkstemp(*a, dir=None, **k):
        if dir is not None and str(dir).startswith(str(tmp_path / "ro")):
            raise PermissionError(errno.EACCES, "Permission denied", str(dir))
        return real(*a, dir=dir, **k)

    (tmp_path / "ro").mkdir()
    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    assert main(["train", *tiny(data), f"hydra.run.dir={tmp_path / 'ro' / 'a' / 'run'}"]) == 2
    assert f"output directory {tmp_path / 'ro' / 'a' / 'run'} is not writable (Permission denied)" in one_error_line(capsys)
    assert list((tmp_path / "ro").iterdir()) == []


@pytest.mark.slow
def test_disk_full_midway_is_one_line_and_the_same_command_resumes(data, tmp_path, monkeypatch, capsys):
    """ENOSPC in the middle of a checkpoint write (as a write() raises it: no file name): one line naming the
    checkpoint and the cause, exit 2, the run left incomplete with its previous checkpoint; the same command then
    resumes and finishes, metrics.jsonl holding each step once."""
    import errno

    import safetensors.torch

    real = safetensors.torch.save_file

    def save_file(tensors, path, *a, **k):
        if ".step-00000003.tmp-" in str(path) and path.endswith("optimizer.safetensors"):  # the third, midway
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, *a, **k)

    run = tmp_path / "run"
    args = ["train", *tiny(data, "train.max_steps=4", "train.eval_every=2", "train.checkpoint_every=1"),
            f"hydra.run.dir={run}"]
    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    assert main(args) == 2
    line = one_error_line(capsys)
    assert line.startswith("frod train: error: file system: ") and "No space left on device (ENOSPC)" in line
    assert str(run / "checkpoints" / "step-00000003") in line
    assert ck.latest_checkpoint(str(run)).endswith("step-00000002") and not (run / "metrics.json").exists()
    monkeypatch.undo()
    assert main(args) == 0
    m = json.loads((run / "metrics.json").read_text())
    assert m["resumed_from"].endswith("step-00000002") and m["steps"] == 4
    assert [r["step"] for r in jsonl_rows(run) if "loss" in r] == [1, 2, 3, 4]


def test_a_refused_log_line_names_metrics_jsonl(tmp_path):
    """A metrics.jsonl line the disk refuses names the file (a write() error carries no file name)."""
    import errno

    from frod_cli.runs import JsonlWriter

    class Full:
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

        close = flush = lambda self: None

    writer = JsonlWriter(str(tmp_path / "metrics.jsonl"))
    writer.f.close()
    writer.f = Full()
    with pytest.raises(OSError) as e:
        writer.write({"step": 1})
    assert e.value.filename == str(tmp_path / "metrics.jsonl") and e.value.errno == errno.ENOSPC


# ---------------------------------------------------------------------------------------------------
# 4. One frod command at a time per run directory (frod_cli/runs/lock.py)
# ---------------------------------------------------------------------------------------------------
HOLDER = ("import sys, time\nfrom frod_cli.runs.lock import hold\nfor p in sys.argv[1:]:\n    hold(p)\n"
          "print('held', flush=True)\ntime.sleep(600)\n")


def hold_in_another_process(*paths: Path) -> subprocess.Popen:
    """A process holding the locks of `paths` (as a running frod command would) until it is killed."""
    p = subprocess.Popen([sys.executable, "-c", HOLDER, *map(str, paths)], stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.stdout.readline().strip() == "held"
    return p


def test_a_held_run_directory_is_refused_naming_the_holder_until_it_is_killed(data, tmp_path, capsys):
    """A run directory, a sweep directory and a comparison directory another process holds: each command refuses
    in one line naming that process, before it trains anything; once the holder is killed the lock is free."""
    from frod_cli.runs.lock import Lock, lock_file

    run, sweep, cmp = tmp_path / "run", tmp_path / "sweep", tmp_path / "cmp"
    holder = hold_in_another_process(run, sweep, cmp)
    try:
        assert main(["train", *tiny(data, "train.max_steps=2"), f"hydra.run.dir={run}"]) == 2
        line = one_error_line(capsys)
        assert f"run directory {run} is in use by another frod command (pid {holder.pid})" in line
        assert not run.exists()  # refused: the directory Hydra made for it is gone again
        assert main(["train", "-m", *tiny(data, "train.max_steps=2"), "train.seed=1,2", f"hydra.sweep.dir={sweep}"]) == 2
        assert f"sweep directory {sweep} is in use by another frod command (pid {holder.pid})" in one_error_line(capsys)
        assert not sweep.exists()
        assert main(["compare", *tiny(data, "train.max_steps=2"), f"hydra.run.dir={cmp}"]) == 2
        assert f"comparison directory {cmp} is in use by another frod command (pid {holder.pid})" in \
            one_error_line(capsys)
        assert not (cmp / "runs").exists() and not (cmp / "search").exists()
    finally:
        holder.kill()
        holder.wait()
    assert Path(lock_file(str(run))).exists()  # a killed holder leaves its file behind, but no lock
    Lock(str(run), "run directory").acquire().release()
    assert not Path(lock_file(str(run))).exists()  # released: removed


def test_the_lock_is_one_holder_at_a_time_and_never_inside_the_directory(tmp_path):
    from frod_cli import FrodCliError
    from frod_cli.runs.lock import Lock, lock_file

    run = tmp_path / "a" / "run"
    first = Lock(str(run), "run directory").acquire()
    assert lock_file(str(run)) == str(tmp_path / "a" / ".run.frod-lock") and not run.exists()
    with pytest.raises(FrodCliError, match=f"in use by another frod command \\(pid {os.getpid()}\\)"):
        Lock(str(run), "run directory").acquire()  # another open file: flock refuses it within one process too
    first.release()
    Lock(str(run), "run directory").acquire().release()
    assert not (tmp_path / "a").exists()  # the parent made for the lock file goes with it


@pytest.mark.slow
def test_two_trains_started_together_into_one_directory(data, tmp_path):
    """Two `frod train` of one run directory started at the same moment: one trains, the other refuses in one line
    (the directory held by the winner's pid, or, had it started after the end, holding a finished run); the
    directory ends with the winner's run alone, its metrics.jsonl unmixed."""
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "frod_cli.cli", "train", *tiny(data, "train.max_steps=2", "train.eval_every=2"),
           f"hydra.run.dir={run}"]
    procs = [subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    errs = [p.communicate(timeout=400)[1] for p in procs]
    codes = [p.returncode for p in procs]
    assert sorted(codes) == [0, 2], (codes, errs)
    winner, loser = procs[codes.index(0)], codes.index(2)
    err = [l for l in errs[loser].splitlines() if l.strip()]
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert (f"run directory {run} is in use by another frod command (pid {winner.pid})" in err[0]
            or "holds a finished run" in err[0]), err
    rows = jsonl_rows(run)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2] and sum(r.get("split") == "validation" for r in rows) == 1
    assert json.loads((run / "metrics.json").read_text())["steps"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no lock file left, no other directory


# ---------------------------------------------------------------------------------------------------
# 5. Safety
# ---------------------------------------------------------------------------------------------------
def test_no_pickle_loading_in_the_package():
    for f in (ROOT / "frod_cli").rglob("*.py"):
        text = f.read_text()
        assert "torch.load(" not in text and "pickle.load" not in text and "import pickle" not in text, f


def test_checkpoint_files_are_safetensors_json_yaml(tmp_path):
    path = ck.save_checkpoint(str(tmp_path), 1, trainable={"w": torch.ones(2)}, best=None,
                              optimizer_sd={"state": {}, "param_groups": []}, scheduler_sd={}, state={}, config={})
    assert {p.suffix for p in Path(path).iterdir()} <= {".safetensors", ".json", ".yaml"}


def test_override_naming_a_callable_is_refused(tmp_path, capsys):
    marker = tmp_path / "pwned"
    code = main(["train", "+hydra.callbacks.evil._target_=os.system", f"+hydra.callbacks.evil.command=touch {marker}",
                 f"hydra.run.dir={tmp_path / 'r'}"])
    assert code == 2
    assert "_target_" in one_error_line(capsys)
    assert not marker.exists() and not (tmp_path / "r").exists()


def test_recipe_naming_a_callable_is_refused(tmp_path, capsys):
    d = tmp_path / "recipe"
    d.mkdir()
    (d / "evil.yaml").write_text("# @package _global_\n# frod train recipe=evil\nhydra:\n  callbacks:\n"
                                 "    evil:\n      _target_: subprocess.call\n      args: [touch, pwned]\n")
    code = main(["train", "recipe=evil", f"hydra.searchpath=[file://{tmp_path}]", f"hydra.run.dir={tmp_path / 'r'}"])
    assert code == 2
    assert "subprocess.call" in one_error_line(capsys)


def test_remote_code_needs_the_explicit_flag(tmp_path, data, capsys):
    model = tmp_path / "custom"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({
        "model_type": "frod-custom-xyz", "auto_map": {"AutoConfig": "evil.EvilConfig",
                                                     "AutoModelForSequenceClassification": "evil.EvilModel"}}))
    (model / "evil.py").write_text(f"open({str(tmp_path / 'pwned')!r}, 'w').write('x')\n")
    code = main(["train", *tiny(data), f"model.name_or_path={model}", f"hydra.run.dir={tmp_path / 'r'}"])
    assert code == 2
    line = one_error_line(capsys)
    assert "trust_remote_code" in line or "custom" in line
    assert not (tmp_path / "pwned").exists()


# ---------------------------------------------------------------------------------------------------
# 6. Two processes (torchrun, gloo) == one process with the same global batch
# ---------------------------------------------------------------------------------------------------
DDP_ACCUMULATION = {"one_micro_batch": [], "accumulation_window": ["train.grad_accum=2", "method.accumulate=window"]}


def ddp_args(data: Path, accumulation: list) -> list:
    return tiny(data, "train.max_steps=6", "train.eval_every=3", "train.keep_checkpoints=true", "train.cpu=true",
                "+model.config_overrides.hidden_dropout_prob=0.0",
                "+model.config_overrides.attention_probs_dropout_prob=0.0", *accumulation)


@pytest.fixture(scope="module")
def ddp(data, tmp_path_factory):
    """One torchrun launch (tests/fsdp_runs.py: 2 CPU processes over gloo, each run after the other) of the
    two-process side of every DDP comparison in this module, each run in frod train's default directory under
    its folder, as a user's launch puts it: its work dir."""
    work = tmp_path_factory.mktemp("ddp")
    runs = [{"name": name, "default_dir": True,
             "args": [*[a for a in ddp_args(data, acc) if not a.startswith("train.batch_size")], "train.batch_size=4"]}
            for name, acc in DDP_ACCUMULATION.items()]
    runs.append({"name": "grpo", "default_dir": True, "args": [*GRPO, "train.batch_size=2"]})
    launch(work, runs)
    return work


def launched_run(ddp: Path, name: str) -> Path:
    runs = [p for p in (ddp / name / "runs").rglob("*") if p.is_dir() and p.parent.parent == ddp / name / "runs"]
    assert len(runs) == 1, runs  # one Hydra output directory, not one per rank
    return runs[0]


@pytest.mark.slow
@pytest.mark.parametrize("accumulation", list(DDP_ACCUMULATION))
def test_two_processes_match_one(data, ddp, tmp_path, accumulation):
    """DDP over gloo; with an accumulation window the FRoD gradients are all-reduced once per window."""
    args = ddp_args(data, DDP_ACCUMULATION[accumulation])
    one = tmp_path / "one"
    code, _ = run_verb("train", [*[a for a in args if not a.startswith("train.batch_size")], "train.batch_size=8",
                                 f"hydra.run.dir={one}"])
    assert code == 0
    two = launched_run(ddp, accumulation)
    m1, m2 = json.loads((one / "metrics.json").read_text()), json.loads((two / "metrics.json").read_text())
    assert m2["num_processes"] == 2 and len(m2["rank_fingerprints"]) == 2
    assert len(set(m2["rank_fingerprints"])) == 1  # FRoD basis and pattern identical on every rank
    assert m1["rank_fingerprints"][0] == m2["rank_fingerprints"][0]
    assert_rows_close(jsonl_rows(two), jsonl_rows(one), 1e-4)
    for split in ("validation", "test"):
        for k, v in m1[split].items():
            assert m2[split][k] == pytest.approx(v, abs=1e-4)
    a, b = final_values(one), final_values(two)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-4, rtol=0)
    assert not list(Path("/tmp").glob("frod-rank-*/.hydra"))


# ---------------------------------------------------------------------------------------------------
# 7. Online RL (task.type=grpo): a rollout kept across steps, resumed and split over processes
# ---------------------------------------------------------------------------------------------------
# Two optimization passes per rollout (the second against the stored rollout log-probabilities), DAPO's token
# mean (normalized over every process's tokens), the KL penalty (the reference with FRoD's adapter off), 2 micro-
# batches of completions per pass; a checkpoint after every step, so odd steps' checkpoints hold a kept rollout.
GRPO = ["recipe=grpo_smoke", "train.max_steps=4", "train.eval_every=2", "train.checkpoint_every=1",
        "train.keep_checkpoints=true", "train.cpu=true", "train.progress=false", "train.save_merged=false",
        "task.group_size=4", "task.max_completion_length=4", "task.num_iterations=2", "task.loss_type=dapo",
        "task.beta=0.05", "task.completions_per_backward=8", "task.eval_max_examples=4", "train.eval_batch_size=4",
        "optimizer.warmup_ratio=0.0", "optimizer.lr_scale=0.01"]


@pytest.fixture(scope="module")
def grpo_reference(tmp_path_factory):
    """The uninterrupted run: one process, 4 prompts per step."""
    run = tmp_path_factory.mktemp("grpo") / "run"
    assert run_verb("train", [*GRPO, "train.batch_size=4", f"hydra.run.dir={run}"])[0] == 0
    return run


def assert_same_grpo_run(got: Path, ref: Path, tol: float) -> None:
    a_rows, b_rows = jsonl_rows(got), jsonl_rows(ref)
    assert [sorted(r) for r in a_rows] == [sorted(r) for r in b_rows]
    for ra, rb in zip(a_rows, b_rows):  # relative: a tiny random model's log-probabilities are large numbers
        for k, v in ra.items():
            assert rb[k] == (pytest.approx(v, rel=tol, abs=1e-6) if isinstance(v, float) else v), (k, ra, rb)
    a, b = final_values(ref), final_values(got)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=tol, rtol=0)
    m1, m2 = json.loads((ref / "metrics.json").read_text()), json.loads((got / "metrics.json").read_text())
    for split in ("validation", "test"):
        assert m2[split] == pytest.approx(m1[split], abs=tol)
    assert m2["data_counts"] == m1["data_counts"]


@pytest.mark.slow
def test_grpo_resume_after_sigkill_matches_uninterrupted(grpo_reference, tmp_path):
    """Killed at a random step, then resumed from the newest checkpoint that holds a kept rollout (a kill before the
    next checkpoint was written): the same completions, losses, figures and final values."""
    rows = jsonl_rows(grpo_reference)
    assert "kl" in rows[0] and "reward/mean" in rows[0] and "reward/mean" not in rows[1]  # step 2 reuses step 1's
    assert rows[1]["ratio_min"] < 1.0 < rows[1]["ratio_max"]  # its second pass: the policy moved since the rollout
    run = tmp_path / "killed"
    seed = kill_seed()
    kill_at = random.Random(seed).randint(2, 3)
    print(f"FROD_TEST_SEED={seed}: kill after step {kill_at}")
    args = [*GRPO, "train.batch_size=4", f"hydra.run.dir={run}"]
    train_then_kill(args, run / "metrics.jsonl", kill_at, tmp_path)
    assert not (run / "metrics.json").exists()
    kept = max(step for step, _ in ck.step_dirs(str(run)) if step % 2 == 1)
    for step, d in ck.step_dirs(str(run)):
        if step > kept:
            shutil.rmtree(d)
    assert "buffer.rollout" in json.loads((Path(ck.latest_checkpoint(str(run))) / "strategy.json").read_text())
    assert run_verb("train", [*args[:-1], f"resume={run}"])[0] == 0
    assert json.loads((run / "metrics.json").read_text())["resumed_from"]
    assert_same_grpo_run(run, grpo_reference, 1e-6)


@pytest.mark.slow
def test_grpo_two_processes_match_one(grpo_reference, ddp):
    """torchrun, 2 CPU processes (gloo, DDP) x 2 prompts = 1 process x 4: each group's completions sampled on the
    process that holds its prompt, seeded by its row; the figures over both processes' completions."""
    two = launched_run(ddp, "grpo")
    assert json.loads((two / "metrics.json").read_text())["num_processes"] == 2
    assert_same_grpo_run(two, grpo_reference, 1e-4)
