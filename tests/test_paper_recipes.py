"""The paper's recipes (recipes/recipe/paper/): every file composes and validates against the schema with
every method; their settings are the paper's (FROD_METHOD.md section 5), down to the trainable-parameter
counts; one smoke run per family through `frod train` with a tiny model of the same class and local data
in the Hub dataset's schema; the new multiple-choice schemas; the task-level GLUE metrics."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from frod_cli.cli import recipes_dir, run_verb
from frod_cli.config import FrodRunConfig
from frod_cli.schemas import register_configs
from frod_cli.config import apply_per_method

RECIPES = Path(recipes_dir())
PAPER = sorted(p.stem for p in (RECIPES / "recipe" / "paper").glob("*.yaml"))
CONCRETE = [p for p in PAPER if not p.startswith("_")]
METHODS = ("frod", "full", "lora", "pissa", "vera", "dora")
FAMILY = {
    **{d: "vision" for d in ("stanford_cars", "dtd", "eurosat", "gtsrb", "mnist", "resisc45", "sun397", "svhn")},
    **{f"glue_{t}": "glue" for t in ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte")},
    **{t: "commonsense" for t in ("boolq", "piqa", "siqa", "hellaswag", "winogrande", "arc_e", "arc_c", "openbookqa")},
}
# FROD_METHOD.md section 5: model, targets, sparse_rate, (lr S, lambda, head), epochs, batch, accumulate, schedule, warmup
PAPER_SETTINGS = {
    "vision": ("openai/clip-vit-base-patch32", ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"], 0.01,
               (5e-5, 5e-4, 1e-4), 4, 64, 1, "constant", 0.0),
    "glue": ("FacebookAI/roberta-large", ["query", "key", "value", "dense"], 0.02, (5e-5, 5e-4, 1e-5), 5, 64, 1, "cosine", 0.1),
    "commonsense": ("meta-llama/Llama-2-7b-hf", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"], 0.02,
                    (1e-5, 1e-4, 1e-5), 6, 4, 8, "cosine", 0.1),
}


def compose_recipe(name: str, *overrides: str, prefix: str = "paper"):
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    if not GlobalHydra.instance().is_initialized():  # once (run_verb clears it): a context per call costs ~0.2 s
        initialize_config_dir(config_dir=str(RECIPES), version_base="1.3")
    cfg = compose("config", overrides=[f"recipe={prefix}/{name}", *overrides])
    merged = OmegaConf.merge(OmegaConf.structured(FrodRunConfig), cfg)  # refuses unknown keys / wrong types
    apply_per_method(merged, overrides)  # the recipe's per_method settings, as `frod train` applies them
    OmegaConf.resolve(merged)
    return merged


def test_every_benchmark_has_a_recipe():
    assert sorted(FAMILY) == sorted(CONCRETE)


@pytest.mark.parametrize("name", PAPER)
def test_paper_recipe_composes(name):
    # every method on the shared family settings (_vision, _glue, _commonsense); the method group is
    # orthogonal to the benchmark, so the concrete recipes compose with the default (frod) and one baseline
    for method in METHODS if name.startswith("_") else ("frod", "vera"):
        cfg = compose_recipe(name, f"method={method}")
        assert cfg.method.name == method
        assert not OmegaConf.missing_keys(cfg), OmegaConf.missing_keys(cfg)
        if name.startswith("_"):
            continue
        assert cfg.recipe_name == f"paper_{name}"
        assert cfg.task.source == "hub" and cfg.task.dataset
        assert cfg.task.objective in [{"pearsonr": "pearson", "mcc": "matthews_correlation"}.get(m, m) for m in cfg.task.metrics]
        # model selection never reads the split that is reported as test
        assert cfg.task.validation_split != cfg.task.test_split


@pytest.mark.parametrize("name", CONCRETE)
def test_paper_settings(name):
    model, targets, rate, (lr_s, lr_l, lr_h), epochs, batch, accum, sched, warm = PAPER_SETTINGS[FAMILY[name]]
    cfg = compose_recipe(name)
    assert cfg.model.name_or_path == model
    assert list(cfg.method.target_modules or cfg.model.target_modules) == targets
    assert cfg.method.name == "frod" and cfg.method.sparse_rate == rate
    o = cfg.optimizer
    assert (o.name, o.weight_decay, o.scheduler, o.warmup_ratio) == ("adamw", 0.01, sched, warm)
    assert (o.group_lr.sparse, o.group_lr.scale, o.group_lr.head) == (lr_s, lr_l, lr_h)
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.train.grad_accum, cfg.train.max_steps) == (epochs, batch, accum, -1)


def test_task_specifics():
    assert compose_recipe("glue_cola").task.objective == "matthews_correlation"
    stsb = compose_recipe("glue_stsb").task
    assert stsb.regression and list(stsb.metrics) == ["pearson", "spearmanr"]
    assert set(compose_recipe("glue_mrpc").task.metrics) == {"f1", "accuracy"} == set(compose_recipe("glue_qqp").task.metrics)
    mnli = compose_recipe("glue_mnli").task
    assert (mnli.validation_split, mnli.test_split) == ("validation_matched", "validation_mismatched")


def test_cfg_job_through_the_cli(capsys):
    code, _ = run_verb("train", ["recipe=paper/glue_mnli", "method=lora", "--cfg", "job"])
    assert code == 0
    out = OmegaConf.create(capsys.readouterr().out)
    assert out.method.name == "lora" and out.task.subset == "mnli" and out.optimizer.group_lr.adapter > 0


@pytest.mark.parametrize("name", sorted(p.stem for p in (RECIPES / "recipe" / "compare").glob("*.yaml")))
def test_compare_recipes_share_one_budget(name):
    """recipes/recipe/compare/: every method composes with one step budget, seed and evaluation grid."""
    budgets = set()
    for method in METHODS:
        cfg = compose_recipe(name, f"method={method}", prefix="compare")
        assert cfg.method.name == method and not OmegaConf.missing_keys(cfg)
        budgets.add((cfg.train.max_steps, cfg.train.batch_size, cfg.train.seed, cfg.train.eval_every))
        assert {"sparse", "scale", "head", "adapter", "backbone"} <= set(cfg.optimizer.group_lr)
    assert len(budgets) == 1 and next(iter(budgets))[0] > 0
    compared = set(cfg.compare.methods)
    assert {"frod", "lora", "full"} <= compared and compared & {"pissa", "vera"}
    assert 42 in cfg.compare.seeds and len(cfg.compare.lr_scales) >= 2
    if name == "text_minilm":
        assert len(set(cfg.compare.seeds)) >= 3


# ------------------------------------------------------------------------------------ trainable counts
def _meta_model(family: str):
    import transformers as T

    with torch.device("meta"):
        if family == "vision":  # CLIPConfig() is ViT-B/32's vision tower (hidden 768, 12 layers, patch 32)
            return T.AutoModelForImageClassification.from_config(T.CLIPConfig(num_labels=196))
        if family == "glue":
            c = T.RobertaConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                                max_position_embeddings=514, vocab_size=50265, num_labels=3)
            return T.AutoModelForSequenceClassification.from_config(c)
        return T.AutoModelForCausalLM.from_config(T.LlamaConfig())  # LlamaConfig() is LLaMA-2-7B's shape


@pytest.mark.parametrize("family,name,expected", [
    ("vision", "stanford_cars", 1_569_276), ("glue", "glue_mnli", 10_790_760), ("commonsense", "piqa", 65_210_880)])
def test_paper_trainable_counts(family, name, expected):
    """The recipe's targets and sparse_rate give the paper's FRoD counts: n + floor(rate * n^2) per target
    layer (in-dim n), the task head excluded (RoBERTa's classifier.dense is head, not target)."""
    from frod_cli.methods import build_method
    from frod_cli.training.builders import build_task

    cfg = compose_recipe(name)
    model = _meta_model(family)
    method = build_method(cfg.method, build_task(cfg.task, 0), cfg.model)
    names = method.resolve_targets(model)
    assert not any("classifier" in n for n in names)
    mods = dict(model.named_modules())
    n_in = [mods[n].in_features for n in names]
    assert sum(n + math.floor(cfg.method.sparse_rate * n * n) for n in n_in) == expected


# ------------------------------------------------------------------------------ multiple-choice schemas
def test_siqa_and_winogrande_schemas_and_unused_hidden_splits(tmp_path):
    from frod_cli.tasks import get_task, task_config

    def write(name, rows):
        p = tmp_path / f"{name}.jsonl"
        p.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(p)

    siqa = {"context": "Tracy fed the cat.", "question": "Why did Tracy do this?", "answerA": "to be kind",
            "answerB": "to sleep", "answerC": "to leave"}
    wino = {"sentence": "The trophy did not fit in the case because _ was too big.", "option1": "the trophy", "option2": "the case"}
    for kind, ex, key, labels, hidden in (("siqa", siqa, "label", ["1", "2", "3"], None),
                                          ("winogrande", wino, "answer", ["1", "2"], "")):
        train = [{**ex, key: labels[i % len(labels)]} for i in range(12)]
        files = {"train": write(f"{kind}_train", train), "validation": write(f"{kind}_val", train[:4])}
        if hidden is not None:  # WinoGrande's test answers are hidden: unused when test_split=validation
            files["test"] = write(f"{kind}_test", [{**ex, key: hidden}] * 3)
        cfg = task_config("multiple_choice", **dict(
            name=kind, source="local", data_files=files,
            validation_split=None, test_split="validation", validation_fraction=0.25))
        data = get_task("multiple_choice")(cfg, 0).load_data()
        assert sorted(data) == ["test", "train", "validation"] and len(data["test"]) == 4
        row = data["test"][1]
        if kind == "siqa":
            assert row["prompt"] == "Tracy fed the cat.\nQuestion: Why did Tracy do this?\nAnswer:"
            assert row["choices"] == ["to be kind", "to sleep", "to leave"] and row["label"] == 1  # "2" -> 1
        else:
            assert row["prompt"].startswith(wino["sentence"] + "\nQuestion: What does the blank")
            assert row["choices"] == ["the trophy", "the case"] and row["label"] == 1


# --------------------------------------------------------------------------------- task-level metrics
def test_glue_task_metrics_on_known_inputs():
    """CoLA and STS-B through their recipes' task configs (tests/test_metrics.py covers the modules)."""
    from frod_cli.training.builders import build_task

    cola = build_task(compose_recipe("glue_cola").task, 0)
    refs, preds = [1, 1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0, 1]  # TP 3, TN 2, FP 1, FN 2
    assert cola.compute_metrics(preds, refs) == {"matthews_correlation": pytest.approx(4 / math.sqrt(240))}
    stsb = build_task(compose_recipe("glue_stsb").task, 0)
    got = stsb.compute_metrics([0.5, 1.0, 2.0, 4.5], [1.0, 2.0, 3.0, 4.0])  # monotone: Spearman 1
    x, y = [0.5, 1.0, 2.0, 4.5], [1.0, 2.0, 3.0, 4.0]
    mx, my = sum(x) / 4, sum(y) / 4
    r = sum((a - mx) * (b - my) for a, b in zip(x, y)) / math.sqrt(
        sum((a - mx) ** 2 for a in x) * sum((b - my) ** 2 for b in y))
    assert got == {"pearson": pytest.approx(r), "spearmanr": pytest.approx(1.0)}


# ------------------------------------------------------------------------------------------ smoke runs
SMOKE = ["train.max_steps=3", "train.epochs=1", "train.batch_size=4", "train.grad_accum=1", "train.eval_batch_size=8",
         "train.eval_every=0", "train.log_every=1", "train.progress=false", "train.num_workers=0",
         "task.source=local", "task.dataset=null", "task.subset=null"]


def _train(tmp_path, recipe, *overrides):
    run = tmp_path / "run"
    code, value = run_verb("train", [f"recipe=paper/{recipe}", *SMOKE, *overrides, f"hydra.run.dir={run}"])
    assert code == 0
    m = json.loads((run / "metrics.json").read_text())
    assert m["steps"] == 3 and m["method"] == "frod" and value == pytest.approx(m["objective_value"])
    if m["merge_max_abs_diff"] is not None:
        assert m["merge_max_abs_diff"] < 1e-4
    return m


@pytest.mark.slow
def test_smoke_vision_tiny_clip(tmp_path):
    """CLIPForImageClassification from a tiny checkpoint saved as CLIPModel (like openai/clip-vit-base-patch32),
    the recipe's module names, local images in the Hub sets' schema (image, label; train/test)."""
    import datasets
    import numpy as np
    import transformers as T
    from PIL import Image

    ckpt = tmp_path / "tiny-clip"
    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    cfg = T.CLIPConfig(text_config=dict(**small, vocab_size=99), vision_config=dict(**small, image_size=32, patch_size=8),
                       projection_dim=16)
    torch.manual_seed(0)
    T.CLIPModel(cfg).save_pretrained(ckpt)
    T.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(ckpt)
    rng = np.random.default_rng(0)
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b", "c"])})
    for split, n in (("train", 30), ("test", 9)):
        imgs = [Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)) for _ in range(n)]
        datasets.Dataset.from_dict({"image": imgs, "label": [i % 3 for i in range(n)]}, features=feats).to_parquet(
            str(tmp_path / f"{split}.parquet"))
    m = _train(tmp_path, "stanford_cars", f"model.name_or_path={ckpt}", "train.mixed_precision=no",
               f"+task.data_files.train={tmp_path / 'train.parquet'}", f"+task.data_files.test={tmp_path / 'test.parquet'}",
               "task.validation_fraction=0.2")
    assert "accuracy" in m["validation"] and "accuracy" in m["test"]
    assert m["merge_max_abs_diff"] is not None and (tmp_path / "run" / "merged" / "config.json").is_file()
    # q,k,v,out_proj (n=32) and fc1 (32), fc2 (64) per layer, 2 layers: n + floor(0.01 n^2); head 3*32+3
    frod = 2 * (5 * (32 + 10) + (64 + 40))
    assert m["trainable_params"] == frod + 99


