"""Structured configs for every recipe group, registered in Hydra's ConfigStore.

One dataclass per group (`model`, `task`, `method`, `optimizer`) plus the top-level `FrodRunConfig`.
A misspelt key or a wrong type in a recipe is refused by OmegaConf before any work starts.
A value such as `method.sparse_rate` travels one line: recipe YAML -> `MethodConfig` -> the method
registry -> `frod_cli.frod.FrodConfig`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import MISSING


@dataclass
class ModelConfig:
    # Hub id, local directory, "offline:<asset>" (see frod_cli.models.OFFLINE_MODELS)
    # or "tiny:<family>" (a small random model built from a config, for tests and smoke runs).
    name_or_path: str = MISSING
    revision: Optional[str] = None
    dtype: str = "float32"  # float32 | bfloat16 | float16: the frozen weights' dtype
    trust_remote_code: bool = False  # remote code from the Hub only when asked for explicitly
    # Overrides applied to the model config (e.g. hidden_size for tiny:* models, dropout rates).
    config_overrides: Dict[str, Any] = field(default_factory=dict)
    # The layers a method adapts for this model family when `method.target_modules` is not set
    # (suffixes of module paths, e.g. [query, key, value, dense] for BERT). None: every linear
    # layer outside the task head.
    target_modules: Optional[List[str]] = None


@dataclass
class TaskConfig:
    type: str = MISSING  # task registry key: seq_cls | image_cls | multiple_choice
    name: str = MISSING  # a label for reports, e.g. "sst2", "cifar10"
    source: str = "hub"  # hub | local | offline
    dataset: Optional[str] = None  # hub: dataset id; offline: source name (frod_cli.tasks.sources)
    subset: Optional[str] = None  # hub config name, e.g. "cola"
    data_files: Dict[str, str] = field(default_factory=dict)  # local: split -> path
    format: Optional[str] = None  # local: csv | json | parquet | imagefolder (guessed from suffix if None)
    # Columns
    text_fields: List[str] = field(default_factory=lambda: ["text"])  # 1 or 2 (paired) text columns
    image_field: str = "image"
    label_field: str = "label"
    labels: Optional[List[str]] = None  # class names; inferred from the data when None
    regression: bool = False  # e.g. STS-B
    # multiple choice: question column and choice columns (or one list column)
    question_field: str = "question"
    choices_field: str = "choices"
    context_field: Optional[str] = None
    # Splits: names in the source; missing validation/test are carved out of train, stratified, seeded
    train_split: str = "train"
    validation_split: Optional[str] = "validation"
    test_split: Optional[str] = "test"
    validation_fraction: float = 0.1
    test_fraction: float = 0.1
    max_train_samples: Optional[int] = None
    max_eval_samples: Optional[int] = None
    dedupe: bool = False  # drop exact duplicate inputs before splitting
    # Preprocessing
    max_length: int = 128
    image_size: Optional[int] = None  # defaults to the model's
    # Metrics: evaluate modules shipped in frod_cli/metrics; objective picks the best checkpoint
    metrics: List[str] = field(default_factory=lambda: ["accuracy"])
    objective: str = "accuracy"
    objective_mode: str = "max"  # max | min


@dataclass
class MethodConfig:
    name: str = MISSING  # method registry key: frod | full | lora | dora | pissa | vera | peft_frod
    target_modules: Optional[List[str]] = None  # suffixes or one regex (a single string in a list)
    modules_to_save: List[str] = field(default_factory=list)  # task head etc.; empty = the task's default
    # FRoD
    sparse_rate: float = 0.01
    regularization: float = 1e-3
    frod_seed: int = 0
    frod_mode: str = "auto"  # auto | materialize | project
    store_u: bool = False
    basis_dtype: str = "float32"
    layers_to_transform: Optional[List[int]] = None
    # LoRA family (PEFT)
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    vera_r: int = 256


@dataclass
class OptimizerConfig:
    name: str = "adamw"  # adamw | sgd
    lr: float = 1e-4  # every parameter group not listed in group_lr
    weight_decay: float = 0.01
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    # Per-group learning rates, keyed by the method's group names (FRoD: sparse, scale, head)
    group_lr: Dict[str, float] = field(default_factory=dict)
    # Multiplies lr and every group_lr: one knob for a learning-rate search (frod compare compare.stage=search)
    lr_scale: float = 1.0
    scheduler: str = "constant"  # constant | linear | cosine
    warmup_ratio: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float = 1.0


@dataclass
class TrainConfig:
    seed: int = 42
    epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides epochs
    batch_size: int = 32  # per device
    eval_batch_size: int = 64
    grad_accum: int = 1
    mixed_precision: str = "no"  # no | bf16 | fp16 (GPUs)
    eval_every: int = 0  # steps; 0 = at the end of each epoch
    log_every: int = 10
    early_stopping_patience: int = 0  # evaluations without improvement; 0 = off
    num_workers: int = 0
    cpu: bool = False  # force CPU even where a GPU exists
    save_merged: bool = True
    save_adapter: bool = True
    checkpoint_every: int = 0  # steps; 0 = only at evaluations (checkpoints/step-N/, for resume=<run dir>)
    keep_checkpoints: bool = False  # keep checkpoints/ once the run has finished
    progress: bool = True  # rich progress bar (main process only)
    eval_test: bool = True  # evaluate the best checkpoint on the test split at the end


@dataclass
class CompareConfig:
    """`frod compare recipe=<name>`: every method of `methods` on the same recipe, budget and seeds.

    stage=search runs each method at every `lr_scales` multiple of its rates (seed `search_seed`) and
    picks the best validation objective; stage=compare runs each method with its overrides for every
    seed and writes the report; stage=both feeds the search's winners into the comparison."""

    stage: str = "compare"  # compare | search | both
    # method -> its own overrides, written as on the command line, e.g. [optimizer.lr_scale=3.0].
    # A recipe adds methods to these three; on the command line, pick some with compare.only=[...]
    methods: Dict[str, List[str]] = field(default_factory=lambda: {"frod": [], "lora": [], "full": []})
    only: Optional[List[str]] = None  # a subset of `methods`
    seeds: List[int] = field(default_factory=lambda: [42])
    lr_scales: List[float] = field(default_factory=lambda: [0.3, 1.0, 3.0])
    search_seed: int = 42
    jobs: int = 1  # runs at once
    threads: int = 0  # torch threads per run; 0 = the machine's cores split between the `jobs` runs


