"""Structured configs for every recipe group, registered in Hydra's ConfigStore.

One dataclass per group (`model`, `task`, `optimizer`, `train`; `method` per method) plus the top-level `FrodRunConfig`.
A misspelt key or a wrong type in a recipe is refused by OmegaConf before any work starts.
The `method` group is typed per method: each method registers its own config dataclass with the method
(frod_cli/methods/), stored here under `method/<name>_schema`. A value such as `method.sparse_rate`
travels one line: recipe YAML -> `FrodMethodConfig` -> `FrodMethod.frod_config` -> `frod_cli.frod.FrodConfig`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Set

from omegaconf import MISSING


@dataclass
class ModelConfig:
    # Hub id, local directory, "offline:<asset>" (see frod_cli.models.OFFLINE_MODELS)
    # or "tiny:<family>" (a small random model built from a config, for tests and smoke runs).
    name_or_path: str = MISSING
    revision: Optional[str] = None
    # float32 | bfloat16 | float16 | auto: the frozen weights' dtype, which they compute in, and merged/'s.
    # auto: bfloat16 where the device computes it natively (a CPU with a oneDNN bfloat16 kernel, a GPU that
    # supports it), else float32 (float16 on a GPU without bfloat16); frod train writes what it picked into the
    # run's config. A dtype the CPU emulates is kept as asked, with a warning (frod_cli/precision.py).
    dtype: str = "float32"
    # none | nf4 | fp4: the frozen linear weights in 4 bits (bitsandbytes, double quantization); merged/ is
    # the dequantized base plus the update, in `dtype` (frod_cli/models.py)
    quantization: str = "none"
    # A 4-bit base only: the dtype its 4-bit layers dequantize to and multiply in, and in which its other
    # weights (embeddings, norms, LM head, task head) are held. None: `dtype`, except on a CPU that emulates
    # `dtype`, where it is float32 (the run's log says so; metrics.json has compute_dtype).
    compute_dtype: Optional[str] = None
    trust_remote_code: bool = False  # remote code from the Hub only when asked for explicitly
    # Overrides applied to the model config (e.g. hidden_size for tiny:* models, dropout rates).
    config_overrides: Dict[str, Any] = field(default_factory=dict)
    # The layers a method adapts for this model family when `method.target_modules` is not set
    # (suffixes of module paths, e.g. [query, key, value, dense] for BERT). None: every linear
    # layer outside the task head.
    target_modules: Optional[List[str]] = None


@dataclass
class SamplingConfig:
    """How text is generated: greedy by default (do_sample=false); the sampling knobs apply when sampling."""

    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 50
    num_beams: int = 1
    repetition_penalty: float = 1.0


def check_sampling(node: Any, prefix: str = "") -> None:
    """Refuse, before any model loads, settings generation cannot run with (transformers would raise deep inside
    `generate`, or quietly ignore them)."""
    from frod_cli import FrodCliError

    def bad(key: str, rule: str) -> None:
        raise FrodCliError(f"{prefix}{key} must be {rule}, got {node[key]!r}")

    if int(node.max_new_tokens) < 1:
        bad("max_new_tokens", "at least 1")
    if int(node.num_beams) < 1:
        bad("num_beams", "at least 1")
    if not float(node.repetition_penalty) > 0:
        bad("repetition_penalty", "> 0")
    if node.do_sample:
        if not float(node.temperature) > 0:
            bad("temperature", "> 0 when sampling (do_sample=true; greedy decoding is do_sample=false)")
        if not 0 < float(node.top_p) <= 1:
            bad("top_p", "in (0, 1]")
        if int(node.top_k) < 0:
            bad("top_k", ">= 0 (0 turns top-k filtering off)")
    for key, low in (("batch_size", 1), ("max_examples", 0)):
        if key in node and int(node[key]) < low:
            bad(key, f"at least {low}")


@dataclass
class GenerationConfig(SamplingConfig):
    """Generation in causal_lm evaluation (on `max_examples` examples of each evaluated split)."""

    max_examples: int = 64  # examples of each evaluated split that are generated and scored; 0 = all
    batch_size: int = 16


def open_map() -> Any:
    """The default of a Dict[str, str] field whose keys are the user's (split names, roles, label aliases, column
    renames): Hydra closes the whole config (struct mode) before it applies the command line, so `task.role_map=
    {bot: assistant}` would be refused as "Key 'bot' is not in struct" on an empty typed dict; this node stays
    open, so new keys merge in as printed, and keeps its str -> str types (`task.role_map.bot=[1]` is refused)."""
    from omegaconf import DictConfig

    return DictConfig({}, key_type=str, element_type=str, flags={"struct": False})


@dataclass
class TaskConfig:
    """The keys every task type has: where the data comes from, its splits and sizes, and the metric that picks the
    best checkpoint. Each task type extends it with its own keys (its config dataclass in frod_cli/tasks/<type>.py,
    registered with the type and stored as `task/schema/<type>`; a task YAML names it in its defaults), so a key of
    another type is refused when the config is composed, not ignored."""

    type: str = MISSING  # the task registry key (frod_cli/tasks/): set by the type's schema
    name: str = MISSING  # a label for reports, e.g. "sst2", "cifar10"
    source: str = "hub"  # hub | local | offline
    dataset: Optional[str] = None  # hub: dataset id; offline: source name (frod_cli.tasks.sources)
    subset: Optional[str] = None  # hub config name, e.g. "cola"
    data_files: Dict[str, str] = field(default_factory=open_map)  # local: split -> path
    format: Optional[str] = None  # local: csv | json | parquet | imagefolder (guessed from suffix if None)
    # Splits: names in the source; missing validation/test are carved out of train (stratified by label), seeded
    train_split: str = "train"
    validation_split: Optional[str] = "validation"
    test_split: Optional[str] = "test"
    validation_fraction: float = 0.1
    test_fraction: float = 0.1
    # A test set from another data set (train on MetaMathQA, test on GSM8K): a Hub id (or a local file),
    # its config and split, and renames of its columns onto this task's ({question: query, answer: response})
    test_dataset: Optional[str] = None
    test_subset: Optional[str] = None
    test_dataset_split: str = "test"
    test_rename: Dict[str, str] = field(default_factory=open_map)
    max_train_samples: Optional[int] = None
    max_eval_samples: Optional[int] = None
    dedupe: bool = False  # drop exact duplicate inputs before splitting
    max_length: int = 128  # tokens per example (the type says how longer ones are cut)
    # The validation metric that picks the best checkpoint (one the task reports) and its direction
    objective: str = "accuracy"
    objective_mode: str = "max"  # max | min


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
class FsdpConfig:
    """`train.fsdp`: shard the weights over the processes of a launch (FSDP2, torch's fully_shard, through
    Accelerate; frod_cli/training/distributed.py, docs/SCALING.md): the frozen weights of an adapter method (its
    trainables stay whole on every rank), every weight and its AdamW state for method=full. One process: ignored
    (nothing to shard)."""

    enabled: bool = False
    # Module class names that become one FSDP unit each (their weights are gathered for their forward);
    # None: the model's `_no_split_modules` (its decoder/encoder layer class, e.g. LlamaDecoderLayer).
    wrap: Optional[List[str]] = None
    reshard_after_forward: bool = True  # free the gathered weights after each unit's forward (ZeRO-3)
    cpu_offload: bool = False  # keep the shards (and their gradients) in CPU memory between uses
    state_dict_type: str = "FULL_STATE_DICT"  # FULL_STATE_DICT | SHARDED_STATE_DICT
    version: int = 2  # FSDP2 only
    # Only the first process of each node reads the weights; the others build the model on the meta device and
    # receive their shards from rank 0 (one copy of the weights per node in host memory instead of one per process).
    load_on_rank0: bool = True


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
    # A directory holding a finished run is refused; true replaces that run once the new one has finished
    # (frod_cli/runs/directory.py): until then the old run stays whole.
    overwrite: bool = False
    keep_checkpoints: bool = False  # keep checkpoints/ once the run has finished
    progress: bool = True  # rich progress bar (main process only)
    eval_test: bool = True  # evaluate the best checkpoint on the test split at the end
    # Experiment trackers through Accelerate (tensorboard, wandb, mlflow, ...); files under <run>/trackers
    log_with: List[str] = field(default_factory=list)
    # Activation checkpointing (the model's gradient_checkpointing_enable, non-reentrant)
    gradient_checkpointing: bool = False
    # Sharded data parallelism (FSDP2 through Accelerate) for multi-process launches
    fsdp: FsdpConfig = field(default_factory=FsdpConfig)
    # Upload the finished run to this Hugging Face Hub repo (<owner>/<name>), as `frod push` does
    # (frod_cli/share/hub.py); checked before training (a valid id, a token, not offline)
    push_to_hub: Optional[str] = None
    hub_private: bool = False  # a new repo is created private
    hub_revision: Optional[str] = None  # the branch to push to (created if missing); None: main


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
    # Each task type's own config (frod_cli/tasks/<type>.py, stored as task/schema/<type>): the task YAML names it,
    # and `task.type=<type>` on the command line switches to it (frod train's prepare).
    task: Any = MISSING
    # Each method's own config (frod_cli/methods/<file>.py, stored as method/<name>_schema): the method
    # group's YAML selects it, so the keys of one method are refused for another.
    method: Any = MISSING
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    recipe_name: str = "custom"
    output_dir: Optional[str] = None  # default: Hydra's run dir
    resume: Optional[str] = None  # a run directory: continue its last checkpoint (in that directory)
    compare: CompareConfig = field(default_factory=CompareConfig)  # read by `frod compare` only
    # Settings a recipe gives one method only, e.g. {frod: {sparse_rate: 0.02}}: applied when that method
    # is chosen, below the command line's method.* keys (so `method=lora` runs the same recipe unchanged).
    per_method: Dict[str, Any] = field(default_factory=dict)


@dataclass
class HarnessConfig:
    """`frod eval path=<run> harness.tasks=[...]`: lm-evaluation-harness on the run's model, in process
    (frod_cli/harness/); results in harness.json. Empty tasks: frod's own evaluation instead."""

    tasks: List[str] = field(default_factory=list)  # lm-eval task or group names (recipes/harness/ lists some)
    num_fewshot: Optional[int] = None  # None: each task's own default (0 for most)
    limit: Optional[float] = None  # examples per task (a fraction when < 1); None: all. For trying, not reporting
    include_path: Optional[str] = None  # a directory of your own task YAMLs (lm-eval's --include_path)
    log_samples: bool = False  # per-example inputs, log-likelihoods and scores into harness.json ("samples")
    apply_chat_template: bool = False  # render prompts with the tokenizer's chat template