@pytest.mark.slow
def test_smoke_glue_mnli_tiny_roberta(tmp_path):
    """RoBERTa (a tiny RobertaForMaskedLM checkpoint, like roberta-large's) on MNLI's schema and split names:
    validation_matched selects, validation_mismatched is the reported test; a file for a split the recipe does not
    read (the hidden test_matched) is refused in one line, never silently unused."""
    import datasets
    import transformers as T

    from frod_cli.models import _minilm_path

    ckpt = tmp_path / "tiny-roberta"
    tok = T.AutoTokenizer.from_pretrained(_minilm_path())
    cfg = T.RobertaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=64, max_position_embeddings=130, type_vocab_size=2, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    T.RobertaForMaskedLM(cfg).save_pretrained(ckpt)
    tok.save_pretrained(ckpt)
    names = ["entailment", "neutral", "contradiction"]
    feats = datasets.Features({"premise": datasets.Value("string"), "hypothesis": datasets.Value("string"),
                               "label": datasets.ClassLabel(names=names), "idx": datasets.Value("int32")})
    files = {}
    for split, n, hidden in (("train", 24, False), ("validation_matched", 9, False), ("validation_mismatched", 6, False),
                             ("test_matched", 5, True)):
        d = {"premise": [f"a man plays {i}" for i in range(n)], "hypothesis": [f"someone plays {i % 4}" for i in range(n)],
             "label": [-1 if hidden else i % 3 for i in range(n)], "idx": list(range(n))}
        datasets.Dataset.from_dict(d, features=feats).to_parquet(str(tmp_path / f"{split}.parquet"))
        files[split] = tmp_path / f"{split}.parquet"
    common = [f"model.name_or_path={ckpt}", "train.mixed_precision=no", "task.max_length=32"]
    hidden = f"+task.data_files.test_matched={files.pop('test_matched')}"
    code, _ = run_verb("train", ["recipe=paper/glue_mnli", *SMOKE, *common, hidden, f"hydra.run.dir={tmp_path / 'no'}"])
    assert code == 2 and not (tmp_path / "no").exists()
    m = _train(tmp_path, "glue_mnli", *common, *[f"+task.data_files.{s}={p}" for s, p in files.items()])
    assert set(m["validation"]) == {"accuracy"} and set(m["test"]) == {"accuracy"}
    assert T.AutoConfig.from_pretrained(tmp_path / "run" / "merged").model_type == "roberta"


