"""The three exports of a run directory end to end: load the trained model (in float32: the adapters are float32
and the checks compare against it), convert, write into a temporary sibling of the output, check what was
written by loading it back, then rename it into place (a failed check leaves nothing behind)."""
from __future__ import annotations

import os
import statistics
from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch

from frod_cli.export.build import (TASK_TYPES, check_lora, check_peft_frod, compare_outputs, frod_layer_names,
                                   head_states, lora_adapter, target_names, write_peft_frod)
from frod_cli.share.card import write_export_card

EXPORT_JSON = "export.json"


@dataclass
class Job:
    run_dir: str
    run: Any  # the run's config (frod_cli.runs.load_run_config)
    kind: str  # "adapter" | "merged": what is read
    out: str
    check_batch_size: int
    cpu: bool


@dataclass
class Loaded:
    model: Any
    preprocessor: Any
    task: Any
    method: Any  # None for merged/
    encoded: Any
    split: str
    batch: Dict[str, Any]
    accelerator: Any
    eval_batch_size: int


def model_config(job: Job, **changes: Any) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.merge(job.run.model, {"dtype": "float32", "compute_dtype": None, **changes})  # a 4-bit base too


def load(job: Job) -> Loaded:
    """The trained model (base + adapter/, or merged/) in float32, its task's encoded splits and a check batch."""
    from accelerate import Accelerator

    from frod_cli.training import builders as B
    from frod_cli.training.evaluation import check_batch

    seed = int(job.run.train.seed)
    task = B.build_task(job.run.task, seed)
    data = B.load_task_data(task, required=())  # first: a classifier's head size comes from the labels
    if job.kind == "adapter":
        model, pre, method = B.load_adapted(model_config(job), job.run.method, task, seed,
                                            os.path.join(job.run_dir, "adapter"))
    else:
        model, pre = B.load_model(model_config(job, name_or_path=os.path.join(job.run_dir, "merged")), task)
        method = None
    split = "validation" if "validation" in data else next(iter(data))
    encoded = B.encode_data(task, data, pre)
    acc = Accelerator(cpu=job.cpu)
    model.to(acc.device).eval()
    batch = check_batch(encoded[split], task.collate(pre), job.check_batch_size, acc.device)
    return Loaded(model, pre, task, method, encoded, split, batch, acc, int(job.run.train.eval_batch_size))


def fresh_base(job: Job, task: Any) -> Any:
    """The run's base model as training loaded it (seeded), in float32: what a PEFT adapter is loaded onto."""
    from frod_cli.training import builders as B

    return B.load_base(model_config(job), task, int(job.run.train.seed))[0]


TINY_BASE = "base"  # a tiny:* run's base model, saved beside its adapter export


def base_model_name(job: Job) -> Optional[str]:
    """adapter_config.json's base_model_name_or_path, a name something can load: the run's model (an offline asset
    or a local directory as its absolute path); a tiny:* base (built from a config, in no file) as the copy
    `write_base` saves beside the adapter, by its absolute path."""
    from frod_cli.models import OFFLINE_MODELS

    name = str(job.run.model.name_or_path)
    if name.startswith("tiny:"):
        return os.path.join(job.out, TINY_BASE)
    key = name.split(":", 1)[1] if name.startswith("offline:") else None
    if key in OFFLINE_MODELS:
        return OFFLINE_MODELS[key]()
    return os.path.abspath(name) if os.path.isdir(name) else name


def write_base(job: Job, task: Any, directory: str) -> None:
    """A tiny:* run's base as training built it (seeded, unquantized, float32) and its tokenizer, saved in
    <directory>/base: `AutoPeftModel*.from_pretrained(<export>)` loads it through base_model_name_or_path."""
    from frod_cli.training import builders as B
    from frod_cli.training.evaluation import save_preprocessor

    if not str(job.run.model.name_or_path).startswith("tiny:"):
        return
    model, pre = B.load_base(model_config(job, quantization="none"), task, int(job.run.train.seed))
    model.save_pretrained(os.path.join(directory, TINY_BASE))
    save_preprocessor(pre, model, os.path.join(directory, TINY_BASE))


