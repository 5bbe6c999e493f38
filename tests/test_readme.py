"""The README's commands run as printed. Every command of its ```bash blocks is listed in COMMANDS with what this
test does with it: run in one of the GROUPS (each group in a temp directory of its own, its commands in README
order, with the README's placeholders bound to what the commands before it made and to small files this test
writes), or `hub` / `gpu` / `ci` (needs the Hugging Face Hub, a GPU, or is the test command itself: never run).
A README command missing from COMMANDS fails the test, so a new command cannot go untested.

Size: commands run as printed plus a cap on steps and examples appended at the end (CAP), so the suite stays
short; the cap changes how long a run trains or how many examples it scores, never which recipe, model, data or
method it uses."""
from __future__ import annotations

import csv
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from frod_cli.cli import main

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
CAP = ["train.max_steps=2", "train.eval_every=2", "task.max_train_samples=24", "task.max_eval_samples=8",
       "train.batch_size=8", "train.eval_batch_size=8", "train.progress=false"]
GENERATION_CAP = ["task.generation.max_examples=2", "task.generation.max_new_tokens=4"]  # task types that generate
GENERATE_CAP = ["max_new_tokens=4"]
EVAL_CAP = ["task.max_eval_samples=8"]  # only where the command names a task (a run's own task is already capped)
COMPARE_CAP = ["compare.only=[frod]", "compare.seeds=[42]", "compare.lr_scales=[1.0]"]
SWEEP_CAP = ["hydra.sweeper.n_trials=2"]

# The groups run independently of each other (a command reads only what its own group made before it).
GROUPS = ("classify", "sweep", "lm", "launch")
# README command (comments dropped, continuation lines joined) -> one of GROUPS | hub | gpu | ci
COMMANDS = {
    "make run": "ci",
    "make test": "ci",
    "frod train": "classify",
    "frod train recipe=vit_cifar": "hub",
    "frod train recipe=vit_cifar --cfg job": "classify",
    "frod train train.max_steps=200 method.sparse_rate=0.05 optimizer.group_lr.scale=1e-3": "classify",
    "frod eval path=runs/quickstart/2025-01-01_12-00-00": "classify",
    "frod eval path=runs/quickstart/2025-01-01_12-00-00 use_adapter=true output=eval_adapter.json": "classify",
    "frod eval path=some/merged/checkpoint task=twitter_sentiment splits=[test]": "classify",
    "frod merge run=runs/quickstart/2025-01-01_12-00-00 overwrite=true": "classify",
    "frod train -m method.sparse_rate=0.01,0.02 train.seed=1,2": "sweep",
    "frod train -m hparams_search=frod_optuna hydra.sweeper.n_trials=20": "sweep",
    "frod compare recipe=compare/text_minilm": "sweep",
    "frod compare recipe=compare/text_minilm compare.stage=search": "sweep",
    "frod compare multirun/quickstart/<date>": "sweep",
    "frod train task=local_text task.data_files.train=my.csv task.text_fields=[review] task.label_field=stars": "classify",
    "frod train recipe=vit_cifar task=local_images task.data_files.train=imgs.parquet": "hub",
    "frod train recipe=vit_cifar model=tiny_vit task=local_images task.data_files.train=imgs.parquet train.max_steps=4":
        "classify",
    "frod train recipe=sft_smoke": "lm",
    'frod generate path=runs/sft_smoke/<date_time> prompt="What is 2 plus 3?"': "lm",
    "frod generate path=<run dir> prompts=questions.txt max_new_tokens=128 do_sample=true temperature=0.7 top_p=0.9":
        "lm",
    "frod train recipe=metamath_llama3b [method=lora|full|...]": "hub",
    "frod train recipe=sft_smoke model=tiny_llama_chat task.data_format=chat task.data_files.train=chat.jsonl": "lm",
    "frod train task=local_text task.type=causal_lm model=tiny_llama_chat task.data_files.train=chat.jsonl "
    "task.data_format=chat": "lm",
    "frod train recipe=sft_smoke task.data_format=sharegpt task.chat_template=chatml task.data_files.train=share.jsonl":
        "lm",
    "frod train recipe=sft_mixture": "lm",
    "frod train recipe=dpo_smoke": "lm",
    "frod train recipe=sft_smoke hydra.run.dir=runs/sft": "lm",
    "frod train recipe=dpo_smoke model.name_or_path=runs/sft method=lora task.loss=ipo": "lm",
    "frod train recipe=grpo_smoke": "lm",
    "frod train recipe=grpo_smoke model.quantization=nf4": "lm",
    "frod train recipe=grpo_smoke model.name_or_path=runs/sft method=lora": "lm",  # GRPO from an SFT run
    "frod train recipe=grpo_smoke task.loss_type=dapo task.num_iterations=2 task.beta=0.05 "
    "'task.rewards=[{name: math}, {name: my_rewards.py:has_digit, weight: 0.5}]'": "lm",
    "frod train recipe=sft_smoke model=tiny_llama_chat task.streaming=true task.max_eval_samples=8 "
    "task.data_format=chat task.data_files.train=chat.jsonl": "lm",
    "accelerate launch --multi_gpu --num_processes 4 -m frod_cli.cli train recipe=vit_cifar "
    "train.mixed_precision=bf16": "gpu",
    "torchrun --standalone --nproc_per_node 4 -m frod_cli.cli train recipe=vit_cifar train.mixed_precision=bf16": "gpu",
    "OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 -m frod_cli.cli train train.cpu=true": "launch",
    "OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 -m frod_cli.cli train recipe=qfrod_smoke "
    "train.fsdp.enabled=true train.cpu=true": "launch",
    "frod export path=<run dir> format=merged dtype=bfloat16 output=exports/merged": "lm",
    "frod export path=<run dir> format=lora rank=16 output=exports/lora16": "lm",
    "frod export path=<run dir> format=lora energy=0.9 output=exports/lora_e90": "lm",
    "frod train recipe=sft_smoke +model.config_overrides.num_hidden_layers=4 hydra.run.dir=runs/sft_smoke_4blocks":
        "lm",
    "frod export path=runs/sft_smoke_4blocks format=peft output=exports/peft": "lm",
    "frod push path=runs/sft_smoke/<date_time> repo=me/sft-smoke-frod dry_run=true": "lm",
    "frod push path=runs/sft_smoke/<date_time> repo=me/sft-smoke-frod private=true": "hub",
    "frod push path=exports/lora16 repo=me/sft-smoke-lora16 revision=rank16": "hub",
    "frod train recipe=sft_smoke train.push_to_hub=me/sft-smoke-frod": "hub",
    "frod eval path=runs/sft_smoke/<date_time> harness=smoke": "lm",
    "frod eval path=runs/sft_smoke/<date_time> harness=smoke use_adapter=true output=harness_adapter.json": "lm",
    "frod eval path=<run dir> harness=commonsense": "hub",
    "frod eval path=<run dir> harness.tasks=[arc_easy,hellaswag] harness.num_fewshot=5 harness.limit=200": "hub",
    "frod eval path=runs/sft_smoke/<date_time> harness.tasks=[my_task] harness.include_path=my_tasks output=my_task.json": "lm",
}
STARTS = ("frod", "make", "OMP_NUM_THREADS", "torchrun", "accelerate")