@pytest.mark.slow
def test_smoke_commonsense_siqa_tiny_llama(tmp_path):
    """LLaMA (tiny:llama, bf16 frozen weights like the recipe's) scoring Social IQa's schema, through the
    merge check (merged vs unmerged choice scores) and the merged checkpoint."""
    rows = [{"context": f"Alex helped friend {i}.", "question": "How would Alex feel?", "answerA": "happy",
             "answerB": "sad", "answerC": "angry", "label": str(1 + i % 3)} for i in range(24)]
    for split, rs in (("train", rows), ("validation", rows[:6])):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rs))
    m = _train(tmp_path, "siqa", "model.name_or_path=tiny:llama", "task.max_length=48", "task.validation_fraction=0.25",
               f"+task.data_files.train={tmp_path / 'train.jsonl'}", f"+task.data_files.validation={tmp_path / 'validation.jsonl'}")
    assert "accuracy" in m["validation"] and "accuracy" in m["test"]


# ------------------------------------------------------------- commonsense: the authors' protocol, smoke
def _stand_in(name: str, i: int) -> dict:
    """One example in the Hub schema of each commonsense benchmark (labels cycle through the classes)."""
    choices = {"text": ["a stone", "a bird", "a cloud", "a fish"], "label": ["A", "B", "C", "D"]}
    return {
        "boolq": {"question": "is the sky blue", "passage": "On a clear day the sky is blue.", "answer": i % 2 == 0},
        "piqa": {"goal": "dry a wet towel", "sol1": "hang it in the sun", "sol2": "put it in water", "label": i % 2},
        "siqa": {"context": "Tracy fed the cat.", "question": "Why?", "answerA": "kind", "answerB": "tired",
                 "answerC": "late", "label": str(i % 3 + 1)},
        "hellaswag": {"ctx": "She opens the door and", "endings": ["walks in", "flies", "melts", "sings"],
                      "label": str(i % 4)},
        "winogrande": {"sentence": "The cup fell off the table because _ was tilted.", "option1": "the cup",
                       "option2": "the table", "answer": str(i % 2 + 1)},
        "arc_e": {"question": "What can fly?", "choices": choices, "answerKey": "ABCD"[i % 4] if i % 3 else str(i % 4 + 1)},
        "arc_c": {"question": "What can swim?", "choices": choices, "answerKey": "ABCD"[i % 4] if i % 3 else str(i % 4 + 1)},
        "openbookqa": {"question_stem": "Which is heavy?", "choices": choices, "answerKey": "ABCD"[i % 4]},
    }[name]