def copy_peft_adapter(job: Job) -> Dict[str, Any]:
    """A PEFT method's adapter/ is PEFT's format already: copied, its base_model_name_or_path made loadable (a
    tiny:* base saved beside it)."""
    import json
    import shutil

    from frod_cli.runs import atomic_dir, atomic_write_json
    from frod_cli.training import builders as B

    report = {"format": "peft", "run": job.run_dir, "method": job.run.method.name, "output": job.out,
              "base_model_name_or_path": base_model_name(job),
              "note": "the run's PEFT adapter, copied; base_model_name_or_path set to a loadable base"}

    def write(tmp: str) -> None:
        shutil.copytree(os.path.join(job.run_dir, "adapter"), tmp, dirs_exist_ok=True)
        config = os.path.join(tmp, "adapter_config.json")
        with open(config, encoding="utf-8") as f:
            saved = json.load(f)
        saved["base_model_name_or_path"] = report["base_model_name_or_path"]
        atomic_write_json(config, saved)
        if str(job.run.model.name_or_path).startswith("tiny:"):
            task = B.build_task(job.run.task, int(job.run.train.seed))
            B.load_task_data(task, required=())  # a classifier's head size comes from the labels
            write_base(job, task, tmp)
        atomic_write_json(os.path.join(tmp, EXPORT_JSON), report)
        write_export_card(tmp, report)  # the export's card, not the run adapter/'s

    atomic_dir(job.out, write)
    print(f"copied the {job.run.method.name} run's PEFT adapter: PeftModel.from_pretrained(base, {job.out!r})")
    return report


def outputs(L: Loaded):
    from frod_cli.training.evaluation import model_outputs

    return lambda model, batch: model_outputs(model, batch, L.task)


def adapter_parts(job: Job, L: Loaded):
    """(frod's adapter config, its trained modules_to_save, PEFT's task_type)."""
    from frod_cli.frod import read_adapter

    meta, _ = read_adapter(os.path.join(job.run_dir, "adapter"))
    return meta["config"], head_states(L.model, meta.get("modules_to_save", [])), TASK_TYPES.get(L.task.auto_class)


def load_peft(base: Any, directory: str, device: Any) -> Any:
    from peft import PeftModel

    return PeftModel.from_pretrained(base, directory, is_trainable=False).to(device).eval()


def check_info(L: Loaded, compared: Dict[str, float]) -> Dict[str, Any]:
    from frod_cli.tasks.steps import examples_in

    return {"split": L.split, "examples": examples_in(L.batch), **compared}


# ---- format=peft ----------------------------------------------------------------------------------------------
def export_peft(job: Job, tolerance: float) -> Dict[str, Any]:
    from frod_cli.runs import atomic_dir, atomic_write_json

    L = load(job)
    config, heads, task_type = adapter_parts(job, L)
    report = {"format": "peft", "run": job.run_dir, "method": "frod", "output": job.out, "tolerance": tolerance,
              "modules_to_save": sorted(heads)}

    def write(tmp: str) -> None:
        write_base(job, L.task, tmp)
        alignments = write_peft_frod(L.model, config, heads, fresh_base(job, L.task), tmp, task_type,
                                     base_model_name(job))
        loaded = load_peft(fresh_base(job, L.task), tmp, L.accelerator.device)
        compared = compare_outputs(L.model, loaded, L.batch, outputs(L))
        report.update(check_peft_frod(L.model, loaded, alignments, compared["relative_diff"], tolerance))
        report["check"] = check_info(L, compared)
        atomic_write_json(os.path.join(tmp, EXPORT_JSON), report)
        write_export_card(tmp, report)  # README.md: the model card, renamed into place with the export

    atomic_dir(job.out, write)
    print(f"PEFT FRoD adapter of {len(report['layers'])} layers (+ {', '.join(report['modules_to_save']) or 'no'} "
          f"modules_to_save): PeftModel.from_pretrained(base, {job.out!r})")
    print(f"PEFT's reload against frod's model: largest relative weight difference "
          f"{report['max_relative_weight_error']:.2e} ({report['worst_layer']}), logits {report['check']['relative_diff']:.2e} on {report['check']['examples']} "
          f"{L.split} examples (tolerance {tolerance:g})")
    return report


# ---- format=lora ----------------------------------------------------------------------------------------------
def evaluate(L: Loaded, model: Any) -> Dict[str, float]:
    from frod_cli.training.evaluation import Evaluator

    evaluator = Evaluator(L.task, L.accelerator, L.encoded, L.task.collate(L.preprocessor), L.eval_batch_size)
    return evaluator.split(model, L.split).metrics