@dataclass
class FrodRunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    recipe_name: str = "custom"
    output_dir: Optional[str] = None  # default: Hydra's run dir
    resume: Optional[str] = None  # a run directory: continue its last checkpoint (in that directory)
    compare: CompareConfig = field(default_factory=CompareConfig)  # read by `frod compare` only


@dataclass
class EvalRunConfig:
    """`frod eval path=<run dir | merged checkpoint> [task=<name>]`."""

    path: str = MISSING  # a run directory (uses merged/ or base + adapter/) or a saved model directory
    task: Optional[TaskConfig] = None  # default: the run's task (a checkpoint without a run needs task=...)
    splits: List[str] = field(default_factory=lambda: ["validation", "test"])
    batch_size: int = 64
    seed: Optional[int] = None  # default: the run's seed (it fixes the data split), else 42
    use_adapter: bool = False  # run dir: evaluate base model + adapter/ instead of merged/
    output: Optional[str] = None  # default: <run dir>/eval.json, or <checkpoint>/eval.json
    cpu: bool = False


@dataclass
class MergeRunConfig:
    """`frod merge run=<run dir>`: adapter/ + base model -> merged/."""

    run: str = MISSING
    output: Optional[str] = None  # default: <run>/merged
    check_batch_size: int = 8  # validation examples used to measure the merged/unmerged difference
    cpu: bool = False


def register_configs() -> None:
    """Register the schemas in Hydra's ConfigStore (idempotent)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="frod_train_schema", node=FrodRunConfig)
    cs.store(name="frod_eval_schema", node=EvalRunConfig)
    cs.store(name="frod_merge_schema", node=MergeRunConfig)