def readme_commands(text: str) -> list:
    """The commands of the README's ```bash blocks, in order: comments dropped, `\\` continuations joined."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        cmd = ""
        for line in block.split("\n"):
            line = re.sub(r"\s+#.*$", "", line).rstrip()
            if cmd:
                cmd += " " + line.strip()
            elif line.strip().startswith(STARTS):
                cmd = line.strip()
            if cmd and not cmd.endswith("\\"):
                out.append(" ".join(cmd.replace("\\", " ").split()))
                cmd = ""
    return out


def newest(d: Path) -> Path:
    runs = sorted((p for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.stat().st_mtime)
    assert runs, f"no run under {d}"
    return runs[-1]


def bind(cmd: str, cwd: Path) -> str:
    """The README's placeholders -> what the commands before made in `cwd`."""
    table = {
        "runs/quickstart/2025-01-01_12-00-00": lambda: newest(cwd / "runs" / "quickstart"),
        "some/merged/checkpoint": lambda: newest(cwd / "runs" / "quickstart") / "merged",
        "multirun/quickstart/<date>": lambda: newest(cwd / "multirun" / "quickstart"),
        "runs/sft_smoke/<date_time>": lambda: newest(cwd / "runs" / "sft_smoke"),
        "<run dir>": lambda: newest(cwd / "runs" / "sft_smoke"),
    }
    for key, where in table.items():
        if key in cmd:
            cmd = cmd.replace(key, str(where()))
    assert "<" not in cmd, f"unbound placeholder in {cmd!r}"
    return cmd