@dataclass
class EvalRunConfig:
    """`frod eval path=<run dir | merged checkpoint> [task=<name>]`; with harness.tasks, lm-evaluation-harness."""

    path: str = MISSING  # a run directory (uses merged/ or base + adapter/) or a saved model directory
    task: Any = None  # default: the run's task (a checkpoint without a run needs task=...)
    splits: List[str] = field(default_factory=lambda: ["validation", "test"])
    batch_size: int = 64
    seed: Optional[int] = None  # default: the run's seed (it fixes the data split), else 42
    use_adapter: bool = False  # run dir: evaluate base model + adapter/ instead of merged/
    output: Optional[str] = None  # default: <path>/eval.json (with harness.tasks: <path>/harness.json)
    overwrite: bool = False  # replace an existing output (refused otherwise)
    cpu: bool = False
    harness: HarnessConfig = field(default_factory=HarnessConfig)


@dataclass
class GenerateRunConfig(SamplingConfig):
    """`frod generate path=<run dir | model dir> prompt="..." | prompts=<file>` (+ the sampling keys)."""

    path: str = MISSING
    prompt: Optional[str] = None
    prompts: Optional[str] = None  # a text file (one prompt per line) or .jsonl with a "prompt" field
    chat: Optional[bool] = None  # apply the tokenizer's chat template; default: when it has one
    system_prompt: Optional[str] = None
    max_new_tokens: int = 64
    seed: int = 0
    batch_size: int = 8
    use_adapter: bool = False  # run dir: base model + adapter/ instead of merged/
    output: Optional[str] = None  # also write prompt/answer records as JSONL here
    overwrite: bool = False  # replace an existing output file (refused otherwise)
    cpu: bool = False