COMMONSENSE = sorted(n for n, f in FAMILY.items() if f == "commonsense")


@pytest.mark.parametrize("name", COMMONSENSE)
def test_commonsense_recipes_follow_the_authors_protocol(name):
    """recipe=paper/<benchmark>: a sequence classifier on one prompt listing the choices (the authors'
    script), the official validation split reported; recipe=commonsense_mc/<benchmark> keeps log-prob
    multiple choice on the same benchmark."""
    from frod_cli.tasks import templates

    cfg = compose_recipe(name)
    t = cfg.task
    assert t.type == "seq_cls" and t.prompt_template and t.max_length == 512
    assert (t.validation_split, t.test_split) == (None, "validation")
    row = _stand_in(name, 1)
    assert set(templates.fields(t.prompt_template)) <= set(row)
    assert len(t.labels) >= 2
    mc = compose_recipe(name, prefix="commonsense_mc")
    assert mc.task.type == "multiple_choice" and mc.task.dataset == t.dataset
    assert mc.optimizer.group_lr == cfg.optimizer.group_lr and mc.train.grad_accum == cfg.train.grad_accum == 8


@pytest.mark.slow
@pytest.mark.parametrize("name", COMMONSENSE)
def test_commonsense_recipe_smoke_run_on_a_tiny_llama(name, tmp_path):
    """Each recipe=paper/<benchmark> trains end to end on a tiny random LLaMA with a local stand-in in its
    Hub schema (the real data sets need the Hub), accumulation window included."""
    files = {}
    for split, n in (("train", 24), ("validation", 8)):
        f = tmp_path / f"{split}.jsonl"
        f.write_text("".join(json.dumps(_stand_in(name, i)) + "\n" for i in range(n)))
        files[split] = f
    run = tmp_path / "run"
    code, _ = run_verb("train", [
        f"recipe=paper/{name}", "model.name_or_path=tiny:llama", "model.dtype=float32", "task.source=local",
        f"+task.data_files.train={files['train']}", f"+task.data_files.validation={files['validation']}",
        "task.max_length=96", "train.max_steps=2", "train.batch_size=4", "train.grad_accum=2", "train.eval_every=2",
        "train.eval_batch_size=8", "train.save_merged=false", "train.progress=false", f"hydra.run.dir={run}"])
    assert code == 0
    m = json.loads((run / "metrics.json").read_text())
    # the stand-in files replace the benchmark's data: the run is named after them (issue 24), the recipe is the benchmark's
    assert m["steps"] == 2 and "accuracy" in m["test"] and m["task"] == "train" and m["recipe"] == f"paper_{name}"


