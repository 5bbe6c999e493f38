"""The preference task (frod_cli/tasks/preference.py): DPO, IPO and SimPO on pairs, the reference pass, resume,
two processes, SFT -> preference, and the refusals. A tiny random LLaMA (tiny:llama, hidden 32) on the packaged
pref_tiny pairs; the losses are checked against log-probabilities computed here from plain transformers outputs."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest
import torch
import torch.nn.functional as F

from conftest import compose_train, train_run
from frod_cli.cli import main, run_verb

ROOT = Path(__file__).resolve().parents[1]
TIMING = {"samples_per_s", "elapsed_s", "eta_s", "peak_memory_mb", "current_memory_mb"}


# ---------------------------------------------------------------------------------------------------
# In-process pieces: the task, its encoded pairs, a model, plain log-probabilities
# ---------------------------------------------------------------------------------------------------
def build(overrides: List[str]):
    """(cfg, task, encoded splits, base model, tokenizer) as `frod train recipe=dpo_smoke <overrides>` builds them."""
    from frod_cli.config import apply_per_method
    from frod_cli.training import builders as B

    cfg = compose_train(["recipe=dpo_smoke", *overrides])
    apply_per_method(cfg, overrides)
    task = B.build_task(cfg.task, int(cfg.train.seed))
    data = B.load_task_data(task)
    model, tok = B.load_base(cfg.model, task, int(cfg.train.seed))
    return cfg, task, B.encode_data(task, data, tok), model, tok


@pytest.fixture(scope="module")
def dpo():
    return build([])


def plain_logp(model, prompt: List[int], answer: List[int]) -> float:
    """log pi(answer | prompt): one unpadded sequence, transformers' logits, log-softmax, the answer's tokens."""
    ids = torch.tensor([list(prompt) + list(answer)])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    k = len(prompt)
    return float(sum(logp[k - 1 + j, t] for j, t in enumerate(answer)))


def pairs(encoded, split: str = "validation", n: int = 4) -> List[Dict]:
    return [encoded[split][i] for i in range(n)]


def test_pairs_are_the_prompt_then_each_answer_with_eos(dpo):
    """The plain layout: BOS + the prompt text's tokens, then each answer's tokens + EOS; nothing else."""
    _, _, encoded, _, tok = dpo
    row = encoded["train"][0]
    assert row["prompt"].startswith("### Instruction:\n") and row["prompt"].endswith("### Response:\n")
    assert row["prompt_ids"] == [tok.bos_token_id] + tok(row["prompt"], add_special_tokens=False)["input_ids"]
    for key in ("chosen", "rejected"):
        assert row[f"{key}_ids"] == tok(row[key], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert row["chosen"] != row["rejected"]


def test_prompt_tokens_carry_no_loss(dpo):
    """The gradient of the loss reaches the logits only at the positions that predict an answer token: the
    prompt and the padding carry none."""
    _, task, encoded, model, tok = dpo
    feats = [{**f, "ref_chosen": -5.0, "ref_rejected": -6.0} for f in pairs(encoded)]
    batch = task.collate(tok)(feats)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.detach().requires_grad_()

    class Fixed(torch.nn.Module):  # a "model" whose logits are the leaf above
        def forward(self, **_):
            return type("Out", (), {"logits": logits})()

    task.loss(Fixed(), batch).backward()
    touched = logits.grad.abs().sum(-1) > 0  # [2B, T]
    seqs = [(f["prompt_ids"], f[k]) for k in ("chosen_ids", "rejected_ids") for f in feats]
    for i, (prompt, answer) in enumerate(seqs):
        expected = torch.zeros(touched.shape[1], dtype=torch.bool)
        expected[len(prompt) - 1: len(prompt) - 1 + len(answer)] = True  # position t predicts token t + 1
        assert torch.equal(touched[i], expected), (i, touched[i].nonzero().flatten().tolist())


@pytest.mark.parametrize("loss", ["dpo", "ipo", "simpo"])
def test_batch_loss_equals_plain_transformers_computation(dpo, loss):
    """task.loss on a padded batch of 4 pairs (one forward for chosen and rejected) equals the formula applied
    here to log-probabilities of each unpadded sequence, the policy moved away from the reference model."""
    cfg, task, encoded, reference, tok = dpo
    from frod_cli.tasks.preference import Preference

    task_cfg = cfg.task.copy()
    task_cfg.loss = loss
    task_cfg.beta = 0.5
    task = Preference(task_cfg, 0)
    policy = type(reference)(reference.config)
    policy.load_state_dict(reference.state_dict())
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    feats = pairs(encoded, "train")
    ref = {k: [plain_logp(reference, f["prompt_ids"], f[f"{k}_ids"]) for f in feats] for k in ("chosen", "rejected")}
    pol = {k: [plain_logp(policy, f["prompt_ids"], f[f"{k}_ids"]) for f in feats] for k in ("chosen", "rejected")}
    n = {k: [len(f[f"{k}_ids"]) for f in feats] for k in ("chosen", "rejected")}
    feats = [{**f, "ref_chosen": ref["chosen"][i], "ref_rejected": ref["rejected"][i]} for i, f in enumerate(feats)]
    got = task.loss(policy.train(), task.collate(tok)(feats))
    w, l = torch.tensor(pol["chosen"]), torch.tensor(pol["rejected"])
    rw, rl = torch.tensor(ref["chosen"]), torch.tensor(ref["rejected"])
    nw, nl = torch.tensor(n["chosen"], dtype=torch.float64), torch.tensor(n["rejected"], dtype=torch.float64)
    beta = 0.5
    if loss == "dpo":
        want = -F.logsigmoid(beta * ((w - rw) - (l - rl))).mean()
    elif loss == "ipo":
        want = (((w - rw) / nw - (l - rl) / nl) - 1 / (2 * beta)).pow(2).mean()
    else:
        want = -F.logsigmoid(beta * w / nw - beta * l / nl - beta / 2).mean()
    assert float(got.detach()) == pytest.approx(float(want), rel=1e-4, abs=1e-5)
    assert abs(float(want) - math.log(2)) > 1e-3  # the policy really differs from the reference


def test_reference_pass_gives_plain_log_probabilities(dpo):
    from accelerate import Accelerator

    _, task, encoded, model, _ = dpo
    small = {"validation": encoded["validation"].select(range(6))}
    values = task.reference_logps(model, small, Accelerator(cpu=True), batch_size=4)["validation"]
    for i in range(6):
        f = small["validation"][i]
        want = [plain_logp(model, f["prompt_ids"], f[f"{k}_ids"]) for k in ("chosen", "rejected")]
        torch.testing.assert_close(values[i].double(), torch.tensor(want, dtype=torch.float64), atol=1e-4, rtol=1e-5)


METHODS = ["frod", "full", "lora", "dora", "pissa", "vera", "peft_frod"]


@pytest.mark.parametrize("method", METHODS)
def test_dpo_loss_is_ln2_at_initialization(method, dpo):
    """With the reference taken from the adapted model before any step (the recipe's reference pass), the DPO
    loss of a training batch (train mode) is ln 2 for every method: each starts exactly at its base model."""
    from accelerate import Accelerator

    from frod_cli.config import apply_per_method
    from frod_cli.tasks.preference import attach_reference
    from frod_cli.training import builders as B

    _, task, encoded, _, tok = dpo
    cfg = compose_train(["recipe=dpo_smoke", f"method={method}"])
    apply_per_method(cfg, [])
    base, _ = B.load_base(cfg.model, task, int(cfg.train.seed))
    model = B.build_method(cfg.method, task, cfg.model).adapt(base)
    split = {"train": encoded["train"].select(range(8))}
    values = task.reference_logps(model, split, Accelerator(cpu=True), batch_size=8)
    attach_reference(split, values)
    batch = task.collate(tok)([split["train"][i] for i in range(8)])
    loss = task.loss(model.train(), batch)
    assert float(loss.detach()) == pytest.approx(math.log(2), abs=1e-5), method
    assert loss.requires_grad


# ---------------------------------------------------------------------------------------------------
# Refusals: one line, exit 2, nothing written into the run directory
# ---------------------------------------------------------------------------------------------------
def write_jsonl(path: Path, rows: List[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def good_rows(n: int = 12) -> List[dict]:
    return [{"prompt": f"What is {i} plus 1?", "chosen": str(i + 1), "rejected": str(i + 2)} for i in range(n)]


def chat_rows(n: int = 12) -> List[dict]:
    def conv(q, a):
        return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]

    return [{"chosen": conv(f"What is {i} plus 1?", str(i + 1)), "rejected": conv(f"What is {i} plus 1?", str(i + 2))}
            for i in range(n)]


def _without_rejected(rows):
    del rows[2]["rejected"]
    return rows


def _empty_answer(rows):
    rows[4]["chosen"] = "  "
    return rows


def _other_prompt(rows):
    rows[3]["rejected"][0]["content"] = "What is 100 plus 1?"
    return rows


REFUSALS = [  # (id, rows, extra overrides, expected text)
    ("row_without_rejected", lambda: _without_rejected(good_rows()), [], "row 3: 'rejected' is missing"),
    ("empty_answer", lambda: _empty_answer(good_rows()), [], "row 5: the answer in 'chosen' is empty"),
    ("prompts_differ", lambda: _other_prompt(chat_rows()), ["model=tiny_llama_chat"],
     "row 4: 'chosen' and 'rejected' do not share their prompt (turn 1 differs)"),
    ("all_pairs_too_long", good_rows, ["task.max_length=4"], "every pair of split 'train' is too long"),
    ("no_rejected_column", lambda: [{"prompt": "a", "chosen": "b"}] * 12, [], "has no column 'rejected'"),
    ("unknown_loss", good_rows, ["task.loss=orpo"], "unknown task.loss 'orpo'"),
    ("gamma_without_simpo", good_rows, ["task.gamma=1.0"], "task.gamma is SimPO's target margin"),
]


@pytest.mark.parametrize("case,rows,extra,expected", REFUSALS, ids=[c[0] for c in REFUSALS])
def test_bad_preference_input_is_refused(case, rows, extra, expected, tmp_path, capsys):
    data = write_jsonl(tmp_path / "pairs.jsonl", rows())
    run = tmp_path / "run"
    code = main(["train", "recipe=dpo_smoke", f"task.data_files.train={data}", "train.progress=false", *extra,
                 f"hydra.run.dir={run}"])
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and "Traceback" not in err[0], err
    assert expected in err[0], err[0]
    assert not run.exists() or not any(p.is_file() for p in run.rglob("*")), sorted(run.rglob("*"))


def test_skip_malformed_drops_the_bad_rows(tmp_path):
    """task.skip_malformed=true: the row without `rejected` and the empty answer are dropped, the rest kept."""
    data = write_jsonl(tmp_path / "pairs.jsonl", _empty_answer(_without_rejected(good_rows(20))))
    _, _, encoded, _, _ = build([f"+task.data_files.train={data}", "task.source=local", "task.skip_malformed=true",
                                 "task.validation_fraction=0.2", "task.test_fraction=0.0"])
    assert sum(len(ds) for ds in encoded.values()) == 18
    assert all("What is 2 plus" not in p and "What is 4 plus" not in p for ds in encoded.values() for p in ds["prompt"])


def local_pairs(tmp_path: Path, rows: List[dict], *extra: str):
    """(task, encoded splits, tokenizer) of `rows` as the train file (a fifth carved out for validation)."""
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    _, task, encoded, _, tok = build([f"+task.data_files.train={data}", "task.source=local", "task.validation_fraction=0.2",
                                      "task.test_fraction=0.0", *extra])
    return task, encoded, tok


def test_identical_pairs_are_counted_and_dropped_with_skip_malformed(tmp_path, caplog):
    from omegaconf import open_dict

    rows = good_rows(20)
    for i in (3, 7, 11):
        rows[i]["rejected"] = rows[i]["chosen"]
    with caplog.at_level("WARNING", logger="frod_cli.tasks.preference"):
        task, encoded, tok = local_pairs(tmp_path, rows)
    assert sum(task.stats[s]["identical"] for s in task.stats) == 3 and sum(len(d) for d in encoded.values()) == 20
    assert "have the same chosen and rejected answer: they carry no preference" in caplog.text
    with open_dict(task.cfg):
        task.cfg.skip_malformed = True
    encoded = task.encode(task.load_data(), tok)
    assert sum(len(d) for d in encoded.values()) == 17
    assert all(c != r for d in encoded.values() for c, r in zip(d["chosen"], d["rejected"]))
    assert sum(task.stats[s]["kept"] for s in task.stats) == 17


def test_fit_prompt_drops_the_oldest_whole_turns_first():
    """layouts.fit_prompt, the one prompt-fitting rule (measured here in characters): oldest whole turns dropped
    back to a user turn, the system turn kept; then the answer is cut; then the system turn goes; None when the last
    user turn alone fills max_length."""
    from frod_cli.tasks.layouts import fit_prompt, message

    turns = [message("system", "s" * 10), message("user", "u" * 20), message("assistant", "a" * 20),
             message("user", "v" * 20), message("tool", "t" * 5), message("assistant", "b" * 20), message("user", "w" * 20)]
    size = lambda ts: sum(len(t["content"]) for t in ts)  # noqa: E731
    fit = lambda n, room: fit_prompt(turns, size, n, room)  # noqa: E731
    assert fit(115, 0) == (turns, 0)
    assert fit(100, 25) == ([turns[0], *turns[3:]], 2)  # u, a dropped: system + v, tool, b, w = 75
    assert fit(60, 25) == ([turns[0], turns[6]], 5)  # only system + w (30) leaves 25
    assert fit(40, 25) == ([turns[0], turns[6]], 5)  # no prompt leaves 25: system + w, the answer cut to 10
    assert fit(30, 25) == ([turns[6]], 6)  # system + w fills 30: w alone
    assert fit(20, 25) is None


def test_a_long_multi_turn_prompt_drops_its_oldest_turns_before_the_answer_is_cut(tmp_path, caplog):
    long = " ".join(["story"] * 40)
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": long},
              {"role": "assistant", "content": "ok"}, {"role": "user", "content": "What is 2 plus 3?"}]
    rows = [{"chosen": prompt + [{"role": "assistant", "content": "5"}],
             "rejected": prompt + [{"role": "assistant", "content": "6"}]} for _ in range(5)]
    with caplog.at_level("WARNING", logger="frod_cli.tasks.preference"):
        task, encoded, tok = local_pairs(tmp_path, rows, "model=tiny_llama_chat", "task.max_length=40")
    row = encoded["train"][0]
    kept = [prompt[0], prompt[3]]
    want = tok.apply_chat_template(kept, tokenize=False, add_generation_prompt=True)
    assert row["prompt"] == want and row["prompt_ids"] == tok(want, add_special_tokens=False)["input_ids"]
    assert row["chosen_ids"] == tok("5<|im_end|>\n", add_special_tokens=False)["input_ids"]  # the answer whole
    assert task.stats["train"]["prompts_shortened"] == 4 and task.stats["train"]["prompt_turns_dropped"] == 8
    assert "4 prompts shortened (8 oldest turns dropped in all, a system turn kept)" in caplog.text


# ---------------------------------------------------------------------------------------------------
# End to end: recipe=dpo_smoke, resume, two processes, SFT -> preference with LoRA
# ---------------------------------------------------------------------------------------------------
SMOKE = ["recipe=dpo_smoke", "train.progress=false", "train.cpu=true", "train.keep_checkpoints=true",
         "train.checkpoint_every=2"]


def rows_of(run: Path) -> List[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def checkpoints(run: Path) -> List[Path]:
    return sorted((run / "checkpoints").glob("step-*"))


def last_values(run: Path) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(checkpoints(run)[-1] / "trainable.safetensors"))


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    return train_run(tmp_path_factory, "dpo", SMOKE)


@pytest.mark.slow
def test_dpo_smoke_writes_the_preference_metrics(smoke_run):
    run, value = smoke_run
    m = json.loads((run / "metrics.json").read_text())
    names = {"loss", "reward_accuracy", "reward_margin", "chosen_logp", "rejected_logp"}
    for split in ("validation", "test"):
        assert names <= set(m[split]), m[split]
        assert 0.0 <= m[split]["reward_accuracy"] <= 1.0
    assert m["objective"] == "reward_accuracy" and value == pytest.approx(m["objective_value"])
    ref = m["task_preparation"]["reference"]
    assert ref["computed"] is True and ref["pairs"] == 320 and ref["seconds"] > 0 and ref["peak_memory_mb"] > 0
    assert (run / "reference_logps.safetensors").is_file()
    assert m["data_counts"]["splits"]["train"] == {"pairs": 256, "kept": 256, "truncated": 0, "dropped": 0,
                                                   "prompts_shortened": 0, "prompt_turns_dropped": 0, "identical": 0,
                                                   "converted": 0, "malformed": 0}
    rows = rows_of(run)
    assert rows[0]["step"] == 2 and abs(rows[0]["loss"] - math.log(2)) < 0.01  # the first steps start at ln 2
    evals = [r for r in rows if r.get("split") == "validation"]
    assert [r["step"] for r in evals] == [4, 8] and all(names <= set(r) for r in evals)
    preds = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    assert {p["split"] for p in preds} == {"validation", "test"} and len(preds) == 64
    p = preds[0]
    assert p["correct"] == (p["chosen_reward"] > p["rejected_reward"])
    assert p["chosen_reward"] == pytest.approx(0.1 * (p["chosen_logp"] - p["ref_chosen_logp"]), abs=1e-5)
    assert (run / "merged" / "config.json").is_file() and m["merge_max_abs_diff"] < 1e-4
    # frod eval on the run: merged/ scored against the stored reference gives the training's own numbers
    assert main(["eval", f"path={run}", f"output={run.parent / 'eval.json'}"]) == 0
    again = json.loads((run.parent / "eval.json").read_text())
    for split in ("validation", "test"):
        for k, v in m[split].items():
            assert again[split][k] == pytest.approx(v, abs=1e-5), (split, k)


@pytest.mark.slow
def test_resume_reads_the_reference_back(smoke_run, tmp_path, monkeypatch):
    """A run cut after step 6 resumes without running the reference pass again (it would fail here) and ends
    where the uninterrupted run ended."""
    from frod_cli.tasks.preference import Preference

    full, _ = smoke_run
    run = tmp_path / "cut"
    shutil.copytree(full, run)
    (run / "metrics.json").unlink()
    for d in checkpoints(run):
        if int(d.name.split("-")[1]) > 6:
            shutil.rmtree(d)
    stored = (run / "reference_logps.safetensors").read_bytes()

    def no_second_pass(*args, **kwargs):
        raise AssertionError("the reference pass ran again on resume")

    monkeypatch.setattr(Preference, "reference_logps", no_second_pass)
    code, _ = run_verb("train", [*SMOKE, f"resume={run}"])
    assert code == 0
    m = json.loads((run / "metrics.json").read_text())
    assert m["resumed_from"].endswith("step-00000006") and m["task_preparation"]["reference"]["computed"] is False
    assert (run / "reference_logps.safetensors").read_bytes() == stored
    a, b = last_values(full), last_values(run)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=0)
    assert m["validation"] == json.loads((full / "metrics.json").read_text())["validation"]


@pytest.mark.slow
def test_two_processes_equal_one(smoke_run, tmp_path):
    """torchrun, 2 CPU processes (gloo, DDP) x 2 pairs x 2 micro-batches, gradient checkpointing = 1 process x 8
    pairs: the same losses, evaluations and final values; each process ran its share of the reference pass."""
    one, _ = smoke_run
    work = tmp_path / "two"
    work.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "frod_cli.cli", "train", *SMOKE, "train.batch_size=2", "train.grad_accum=2",
           "train.gradient_checkpointing=true"]
    r = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    two = next(p for p in (work / "runs").rglob("metrics.json")).parent
    m1, m2 = json.loads((one / "metrics.json").read_text()), json.loads((two / "metrics.json").read_text())
    assert m2["num_processes"] == 2
    r1, r2 = rows_of(one), rows_of(two)
    assert [(r.get("step"), r.get("split")) for r in r1] == [(r.get("step"), r.get("split")) for r in r2]
    for a, b in zip(r1, r2):
        for k, v in a.items():
            if isinstance(v, float) and k != "epoch":
                assert b[k] == pytest.approx(v, rel=1e-4, abs=1e-6), (k, a, b)
    for split in ("validation", "test"):
        for k, v in m1[split].items():
            assert m2[split][k] == pytest.approx(v, rel=1e-4, abs=1e-6), (split, k)
    a, b = last_values(one), last_values(two)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=0)


@pytest.mark.slow
def test_sft_then_preference_with_lora(tmp_path):
    """recipe=sft_smoke, then recipe=dpo_smoke method=lora model.name_or_path=<that run>: the preference run
    starts from the SFT run's merged/ (its reference log-probabilities are the SFT model's)."""
    from transformers import AutoModelForCausalLM

    sft = tmp_path / "sft"
    assert run_verb("train", ["recipe=sft_smoke", "train.progress=false", "train.max_steps=2", "train.eval_every=2",
                              f"hydra.run.dir={sft}"])[0] == 0
    run = tmp_path / "dpo"
    code, _ = run_verb("train", ["recipe=dpo_smoke", "method=lora", f"model.name_or_path={sft}", "train.max_steps=2",
                                 "train.eval_every=2", "train.progress=false", f"hydra.run.dir={run}"])
    assert code == 0
    m = json.loads((run / "metrics.json").read_text())
    assert m["method"] == "lora" and m["model"] == str(sft)
    assert {"loss", "reward_accuracy", "reward_margin", "chosen_logp", "rejected_logp"} <= set(m["validation"])
    # the reference is the SFT model: a plain transformers computation with sft/merged gives the stored values
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    ref = load_file(str(run / "reference_logps.safetensors"))["validation"]
    first = json.loads((run / "predictions.jsonl").read_text().splitlines()[0])
    sft_model = AutoModelForCausalLM.from_pretrained(sft / "merged").eval()
    tok = AutoTokenizer.from_pretrained(sft / "merged")
    prompt = [tok.bos_token_id] + tok(first["prompt"], add_special_tokens=False)["input_ids"]
    answer = tok(first["chosen"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert float(ref[first["index"], 0]) == pytest.approx(plain_logp(sft_model, prompt, answer), abs=1e-3)
    assert first["ref_chosen_logp"] == pytest.approx(float(ref[first["index"], 0]), abs=1e-6)