@dataclass
class MergeRunConfig:
    """`frod merge run=<run dir>`: adapter/ + base model -> merged/."""

    run: str = MISSING
    output: Optional[str] = None  # default: <run>/merged (the report goes to <run>/merge.json, else into output)
    overwrite: bool = False  # replace an existing output directory (refused otherwise)
    check_batch_size: int = 8  # validation examples used to measure the merged/unmerged difference
    cpu: bool = False
    # Fold the trained update into this model (a directory, Hub id or tiny:/offline: name, loaded unquantized in
    # the run's model.dtype) instead of the run's own base: the unquantized original of a 4-bit base
    base: Optional[str] = None


@dataclass
class ExportRunConfig:
    """`frod export path=<run dir> format=peft|lora|merged [output=<dir>]`: the trained model for serving."""

    path: str = MISSING  # a run directory, or its adapter/ or merged/
    format: str = MISSING  # peft | lora | merged
    output: Optional[str] = None  # default: <run dir>/export-<format>
    overwrite: bool = False  # replace an existing output directory (refused otherwise)
    rank: Optional[int] = None  # format=lora: every layer's rank (at most min(out, in))
    energy: Optional[float] = None  # format=lora: per layer, the smallest rank keeping this share of dW's sum sigma^2
    dtype: Optional[str] = None  # format=merged: float32 | bfloat16 | float16 (default: the run's model.dtype)
    tolerance: Optional[float] = None  # format=peft: largest relative difference of PEFT's reload (default 1e-3)
    check_batch_size: int = 8  # validation examples the exported model's outputs are compared on
    cpu: bool = False


