"""`frod export` and frod_cli.export: a FRoD run as PEFT's FRoD adapter (tiny BERT and tiny LLaMA, reloaded by PEFT
and compared with frod's logits), as LoRA pairs (exact at full rank, an error that grows as the rank falls, loaded
by PEFT and by transformers' load_adapter), as a merged checkpoint in another dtype; and the refusals, which write
nothing and change nothing in the run."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from frod_cli import FrodCliError
from frod_cli.cli import main, run_verb
from frod_cli.export import align, energy_rank, lora_adapter, lora_pair, write_peft_frod
from frod_cli.export.peft_frod import moved_pattern, to_peft_values
from conftest import digest, one_error_line, train_run  # noqa: E402  (tests/ is on sys.path under pytest)


# PEFT's own basis agrees with frod's up to the mixing of near-equal HO-GSVD eigenvalues, and not at all in a
# category of one layer (BERT's pooler) or of two stacking to a square matrix (tiny BERT's output.dense, tiny
# LLaMA's k/v/down_proj with 2 layers): the BERT run leaves those out, the LLaMA run has 4 layers.
BERT_TARGETS = "method.target_modules=[query,key,value,attention.output.dense,intermediate.dense]"
TOLERANCE = 1e-3  # the export's default (docs/SERVING.md)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


# ---- the math, without PEFT's model: seconds ---------------------------------------------------------------------
def test_energy_rule_is_the_smallest_rank_reaching_the_fraction():
    S = torch.tensor([3.0, 2.0, 1.0])  # squared: 9, 4, 1 of 14
    assert [energy_rank(S, e) for e in (0.5, 9 / 14, 0.9, 13 / 14, 0.99, 1.0)] == [1, 1, 2, 2, 3, 3]


def test_lora_pair_is_exact_at_full_rank_and_loses_the_tail_below():
    g = torch.Generator().manual_seed(0)
    dW = torch.randn(12, 7, generator=g)
    full = lora_pair("x", dW, rank=50)
    assert full.rank == 7 and full.relative_error == 0.0
    assert relative(full.B @ full.A, dW) < 1e-5
    errors = [lora_pair("x", dW, rank=r).relative_error for r in (6, 4, 2, 1)]
    assert errors == sorted(errors) and errors[0] > 0
    two = lora_pair("x", dW, rank=2)
    assert abs(torch.linalg.norm(dW - two.B @ two.A) / torch.linalg.norm(dW) - two.relative_error) < 1e-5


def test_signed_permuted_basis_carries_the_update_exactly():
    """If PEFT's V is ours with its columns permuted, flipped and rescaled, lambda and S moved by the module's
    formulas rebuild the same W' = U (diag(lambda) + S) V^T from PEFT's U and V."""
    g = torch.Generator().manual_seed(0)
    n, m = 6, 5
    V = torch.randn(n, n, generator=g, dtype=torch.float64)
    U = torch.randn(m, n, generator=g, dtype=torch.float64)
    U = U / U.norm(dim=0)
    sigma = torch.rand(n, generator=g, dtype=torch.float64) + 0.5
    lam = sigma * (1 + 0.1 * torch.randn(n, generator=g, dtype=torch.float64))
    rows, cols = torch.tensor([0, 1, 3, 5]), torch.tensor([2, 4, 1, 0])
    s = torch.randn(4, generator=g, dtype=torch.float64)
    M = torch.diag(lam)
    M[rows, cols] += s
    W_new = U @ M @ V.T
    perm, d = torch.tensor([3, 0, 5, 1, 4, 2]), torch.tensor([-2.0, 0.5, 1.0, -1.0, 3.0, -0.25], dtype=torch.float64)
    V_peft = V[:, perm] * d  # v_peft,a = d_a v_ours,perm[a]
    W = U @ torch.diag(sigma) @ V.T
    B_peft = W @ torch.linalg.inv(V_peft).T
    sigma_peft = B_peft.norm(dim=0)
    U_peft = B_peft / sigma_peft
    al = align(V, torch.linalg.inv(V), V_peft, "cat", "peft_cat", "layer")
    assert torch.equal(al.perm, perm) and al.mixing < 1e-12
    lam_p, s_p = to_peft_values(lam, sigma, s, sigma_peft, al, rows, cols)
    idx = moved_pattern(rows, cols, al, 5)  # PEFT holds one more entry than frod: padded with a zero
    M_p = torch.diag(lam_p.double())
    M_p[idx[0, :4], idx[1, :4]] += s_p.double()
    assert idx.shape == (2, 5) and idx[0, 4] != idx[1, 4]
    assert relative(U_peft @ M_p @ V_peft.T, W_new) < 1e-6


def test_a_category_peft_cannot_rebuild_is_refused_naming_the_layer(tmp_path):
    """One layer in a category (BERT's pooler) makes the HO-GSVD matrix c I: PEFT's V is a rotation of ours."""
    from transformers import BertConfig, BertForSequenceClassification

    from frod_cli.frod import FrodConfig, apply_frod

    def bert():
        torch.manual_seed(0)
        return BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=3,
                                                        num_attention_heads=2, intermediate_size=32)).eval()

    model = apply_frod(bert(), FrodConfig(target_modules=["query", "pooler.dense"], sparse_rate=0.05))
    with pytest.raises(FrodCliError, match=r"layer bert\.pooler\.dense: PEFT's own V .* is not frod's up to sign"):
        write_peft_frod(model, {"sparse_rate": 0.05, "regularization": 1e-3, "seed": 0}, {}, bert(),
                        str(tmp_path), None, None)


@pytest.mark.parametrize("fmt,args,expected", [
    ("nope", [], "format must be one of peft, lora, merged"),
    ("lora", [], "format=lora takes rank=<r>"),
    ("lora", ["rank=0"], "rank must be a positive integer"),
    ("lora", ["rank=-3"], "rank must be a positive integer"),
    ("lora", ["rank=4", "energy=0.9"], "one of the two"),
    ("lora", ["energy=1.5"], "energy must lie in (0, 1]"),
    ("peft", ["rank=4"], "format=peft takes no rank"),
    ("merged", ["dtype=int8"], "dtype must be one of"),
    ("lora", ["rank=4", "tolerance=0.1"], "format=lora takes no tolerance"),
])
def test_options_are_refused_before_anything_loads(fmt, args, expected, tmp_path, capsys):
    assert main(["export", f"path={tmp_path}", f"format={fmt}", *args]) == 2
    assert expected in one_error_line(capsys)


def test_not_a_run_is_refused(tmp_path, capsys):
    assert main(["export", f"path={tmp_path}", "format=peft"]) == 2
    assert "is not a run directory" in one_error_line(capsys)


@pytest.mark.parametrize("method,fmt,expected", [
    ("lora", "lora", "is LoRA already: format=peft copies it"),
    ("vera", "lora", "has no FRoD update to convert"),
    ("full", "peft", "a full run has none: format=merged"),
    ("full", "lora", "format=lora converts a frod run's update"),
])
def test_formats_a_method_cannot_give_are_refused(method, fmt, expected):
    from frod_cli.commands.export import check_method

    run = OmegaConf.create({"method": {"name": method}, "model": {"quantization": "none"}})
    with pytest.raises(FrodCliError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        check_method(fmt, run)


# ---- end to end on trained runs ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bert_run(tmp_path_factory):
    return train_run(tmp_path_factory, "export_bert", ["debug=fast", BERT_TARGETS])[0]


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory):
    return train_run(tmp_path_factory, "export_llama", ["recipe=sft_smoke", "train.max_steps=4", "train.eval_every=4",
                                                        "train.progress=false", "train.save_merged=false",
                                                        "task.generation.max_examples=2",
                                                        "+model.config_overrides.num_hidden_layers=4"])[0]


def trained(run: Path):
    """frod's model from the run (float32), its base again, and a validation batch."""
    from frod_cli.export.pipelines import Job, fresh_base, load
    from frod_cli.runs import load_run_config

    job = Job(str(run), load_run_config(run), "adapter", "", 8, True)
    L = load(job)
    return L, lambda: fresh_base(job, L.task)


def auto_peft(task, out: Path):
    """The export loaded by PEFT alone, its base found through adapter_config.json's base_model_name_or_path."""
    import peft

    auto = {"AutoModelForCausalLM": peft.AutoPeftModelForCausalLM,
            "AutoModelForSequenceClassification": peft.AutoPeftModelForSequenceClassification}[task.auto_class]
    return auto.from_pretrained(str(out)).eval()


def logits(model, L) -> torch.Tensor:
    from frod_cli.training.evaluation import model_outputs

    with torch.no_grad():
        return model_outputs(model, L.batch, L.task)


@pytest.mark.slow
@pytest.mark.parametrize("which", ["bert_run", "llama_run"])
def test_peft_export_loads_in_peft_and_matches_frods_logits(which, request, tmp_path):
    from peft import PeftModel

    run = request.getfixturevalue(which)
    before = digest(run)
    out = tmp_path / "peft"
    assert main(["export", f"path={run}", "format=peft", f"output={out}"]) == 0
    assert digest(run) == before
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "FROD" and (out / "adapter_model.safetensors").is_file()
    L, base = trained(run)
    loaded = PeftModel.from_pretrained(base(), str(out)).eval()
    assert relative(logits(loaded, L), logits(L.model, L)) < TOLERANCE
    assert relative(logits(base(), L), logits(L.model, L)) > 10 * TOLERANCE  # the check can fail: training moved it
    report = json.loads((out / "export.json").read_text())
    assert report["max_relative_weight_error"] < TOLERANCE and report["check"]["relative_diff"] < TOLERANCE
    if which == "bert_run":
        assert config["modules_to_save"] == ["classifier"] and report["modules_to_save"] == ["classifier"]
    # a tiny:* base exists in no file: the export carries it, and its adapter_config.json names it
    assert config["base_model_name_or_path"] == str(out / "base")
    assert relative(logits(auto_peft(L.task, out), L), logits(L.model, L)) < TOLERANCE


@pytest.mark.slow
def test_a_failed_check_writes_nothing_and_names_the_layer(bert_run, tmp_path, capsys):
    before = digest(bert_run)
    out = tmp_path / "a" / "b" / "peft"
    assert main(["export", f"path={bert_run}", "format=peft", f"output={out}", "tolerance=1e-12"]) == 2
    line = one_error_line(capsys)
    assert "beyond the tolerance 1e-12: layer bert.encoder.layer." in line and "up to sign and order only to" in line
    assert not (tmp_path / "a").exists() and digest(bert_run) == before


@pytest.mark.slow
def test_lora_export_full_rank_matches_low_rank_reports_its_error(bert_run, tmp_path, capsys):
    from peft import PeftModel

    full, low = tmp_path / "full", tmp_path / "low"
    assert main(["export", f"path={bert_run}", "format=lora", "rank=1000", f"output={full}"]) == 0
    assert main(["export", f"path={bert_run}", "format=lora", "rank=2", f"output={low}"]) == 0
    L, base = trained(bert_run)
    frod = logits(L.model, L)
    assert relative(logits(PeftModel.from_pretrained(base(), str(full)).eval(), L), frod) < 1e-4
    plain = base()
    plain.load_adapter(str(full))  # transformers' own loader, head included
    assert relative(logits(plain.eval(), L), frod) < 1e-4
    report, low_report = (json.loads((d / "export.json").read_text()) for d in (full, low))
    assert report["relative_error"] == 0.0 and low_report["relative_error"] > 0
    assert set(report["metrics"]) == {"split", "frod", "lora"}
    assert report["metrics"]["frod"] == report["metrics"]["lora"]
    config = json.loads((low / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 2 and config["modules_to_save"] == ["classifier"]
    errors = [lora_adapter(L.model, {}, r, None).relative_error for r in (16, 8, 4, 2, 1)]
    assert errors == sorted(errors) and errors[-1] > errors[0] > 0
    assert abs(errors[3] - low_report["relative_error"]) < 1e-6


@pytest.mark.slow
def test_merged_export_in_bfloat16_loads_with_plain_transformers(bert_run, tmp_path):
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "bf16"
    assert main(["export", f"path={bert_run}", "format=merged", "dtype=bfloat16", f"output={out}"]) == 0
    model = AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
    assert model.dtype == torch.bfloat16
    L, _ = trained(bert_run)
    frod = logits(L.model, L)
    assert relative(logits(model, L), frod) < 2e-2  # bfloat16 keeps 8 bits of mantissa
    reference = L.method.merge(L.model).to(torch.bfloat16).eval()  # the trained weights, merged here in bfloat16
    assert relative(logits(model, L), logits(reference, L)) < 1e-6


@pytest.mark.slow
def test_existing_output_and_the_run_itself_are_refused(bert_run, tmp_path, capsys):
    before = digest(bert_run)
    (tmp_path / "taken").mkdir()
    assert main(["export", f"path={bert_run}", "format=lora", "rank=2", f"output={tmp_path / 'taken'}"]) == 2
    assert "the directory exists; overwrite=true replaces it" in one_error_line(capsys)
    assert main(["export", f"path={bert_run}", "format=merged", f"output={bert_run}", "overwrite=true"]) == 2
    assert "would replace what the export reads" in one_error_line(capsys)
    assert main(["export", f"path={bert_run / 'adapter'}", "format=merged", f"output={bert_run / 'adapter'}",
                 "overwrite=true"]) == 2
    assert "would replace what the export reads" in one_error_line(capsys)
    assert digest(bert_run) == before and list((tmp_path / "taken").iterdir()) == []


@pytest.mark.slow
def test_a_peft_method_run_exports_its_adapter_as_it_is(tmp_path):
    """A LoRA run's adapter is copied as it is, with a base that loads (a tiny:* base carried beside it); and the
    run printed none of the libraries' per-run warnings (transformers' is_gradient_checkpointing deprecation,
    PEFT's search for the base's config.json)."""
    import warnings

    run, out = tmp_path / "lora_run", tmp_path / "peft"
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        code, _ = run_verb("train", ["debug=fast", "method=lora", f"hydra.run.dir={run}"])
    assert code == 0
    noise = [str(w.message) for w in seen if "is_gradient_checkpointing" in str(w.message)
             or "Could not find a config file" in str(w.message)]
    assert noise == []
    assert main(["export", f"path={run}", "format=peft", f"output={out}"]) == 0
    mine = ("export.json", "README.md", "adapter_config.json")  # the export's report, its card, its loadable base
    copied = {k: v for k, v in digest(out).items() if k not in mine and not k.startswith("base/")}
    assert {k: v for k, v in digest(run / "adapter").items() if k not in mine} == copied
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(out / "base")
    assert f'PeftModel.from_pretrained(base, "{out}")' in (out / "README.md").read_text()
    L, _ = trained(run)
    assert relative(logits(auto_peft(L.task, out), L), logits(L.model, L)) < 1e-5
    assert main(["export", f"path={run}", "format=lora", "rank=4", f"output={tmp_path / 'lora'}"]) == 2


def test_a_causal_lms_saved_tokenizer_feeds_generate(tmp_path):
    """merged/ (and format=merged) of a causal LM: its tokenizer gives no token_type_ids (tiny:llama's, BERT's,
    would), so `model.generate(**tokenizer(text, return_tensors="pt"))` works on what was saved."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from frod_cli.training import builders as B
    from frod_cli.training.evaluation import save_merged
    from conftest import compose_train

    cfg = compose_train(["recipe=sft_smoke"])
    task = B.build_task(cfg.task, 0)
    model, tok = B.load_model(cfg.model, task)
    assert "token_type_ids" in tok("hi")  # what the training tokenizer gives
    save_merged(model, tok, str(tmp_path / "merged"))
    tok, model = AutoTokenizer.from_pretrained(tmp_path / "merged"), AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    inputs = tok("hi", return_tensors="pt")
    assert "token_type_ids" not in inputs
    assert model.generate(**inputs, max_new_tokens=2, do_sample=False).shape[1] == inputs["input_ids"].shape[1] + 2