def write_user_files(cwd: Path) -> None:
    """The small files the README's commands name, written here (never the packaged sets)."""
    import numpy as np
    import pandas as pd

    with open(cwd / "my.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["review", "stars"])
        for i in range(40):
            w.writerow([f"{'great fine good' if i % 2 else 'awful bad poor'} item {i}", "5" if i % 2 else "1"])
    rng = np.random.default_rng(0)
    images = [{"bytes": _png(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8))} for _ in range(40)]
    pd.DataFrame({"img": images, "label": [i % 3 for i in range(40)]}).to_parquet(cwd / "imgs.parquet")
    rows = [{"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                          {"role": "assistant", "content": str(a + b)}]} for a in range(6) for b in range(6)]
    (cwd / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    share = [{"conversations": [{"from": "human", "value": f"Double {a}."}, {"from": "gpt", "value": str(2 * a)}]}
             for a in range(36)]
    (cwd / "share.jsonl").write_text("".join(json.dumps(r) + "\n" for r in share))
    (cwd / "questions.txt").write_text("What is 2 plus 3?\nName a colour.\n")
    tasks = cwd / "my_tasks"  # the README's own lm-evaluation-harness task (section 11)
    tasks.mkdir()
    mc = [{"question": f"What is {a} plus {a}?", "choices": [str(2 * a), str(a + 3)], "gold": 0} for a in range(6)]
    (tasks / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mc))
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    rewards = re.search(r"```python\n(# my_rewards.py\n.*?)```", readme, re.S).group(1)  # the README's GRPO reward
    (cwd / "my_rewards.py").write_text(rewards)
    task_yaml = re.search(r"```yaml\n(task: my_task\n.*?)```", readme, re.S).group(1)
    (tasks / "my_task.yaml").write_text(task_yaml.replace("/abs/path/to/rows.jsonl", str(tasks / "rows.jsonl")))


def _png(pixels) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def first_value(value: str) -> str:
    """A sweep's first value (`a,b` -> `a`): the first comma outside brackets (a list or dict value is one value)."""
    depth = 0
    for i, ch in enumerate(value):
        if ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            return value[:i]
    return value


def generation_cap(argv: list) -> list:
    """GENERATION_CAP where the command's task generates (its type has `task.generation`: a task type's config refuses
    keys of another type), found by composing the command's config as frod train does (a sweep's first value)."""
    from conftest import compose_train

    from frod_cli.commands.train import task_type_switch, user_data_args

    overrides = [a.split("=", 1)[0] + "=" + first_value(a.split("=", 1)[1]) for a in argv[1:]
                 if "=" in a and not a.startswith(("-", "hydra.", "compare."))]
    task = compose_train(task_type_switch(user_data_args(overrides))).task
    return GENERATION_CAP if "generation" in task else []


def capped(argv: list) -> list:
    """The command with the size cap: a capped key the README also sets takes the cap's value."""
    verb, cap = argv[0], []
    if verb == "generate":
        cap = GENERATE_CAP
    elif verb == "eval" and any(a.startswith("task=") for a in argv[1:]):
        cap = EVAL_CAP
    elif verb == "compare" and any("=" in a for a in argv[1:]):
        cap = CAP + COMPARE_CAP + generation_cap(argv)
    elif verb == "train" and "--cfg" not in argv:
        cap = CAP + generation_cap(argv) + (SWEEP_CAP if any(a.startswith("hparams_search=") for a in argv) else [])
    keys = {c.split("=", 1)[0] for c in cap}
    return [a for a in argv if a.split("=", 1)[0] not in keys] + cap


def run_command(cmd: str, cwd: Path) -> int:
    parts = shlex.split(cmd)
    env = dict(os.environ)
    while parts and re.fullmatch(r"[A-Z_]+=\S+", parts[0]):
        key, value = parts.pop(0).split("=", 1)
        env[key] = value
    if parts[0] == "frod":
        return main(capped(parts[1:]))
    # torchrun: a launch of its own processes (gloo on CPU)
    i = parts.index("frod_cli.cli")
    launch = [sys.executable, "-m", "torch.distributed.run", *parts[1:i - 1], "-m", "frod_cli.cli",
              *capped(parts[i + 1:])]
    done = subprocess.run(launch, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.returncode


def test_every_readme_command_is_classified():
    found = readme_commands((ROOT / "README.md").read_text(encoding="utf-8"))
    missing = [c for c in found if c not in COMMANDS]
    assert not missing, f"README commands this test does not know (add them to COMMANDS): {missing}"
    stale = [c for c in COMMANDS if c not in found]
    assert not stale, f"COMMANDS lists commands the README no longer has: {stale}"


def run_group(group: str, tmp_path: Path, monkeypatch, capsys) -> None:
    """The group's README commands in README order, in a temp directory of their own."""
    monkeypatch.chdir(tmp_path)
    write_user_files(tmp_path)
    ran, last = 0, 0
    for cmd in readme_commands((ROOT / "README.md").read_text(encoding="utf-8")):
        if COMMANDS.get(cmd) != group:
            continue
        while int(time.time()) == last:  # run directories are named by the second: two commands never share one
            time.sleep(0.05)
        bound = bind(cmd, tmp_path)
        code = run_command(bound, tmp_path)
        last = int(time.time())
        err = capsys.readouterr().err
        assert code == 0, f"{cmd!r} exited {code}: {err[-2000:]}"
        ran += 1
    assert ran, f"no README command in group {group!r}"


# One class per group: pytest-xdist's loadscope gives each class to a worker of its own choosing, so the groups
# spread over the workers instead of running one after another on one.
class TestClassify:
    def test_commands_run_as_printed(self, tmp_path, monkeypatch, capsys):
        run_group("classify", tmp_path, monkeypatch, capsys)


class TestSweep:
    def test_commands_run_as_printed(self, tmp_path, monkeypatch, capsys):
        run_group("sweep", tmp_path, monkeypatch, capsys)


class TestLm:
    def test_commands_run_as_printed(self, tmp_path, monkeypatch, capsys):
        run_group("lm", tmp_path, monkeypatch, capsys)


class TestLaunch:
    def test_commands_run_as_printed(self, tmp_path, monkeypatch, capsys):
        run_group("launch", tmp_path, monkeypatch, capsys)


def test_every_group_has_its_class():
    assert {f"Test{g.capitalize()}" for g in GROUPS} <= set(globals())