def export_lora(job: Job, rank: Optional[int], energy: Optional[float]) -> Dict[str, Any]:
    from frod_cli.frod.layer import is_conv1d
    from frod_cli.runs import atomic_dir, atomic_write_json

    L = load(job)
    _, heads, task_type = adapter_parts(job, L)
    adapter = lora_adapter(L.model, heads, rank, energy)
    base = fresh_base(job, L.task)
    conv1d = any(is_conv1d(L.model.get_submodule(n).base_layer) for n in frod_layer_names(L.model))
    config = adapter.peft_config(target_names(base, [p.name for p in adapter.pairs]), fan_in_fan_out=conv1d,
                                 task_type=task_type, base_model=base_model_name(job))
    report = {"format": "lora", "run": job.run_dir, "method": "frod", "output": job.out, "rank": rank,
              "energy": energy, "r": config.r, "lora_alpha": config.lora_alpha,
              "target_modules": sorted(config.target_modules), "modules_to_save": sorted(heads),
              "relative_error": adapter.relative_error, "layers": adapter.layer_report(),
              "lora_parameters": sum(p.A.numel() + p.B.numel() for p in adapter.pairs)}
    frod_metrics = evaluate(L, L.model)

    def write(tmp: str) -> None:
        write_base(job, L.task, tmp)
        adapter.save(tmp, config)
        loaded = load_peft(base, tmp, L.accelerator.device)
        check_lora(adapter, loaded)
        report["check"] = check_info(L, compare_outputs(L.model, loaded, L.batch, outputs(L)))
        report["metrics"] = {"split": L.split, "frod": frod_metrics, "lora": evaluate(L, loaded)}
        atomic_write_json(os.path.join(tmp, EXPORT_JSON), report)
        write_export_card(tmp, report)  # README.md: the model card, renamed into place with the export

    atomic_dir(job.out, write)
    print_lora(report)
    return report


def print_lora(report: Dict[str, Any]) -> None:
    from frod_cli.console import fmt_metrics

    layers = report["layers"]
    errors = [x["relative_error"] for x in layers]
    ranks = sorted({x["rank"] for x in layers})
    rule = f"rank {report['rank']}" if report["rank"] is not None else f"energy {report['energy']:g}"
    print(f"LoRA adapter ({rule}): {len(layers)} layers at rank {ranks[0]}" +
          (f"..{ranks[-1]}" if len(ranks) > 1 else "") + f", {report['lora_parameters']:,} parameters, "
          f"lora_alpha = r (scaling 1); modules_to_save: {', '.join(report['modules_to_save']) or 'none'}")
    print(f"relative error of dW (Frobenius): overall {report['relative_error']:.3e}; per layer min "
          f"{min(errors):.3e}, median {statistics.median(errors):.3e}, max {max(errors):.3e} "
          f"(every layer in {EXPORT_JSON})")
    c, m = report["check"], report["metrics"]
    print(f"PEFT's reload against frod's model: logits differ by {c['relative_diff']:.2e} of their scale on "
          f"{c['examples']} {c['split']} examples")
    print(f"{m['split']}: frod  {fmt_metrics(m['frod'])}")
    print(f"{m['split']}: lora  {fmt_metrics(m['lora'])}")


# ---- format=merged --------------------------------------------------------------------------------------------
def export_merged(job: Job, dtype: str) -> Dict[str, Any]:
    from frod_cli.runs import atomic_dir, atomic_write_json

    L = load(job)
    run_outputs = outputs(L)
    with torch.no_grad():
        before = run_outputs(L.model, L.batch)
    merged = (L.method.merge(L.model) if L.method is not None else L.model).to(getattr(torch, dtype)).eval()
    batch = {k: v.to(merged.dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in L.batch.items()}
    with torch.no_grad():
        after = run_outputs(merged, batch)
    diff = float((after.float() - before).abs().max())
    report = {"format": "merged", "run": job.run_dir, "method": job.run.method.name, "read": job.kind,
              "output": job.out, "dtype": dtype,
              "check": check_info(L, {"max_abs_diff": diff,
                                      "relative_diff": diff / float(before.abs().max().clamp(min=1e-30))})}

    def write(tmp: str) -> None:
        from frod_cli.training.evaluation import save_preprocessor

        merged.save_pretrained(tmp)
        save_preprocessor(L.preprocessor, merged, tmp)
        atomic_write_json(os.path.join(tmp, EXPORT_JSON), report)
        write_export_card(tmp, report)  # README.md: the model card, renamed into place with the export

    atomic_dir(job.out, write)
    print(f"merged {dtype} checkpoint of the {job.run.method.name} run ({job.kind}/): "
          f"AutoModel*.from_pretrained({job.out!r}), or serve it with vLLM / SGLang / TGI")
    print(f"largest |{dtype} merged - float32 trained| output difference on {report['check']['examples']} "
          f"{L.split} examples: {diff:.3e}")
    return report