@dataclass
class PushRunConfig:
    """`frod push path=<run dir | export dir> repo=<owner>/<name>`: upload to the Hugging Face Hub (share/hub.py)."""

    path: str = MISSING  # a finished run directory (or its merged/ or adapter/), or a `frod export` output
    repo: str = MISSING  # the Hub repo id, <owner>/<name> (created if missing)
    private: bool = False  # create the repo private (an existing repo keeps its visibility)
    revision: Optional[str] = None  # the branch to push to (created if missing); None: main
    upload: str = "auto"  # a run: auto (merged/ if the run has it, else adapter/) | merged | adapter
    include_checkpoints: bool = False  # also upload the run's checkpoints/ (train.keep_checkpoints=true runs)
    keep_card: bool = False  # upload the directory's own README.md as it is, not a card written afresh
    dry_run: bool = False  # print what would be uploaded; upload nothing (needs no token)


@dataclass
class CacheRunConfig:
    """`frod cache [list|clear] [base=<name>]`: the FRoD basis cache (frod_cli/frod/cache.py)."""

    action: str = "list"  # list | clear
    base: Optional[str] = None  # only the entries of this base model (as `frod cache list` names it)
    dir: Optional[str] = None  # default: $FROD_CACHE_DIR, else ~/.cache/frod/basis


def override_keys(overrides: Sequence[str]) -> Set[str]:
    """The keys a command line sets, whatever its Hydra prefix (`+key=`, `++key=`, `~key`)."""
    return {o.lstrip("+~").split("=", 1)[0] for o in overrides}


def apply_per_method(cfg: Any, user_overrides: Sequence[str] = ()) -> None:
    """A recipe's `per_method.<name>` settings apply to that method only, below the command line: a recipe
    can tune FRoD (`per_method.frod.sparse_rate`) and still run `method=lora` unchanged."""
    import logging

    from omegaconf import OmegaConf, open_dict
    from omegaconf.errors import ConfigKeyError

    from frod_cli import FrodCliError

    settings = (cfg.get("per_method") or {}).get(cfg.method.name) or {}
    given = override_keys(user_overrides)
    applied = {}
    for key, value in OmegaConf.to_container(OmegaConf.create(dict(settings))).items():
        if f"method.{key}" in given:
            continue
        applied[key] = value
        try:
            with open_dict(cfg):
                cfg.method[key] = value
        except ConfigKeyError:
            keys = ", ".join(cfg.method.keys())
            raise FrodCliError(f"per_method.{cfg.method.name}.{key}: method {cfg.method.name} has no key {key!r} "
                               f"(its keys: {keys})") from None
    if applied:
        logging.getLogger("frod.config").info("the recipe's per_method.%s settings: %s", cfg.method.name,
                 ", ".join(f"{k}={v}" for k, v in applied.items()))
