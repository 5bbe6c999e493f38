"""Several `frod train` runs in one multi-process launch (tests/test_fsdp.py), so that the interpreter start, the
imports and the process group's rendezvous are paid once:

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 tests/fsdp_runs.py runs.json

runs.json: a list of {"name": run directory under the working directory, "args": frod train arguments,
"resume_cut": optional step, "default_dir": optional, true: the run goes where `frod train` puts it by default
(`runs/<date>` under the folder `name`), as a user's torchrun launch does}. With resume_cut, the run resumes a copy of the run named `resume_of` as a kill right
after its checkpoint at that step would have left it (later checkpoints and metrics.json gone): rank 0 makes the
copy, the other ranks wait for it. An entry {"name": output directory, "script": a module of tests/} runs that
module's `run_in_launch(out, rank, world)` instead, in a gloo process group of its own (checks below the CLI that
need the ranks: tests/fsdp_window_grads.py). codes.json gets each run's exit code.

Each run after the first rendezvouses on a store of its own, hosted by rank 0 on a free port (`fresh_store`): the
torchrun agent's store still holds the keys of the previous run's process group, whose name the next one reuses,
and a rank reading those would connect to the closed group and wait forever."""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path


def cut_copy(source: Path, target: Path, step: int) -> None:
    """`source` as a run killed after its step-`step` checkpoint leaves it."""
    shutil.copytree(source, target)
    for d in (target / "checkpoints").iterdir():
        if d.name.startswith("step-") and int(d.name[5:]) > step:
            shutil.rmtree(d)
    for name in ("metrics.json", "predictions.jsonl"):
        (target / name).unlink(missing_ok=True)
    for name in ("merged", "adapter"):
        shutil.rmtree(target / name, ignore_errors=True)


def wait_for(path: Path) -> None:
    deadline = time.time() + 120
    while not path.exists() and time.time() < deadline:
        time.sleep(0.05)


def prepare_resume(run: dict, rank: int) -> list:
    target = Path(run["name"])
    marker = Path(f".{run['name']}.ready")
    if rank == 0:
        cut_copy(Path(run["resume_of"]), target, int(run["resume_cut"]))
        marker.touch()
    wait_for(marker)
    return [f"resume={target.resolve()}"]


def fresh_store(index: int, rank: int) -> None:
    """The rendezvous of run `index` on a TCP store of its own (see the module docstring)."""
    import socket

    port_file = Path(f".port-{index}")
    if rank == 0:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        port_file.with_suffix(".tmp").write_text(str(port))
        port_file.with_suffix(".tmp").rename(port_file)
    wait_for(port_file)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port_file.read_text(), TORCHELASTIC_USE_AGENT_STORE="False")


def run_script(run: dict) -> int:
    """tests/<script>.py's checks in this launch's processes, over a gloo process group of their own."""
    import importlib

    import torch.distributed as dist

    module = importlib.import_module(run["script"])  # tests/ is this script's directory: on sys.path
    dist.init_process_group("gloo")
    try:
        module.run_in_launch(Path(run["name"]).resolve(), dist.get_rank(), dist.get_world_size())
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return 0


def launch(work: Path, runs: list, timeout: int = 600) -> str:
    """For tests: this script under torchrun --standalone --nproc_per_node 2 in `work` (created) over `runs`; every
    run must exit 0. Returns the launch's output."""
    import subprocess

    work.mkdir(exist_ok=True)
    (work / "runs.json").write_text(json.dumps(runs))
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(root)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__, "runs.json"]
    r = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-4000:]
    codes = json.loads((work / "codes.json").read_text())
    assert codes == {run["name"]: 0 for run in runs}, (codes, r.stderr[-4000:])
    return r.stdout + r.stderr


def main(spec: str) -> None:
    from accelerate.state import AcceleratorState

    from frod_cli.cli import run_verb

    rank = int(os.environ.get("RANK", "0"))
    codes = {}
    for index, run in enumerate(json.loads(Path(spec).read_text())):
        if index:
            fresh_store(index, rank)
        if "script" in run:
            codes[run["name"]] = run_script(run)
            continue
        if run.get("default_dir"):  # Hydra's default run directory under `name`: the main process's, for both
            Path(run["name"]).mkdir(exist_ok=True)
            os.chdir(run["name"])
            codes[run["name"]], _ = run_verb("train", list(run["args"]))
            os.chdir("..")
        else:
            where = prepare_resume(run, rank) if "resume_cut" in run else [f"hydra.run.dir={run['name']}"]
            codes[run["name"]], _ = run_verb("train", [*run["args"], *where])
        AcceleratorState._reset_state(True)  # the next run starts its own process group (test-only)
    if rank == 0:
        Path("codes.json").write_text(json.dumps(codes))


if __name__ == "__main__":
    main(sys.argv[1])
