"""frod_cli.compare on synthetic run directories (the layout frod train writes)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from frod_cli import compare

# method -> (loss at step s, per seed: (test accuracy, validation accuracy), trainable %, train time)
SPEC = {
    "frod": (lambda s: 2.0 / (1 + s / 10), [(0.80, 0.81), (0.84, 0.83)], 1.5, 20.0),
    "lora": (lambda s: 2.0 / (1 + s / 40), [(0.70, 0.71), (0.74, 0.73)], 0.5, 10.0),
    "full": (lambda s: 2.0 / (1 + s / 5), [(0.90, 0.90)], 100.0, 40.0),
}
STEPS = 100


def _write_run(d: Path, method: str, seed: int, job: int) -> None:
    loss, accs, pct, t = SPEC[method]
    test_acc, val_acc = accs[seed]
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text(f"- method={method}\n- train.seed={seed}\n- train.max_steps={STEPS}\n")
    (d / ".hydra" / "config.yaml").write_text(f"method:\n  name: {method}\ntrain:\n  seed: {seed}\n")
    lines = [{"step": s, "loss": loss(s) + 0.01 * seed, "lr": {"head": 1e-3}} for s in range(1, STEPS + 1)]
    lines.insert(50, {"step": 50, "split": "validation", "accuracy": 0.5, "best": True})  # not training loss
    (d / "metrics.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
    (d / "metrics.json").write_text(json.dumps({
        "method": method, "objective": "accuracy", "objective_mode": "max", "objective_value": val_acc,
        "validation": {"accuracy": val_acc}, "test": {"accuracy": test_acc, "f1": test_acc - 0.1},
        "trainable_params": int(pct * 1000), "trainable_percent": pct, "steps": STEPS,
        "train_time_s": t, "wall_time_s": t + 5,
    }))
    (d / "merged").mkdir()
    (d / "merged" / "metrics.json").write_text("{}")  # must not be taken for a run


@pytest.fixture()
def sweep(tmp_path):
    root = tmp_path / "multirun"
    job = 0
    for method, (_, accs, _, _) in SPEC.items():
        for seed in range(len(accs)):
            _write_run(root / str(job), method, seed, job)
            job += 1
    return root


def test_table_values_and_files(sweep, tmp_path):
    out = tmp_path / "cmp"
    s = compare.build_report(str(sweep), str(out), thresholds=[1.0, 0.5, 0.1], smooth_window=1)
    for f in ("report.md", "summary.json", "loss_curves.png", "metric_vs_params.png", "steps_to_loss.png"):
        assert (out / f).stat().st_size > 0, f
    assert s["split"] == "test" and s["objective"] == "accuracy"
    g = s["groups"]
    assert set(g) == {"frod", "lora", "full"}  # the seed does not split a group; merged/ is no run
    assert g["frod"]["test"]["accuracy"]["mean"] == pytest.approx(0.82)
    assert g["frod"]["test"]["accuracy"]["std"] == pytest.approx(0.0282843, abs=1e-6)  # sample std
    assert g["frod"]["validation"]["accuracy"]["mean"] == pytest.approx(0.82)
    assert g["full"]["test"]["accuracy"] == {"mean": 0.9, "std": 0.0, "n": 1}
    assert g["lora"]["time_per_step_s"]["mean"] == pytest.approx(0.1)
    assert sorted(map(str, g["frod"]["seeds"])) == ["0", "1"]
    md = (out / "report.md").read_text()
    assert "| frod | 2 | 0.8200 ± 0.0141 | 0.8200 ± 0.0283 | 0.7200 ± 0.0283 | 1.500 ± 0.000 | 1,500 | 100 ± 0 | 0.2000 ± 0.0000 |" in md
    assert "| full | 1 | 0.9000 | 0.9000 |" in md
    assert json.loads((out / "summary.json").read_text())["groups"]["lora"]["trainable_percent"]["mean"] == 0.5


def test_steps_to_threshold(sweep, tmp_path):
    s = compare.build_report(str(sweep), str(tmp_path / "c"), thresholds=[1.0, 0.5, 0.1], smooth_window=1)
    g = s["groups"]
    # loss 2/(1+s/k) <= 1  <=>  s >= k (seed 1 adds 0.01: one or two steps later)
    assert g["full"]["steps_to_loss"]["1.0"]["per_run"] == [5]
    assert g["frod"]["steps_to_loss"]["1.0"]["per_run"] == [10, 11]
    assert g["lora"]["steps_to_loss"]["1.0"]["per_run"] == [40, 41]
    assert g["frod"]["steps_to_loss"]["1.0"]["mean"] == pytest.approx(10.5)
    # 0.5 needs s >= 3k: lora (k=40) never gets there within 100 steps
    assert g["lora"]["steps_to_loss"]["0.5"] | {"per_run": None} == {
        "mean": None, "std": None, "n": 0, "reached": 0, "runs": 2, "per_run": None}
    assert g["frod"]["steps_to_loss"]["0.5"]["per_run"] == [30, 31]
    md = (tmp_path / "c" / "report.md").read_text()
    assert "| lora | 40.5 ± 0.7 (2/2) | - | - |" in md


def test_smoothing_delays_threshold_and_default_thresholds(sweep, tmp_path):
    raw = compare.build_report(str(sweep), str(tmp_path / "a"), thresholds=[1.0], smooth_window=1)
    sm = compare.build_report(str(sweep), str(tmp_path / "b"), thresholds=[1.0], smooth_window=10)
    assert sm["groups"]["frod"]["steps_to_loss"]["1.0"]["mean"] > raw["groups"]["frod"]["steps_to_loss"]["1.0"]["mean"]
    d = compare.build_report(str(sweep), str(tmp_path / "d"))
    assert len(d["thresholds"]) == 4 and d["thresholds"][0] > d["thresholds"][-1] > 0


def test_smooth_and_mean_curve():
    assert compare.smooth([4, 2, 0, 2], 2).tolist() == [4, 3, 1, 1]
    runs = [{"loss": [(1, 1.0), (2, 3.0), (3, 5.0)]}, {"loss": [(1, 3.0), (2, 5.0)]}]
    x, m, sd = compare.mean_curve(runs)
    assert x.tolist() == [1, 2] and m.tolist() == [2.0, 4.0] and sd == pytest.approx([1.41421356] * 2)


def test_grouping_keeps_varying_overrides_apart(tmp_path):
    root = tmp_path / "sw"
    for job, lr in enumerate(["1e-3", "1e-4"]):
        _write_run(root / str(job), "lora", 0, job)
        ov = root / str(job) / ".hydra" / "overrides.yaml"
        ov.write_text(ov.read_text() + f"- optimizer.group_lr.adapter={lr}\n")
    s = compare.build_report(str(root), str(tmp_path / "o"))
    assert set(s["groups"]) == {"lora optimizer.group_lr.adapter=1e-3", "lora optimizer.group_lr.adapter=1e-4"}


def test_validation_split_when_no_test_and_main(tmp_path, capsys):
    root = tmp_path / "sw"
    _write_run(root / "0", "frod", 0, 0)
    m = json.loads((root / "0" / "metrics.json").read_text())
    del m["test"]
    (root / "0" / "metrics.json").write_text(json.dumps(m))
    assert compare.main([str(root), "--thresholds", "1.0"]) == 0
    assert "report.md" in capsys.readouterr().out
    s = json.loads((root / "compare" / "summary.json").read_text())
    assert s["split"] == "validation" and s["groups"]["frod"]["validation"]["accuracy"]["mean"] == pytest.approx(0.81)
    # a second run of the command does not take its own output for runs
    assert compare.main([str(root)]) == 0
    assert compare.main([str(tmp_path / "empty")]) == 2
    assert "no run directory" in capsys.readouterr().err


def test_a_loss_that_does_not_start_positive_gets_no_steps_to_loss_table(sweep, tmp_path):
    """GRPO's policy loss is zero on average at every step: fractions of its start are no thresholds (a table of
    "loss <= -0" columns); the report says why instead, and thresholds given by hand still make the table."""
    for f in sweep.rglob("metrics.jsonl"):
        rows = [json.loads(l) for l in f.read_text().splitlines()]
        f.write_text("".join(json.dumps({**r, "loss": 1e-4 * (-1) ** r["step"]} if "loss" in r else r) + "\n"
                             for r in rows))
    s = compare.build_report(sweep, tmp_path / "rep")
    assert s["thresholds"] == [] and abs(s["loss_start"]) < 1e-3
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "Steps to reach" not in md and "No steps-to-loss table" in md and "loss ≤" not in md
    assert not (tmp_path / "rep" / "steps_to_loss.png").exists()
    given = compare.build_report(sweep, tmp_path / "rep2", thresholds=[0.5])
    assert given["thresholds"] == [0.5] and "Steps to reach" in (tmp_path / "rep2" / "report.md").read_text()


def test_frod_compare_on_a_directory_reports_only(sweep, capsys):
    from frod_cli.cli import main

    assert main(["compare", str(sweep), "--out", str(sweep / "rep")]) == 0
    s = json.loads((sweep / "rep" / "summary.json").read_text())
    assert set(s["groups"]) == {"frod", "lora", "full"}


# ---------------------------------------------------------------------------------------------
# `frod compare recipe=...`: the search and the seeded comparison, end to end (tiny BERT, subprocesses)
# ---------------------------------------------------------------------------------------------
TINY_COMPARE = [
    "model=tiny_bert", "task.max_train_samples=64", "task.max_eval_samples=32", "task.max_length=24",
    "train.max_steps=3", "train.batch_size=16", "train.eval_batch_size=32", "train.eval_every=3",
    "train.log_every=1", "train.save_merged=false",
    "compare.only=[frod,lora]", "compare.methods.lora=['optimizer.group_lr.adapter=0.002']",
    "compare.lr_scales=[0.5,4.0]", "compare.seeds=[1]", "compare.jobs=2",
]


@pytest.mark.slow
def test_compare_verb_search_then_seeds(tmp_path):
    from frod_cli.cli import main

    root = tmp_path / "cmp"
    assert main(["compare", *TINY_COMPARE, "compare.stage=both", f"hydra.run.dir={root}"]) == 0
    best = json.loads((root / "search" / "best.json").read_text())
    assert set(best) == {"frod", "lora"}
    md = (root / "search" / "search.md").read_text()
    for method, scale in best.items():
        # the winner is the search run with the best validation objective, read back from its metrics.json
        vals = {x: json.loads((root / "search" / f"{method}_lr{compare._scale_tag(x)}" / "metrics.json").read_text())
                ["objective_value"] for x in (0.5, 4.0)}
        assert vals[scale] == max(vals.values())
        # search.md: the method's row bolds the winner's value and names its multiple in the last column
        row = next(line for line in md.splitlines() if line.startswith(f"| {method} |"))
        assert f"**{vals[scale]:.4f}**" in row and row.endswith(f"| x{scale:g} |"), row
        for seed in (1,):
            run = root / "runs" / f"{method}_s{seed}"
            overrides = (run / ".hydra" / "overrides.yaml").read_text()
            assert f"optimizer.lr_scale={scale!r}" in overrides and f"train.seed={seed}" in overrides
            cfg = (run / ".hydra" / "config.yaml").read_text()
            assert f"lr_scale: {scale!r}" in cfg
    # the seed the search used is not trained twice: the winner's run is reused (hard links)
    # output_dir= names the comparison's directory (its runs each get their own folder inside, as above)
    assert main(["compare", *TINY_COMPARE, "compare.seeds=[42]", "compare.stage=both", f"output_dir={root}"]) == 0
    for method, scale in best.items():
        reused = root / "runs" / f"{method}_s42" / "metrics.json"
        assert reused.read_text() == (root / "search" / f"{method}_lr{compare._scale_tag(scale)}" / "metrics.json").read_text()
    lora_cfg = (root / "runs" / "lora_s1" / ".hydra" / "config.yaml").read_text()
    assert "adapter: 0.002" in lora_cfg  # the method's own overrides reach its runs
    s = json.loads((root / "report" / "summary.json").read_text())
    assert set(s["groups"]) == {"frod", "lora"}  # one row per method: its own rates are not a label
    assert all(len(g["runs"]) == 2 for g in s["groups"].values())  # seed 1 and the reused 42
    for f in ("report.md", "loss_curves.png", "metric_vs_params.png"):
        assert (root / "report" / f).exists(), f
    # a second call finds every run finished and only rewrites the report
    before = {p: p.stat().st_mtime_ns for p in (root / "runs").glob("*/metrics.json")}
    assert main(["compare", *TINY_COMPARE, f"hydra.run.dir={root}"]) == 0
    assert before == {p: p.stat().st_mtime_ns for p in (root / "runs").glob("*/metrics.json")}


@pytest.mark.parametrize("args, msg", [
    (["compare.only=[frod,nope]"], "compare.only names ['nope']"),
    (["compare.stage=later"], "compare.stage must be"),
    (["-m"], "drop -m"),
    (["resume=somewhere"], "takes no resume="),
])
def test_compare_verb_refusals(tmp_path, capsys, args, msg):
    from frod_cli.cli import main

    assert main(["compare", *TINY_COMPARE, *args, f"hydra.run.dir={tmp_path / 'c'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and msg in err[0], err
    assert not (tmp_path / "c" / "runs").exists()


def test_compare_refuses_a_finished_train_run_as_its_directory(tmp_path, capsys):
    """output_dir= naming a finished frod train run: one line, and the run is left as it was (nothing added)."""
    from frod_cli.cli import main

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text("{}")
    assert main(["compare", *TINY_COMPARE, f"output_dir={run}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds a finished frod train run" in err[0], err
    assert [p.name for p in run.iterdir()] == ["metrics.json"]


def test_lr_scale_multiplies_every_group():
    import torch
    from omegaconf import OmegaConf

    from frod_cli.config import OptimizerConfig
    from frod_cli.training.builders import build_optimizer

    cfg = OmegaConf.structured(OptimizerConfig(lr=1e-3, group_lr={"head": 4e-3}, lr_scale=0.5))
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = build_optimizer(cfg, {"head": [a], "sparse": [b]})
    assert {g["name"]: g["lr"] for g in opt.param_groups} == {"head": 2e-3, "sparse": 5e-4}


def test_finished_run_is_reused_only_with_its_own_settings(tmp_path):
    """A re-run skips finished runs, but a run of the same name trained with other rates (a changed
    search winner) is refused instead of silently entering the report."""
    run_dir = tmp_path / "runs" / "frod_s1"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / "metrics.json").write_text("{}")
    (run_dir / ".hydra" / "overrides.yaml").write_text(
        "- recipe=compare/x\n- method=frod\n- optimizer.lr_scale=3.0\n- train.seed=1\n- train.progress=false\n")
    planned = {"name": "frod_s1", "method": "frod", "overrides": ["optimizer.lr_scale=3.0", "train.seed=1"]}
    [r] = compare.execute([planned], ["recipe=compare/x"], tmp_path / "runs", jobs=1, title="t", threads=1)
    assert r["skipped"] and r["rc"] == 0
    changed = {**planned, "overrides": ["optimizer.lr_scale=10.0", "train.seed=1"]}
    with pytest.raises(ValueError, match="optimizer.lr_scale=10.0"):
        compare.execute([changed], ["recipe=compare/x"], tmp_path / "runs", jobs=1, title="t", threads=1)


def test_plot_eval_curves_reads_validation_rows_or_training_rows(sweep, tmp_path, capsys):
    """scripts/plot_eval_curves.py: a validation metric, a training-row key (`train:<key>`, e.g. GRPO's sampled
    reward), and a metric no run logged (exit 2, one line)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("plot_eval_curves", Path(__file__).parents[1] / "scripts" / "plot_eval_curves.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    val = mod.curves(str(sweep), "accuracy")
    assert {m: len(r) for m, r in val.items()} == {"frod": 2, "lora": 2, "full": 1} and val["full"][0] == [(50, 0.5)]
    train = mod.curves(str(sweep), "train:loss")
    assert len(train["frod"][0]) == STEPS and train["frod"][0][0] == (1, pytest.approx(SPEC["frod"][0](1)))
    assert mod.main([str(sweep), "train:loss", str(tmp_path / "t.png")]) == 0 and (tmp_path / "t.png").stat().st_size
    assert mod.main([str(sweep), "nope", str(tmp_path / "n.png")]) == 2
    assert "logged nope" in capsys.readouterr().err