@pytest.mark.parametrize("method", ["frod", "lora", "full", "vera", "peft_frod"])
def test_metamath_recipe_composes_offline(method):
    """recipe=metamath_llama3b: PEFT's MetaMathQA -> GSM8K setup for every method, Hub ids kept."""
    cfg = OmegaConf.merge(OmegaConf.structured(FrodRunConfig), _compose_plain("metamath_llama3b", f"method={method}"))
    apply_per_method(cfg, [f"method={method}"])
    t = cfg.task
    assert (cfg.model.name_or_path, cfg.model.dtype) == ("meta-llama/Llama-3.2-3B", "bfloat16")
    assert (t.type, t.dataset, t.test_dataset, t.answer_pattern, t.max_length) == (
        "causal_lm", "meta-math/MetaMathQA", "openai/gsm8k", "last_number", 768)
    assert (cfg.train.max_steps, cfg.train.batch_size, cfg.optimizer.scheduler, cfg.optimizer.lr,
            cfg.optimizer.weight_decay) == (5000, 4, "cosine", 1e-4, 0.1)
    if method == "frod":
        assert cfg.method.sparse_rate == 0.01 and list(cfg.model.target_modules) == ["q_proj", "v_proj"]
    if method == "lora":
        assert cfg.method.r == 32


def _compose_plain(recipe: str, *overrides: str):
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    if not GlobalHydra.instance().is_initialized():
        initialize_config_dir(config_dir=str(RECIPES), version_base="1.3")
    return compose("config", overrides=[f"recipe={recipe}", *overrides])
