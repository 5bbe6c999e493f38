#!/usr/bin/env python
"""Pretrain a small ViT on Fashion-MNIST (offline) as a real starting point for image fine-tuning.

Run (from the repository root; about 8-10 minutes on 2 CPU cores)::

    apt-get install -y dataset-fashion-mnist
    HF_HUB_OFFLINE=1 .venv/bin/python scripts/pretrain_vit.py

Output: ``$FROD_CACHE/vit-fmnist`` (``FROD_CACHE`` defaults to ``~/.cache/frod``), or ``--out DIR``:
``config.json`` + ``model.safetensors`` (``ViTForImageClassification``, 10 Fashion-MNIST labels),
``preprocessor_config.json`` (slow/PIL ``ViTImageProcessor``), ``pretrain_metrics.json`` (test accuracy,
steps, time, seed) and a short ``README.md``.

Model: ViT, image 28x28, patch 4 (49 patches + CLS), hidden 128, 4 layers, 4 heads, MLP 512 (~0.8M params).

Channels: the model is **single-channel** (``num_channels=1``). The saved processor resizes to 28x28
(bilinear), rescales by 1/255 and normalizes with mean 0.5 / std 0.5 (one value each), so it expects
grayscale input: PIL images in mode "L" or arrays of shape (H, W, 1). Convert RGB images with
``img.convert("L")`` first. MNIST / sklearn digits (8x8, values 0..16: multiply by 255/16 and cast
to uint8) work directly; fine-tune with
``AutoModelForImageClassification.from_pretrained(DIR, num_labels=K, ignore_mismatched_sizes=True)``.

Training: AdamW (lr 1e-3, wd 0.05), batch 128, linear warmup then cosine decay, random horizontal flip
and +-2 pixel shifts, seeded (``--seed``). ``--time-budget`` (minutes, default 9.5) guards the wall
clock: the learning-rate schedule follows ``max(step / total_steps, elapsed / budget)``, so a slow
machine ends early with a fully annealed schedule instead of overrunning. Written to a temporary
sibling folder and renamed into place when complete; an existing complete output is kept unless
``--force``.
"""
from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from frod_cli.frod.atomic import install_dir

ASSET_NAME = "vit-fmnist"
DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
APT_HINT = "apt-get install -y dataset-fashion-mnist"
METRICS = "pretrain_metrics.json"
FMNIST_LABELS = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
IMAGE_MEAN = [0.5]
IMAGE_STD = [0.5]
IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class AssetError(RuntimeError):
    """A failure with a one-line, user-facing explanation."""


# --------------------------------------------------------------------------- data


def default_out() -> Path:
    """$FROD_CACHE/<asset>: where frod reads offline:<asset> (frod_cli/paths.py, the one resolver)."""
    from frod_cli.paths import asset_dir

    return asset_dir(ASSET_NAME)


def read_idx(path) -> np.ndarray:
    """Read an IDX file (optionally .gz). Header: 2 zero bytes, dtype code, ndim, ndim big-endian
    uint32 sizes; data starts at 4 + 4 * ndim (16 for 3-d images, 8 for 1-d labels)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise AssetError(f"{path} is not an IDX file (bad magic)")
    code, ndim = raw[2], raw[3]
    if code not in IDX_DTYPES:
        raise AssetError(f"{path}: unknown IDX dtype code 0x{code:02x}")
    offset = 4 + 4 * ndim
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(IDX_DTYPES[code])
    count = int(np.prod(dims)) if dims else 0
    if len(raw) - offset != count * dtype.itemsize:
        raise AssetError(f"{path}: size mismatch (header says {dims}, payload {len(raw) - offset} bytes)")
    return np.frombuffer(raw, dtype=dtype, count=count, offset=offset).reshape(dims).astype(dtype.newbyteorder("="))


def load_fashion_mnist(root: Path = DATA_DIR):
    """(train_x uint8 [60000,28,28], train_y int64, test_x [10000,28,28], test_y)."""
    root = Path(root)
    names = {
        "train_x": "train-images-idx3-ubyte.gz", "train_y": "train-labels-idx1-ubyte.gz",
        "test_x": "t10k-images-idx3-ubyte.gz", "test_y": "t10k-labels-idx1-ubyte.gz",
    }
    missing = [n for n in names.values() if not (root / n).is_file()]
    if missing:
        raise AssetError(f"Fashion-MNIST not found in {root} (missing {missing[0]}); run: {APT_HINT}")
    d = {k: read_idx(root / v) for k, v in names.items()}
    for split in ("train", "test"):
        if len(d[f"{split}_x"]) != len(d[f"{split}_y"]):
            raise AssetError(f"Fashion-MNIST {split}: image/label count mismatch")
    return d["train_x"], d["train_y"].astype(np.int64), d["test_x"], d["test_y"].astype(np.int64)


# --------------------------------------------------------------------------- model


def build_config(image_size=28, patch_size=4, hidden_size=128, num_layers=4, num_heads=4, labels=FMNIST_LABELS):
    from transformers import ViTConfig

    return ViTConfig(
        image_size=image_size,
        patch_size=patch_size,
        num_channels=1,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=4 * hidden_size,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=len(labels),
        id2label={i: n for i, n in enumerate(labels)},
        label2id={n: i for i, n in enumerate(labels)},
    )


def make_processor(image_size=28):
    """Slow (PIL) ViT processor for grayscale input; matches ``to_pixel_values``."""
    try:  # transformers 5.x: explicit PIL backend (the fast one needs torchvision)
        from transformers import ViTImageProcessorPil as Proc
    except ImportError:  # older transformers: ViTImageProcessor is the slow one
        from transformers import ViTImageProcessor as Proc
    return Proc(
        do_resize=True,
        size={"height": image_size, "width": image_size},
        resample=2,  # PIL bilinear
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=IMAGE_MEAN,
        image_std=IMAGE_STD,
    )


def to_pixel_values(images_u8):
    """uint8 [B,H,W] -> float [B,1,H,W], same transform as the saved processor (no resize)."""
    import torch

    x = torch.as_tensor(np.ascontiguousarray(images_u8)).float().unsqueeze(1)
    return (x / 255.0 - IMAGE_MEAN[0]) / IMAGE_STD[0]


def augment(x, gen, max_shift=2):
    """Random horizontal flip and +-max_shift pixel translation (zero = background padding)."""
    import torch
    import torch.nn.functional as F

    b, _, h, w = x.shape
    flip = torch.rand(b, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    if max_shift <= 0:
        return x
    bg = -IMAGE_MEAN[0] / IMAGE_STD[0]
    p = F.pad(x, (max_shift,) * 4, value=bg)
    dy = torch.randint(0, 2 * max_shift + 1, (b,), generator=gen)
    dx = torch.randint(0, 2 * max_shift + 1, (b,), generator=gen)
    iy = (dy[:, None] + torch.arange(h)[None])[:, :, None]
    ix = (dx[:, None] + torch.arange(w)[None])[:, None, :]
    return p[torch.arange(b)[:, None, None], 0, iy, ix].unsqueeze(1)


def evaluate(model, images, labels, batch_size=1000) -> float:
    import torch

    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            logits = model(pixel_values=to_pixel_values(images[i : i + batch_size])).logits
            correct += int((logits.argmax(-1).numpy() == labels[i : i + batch_size]).sum())
    return correct / max(1, len(images))


def is_complete(out_dir: Path) -> bool:
    out_dir = Path(out_dir)
    try:
        m = json.loads((out_dir / METRICS).read_text())
    except (OSError, ValueError):
        return False
    files = ["config.json", "model.safetensors", "preprocessor_config.json"]
    return bool(m.get("complete")) and all((out_dir / f).is_file() for f in files)


def _readme(metrics: dict) -> str:
    return (
        f"# {ASSET_NAME}\n\nSmall ViT pretrained on Fashion-MNIST by `scripts/pretrain_vit.py` "
        f"(test accuracy {metrics['test_accuracy']:.4f} after {metrics['steps']} steps).\n\n"
        "Single-channel input (`num_channels=1`): feed grayscale PIL images (mode \"L\") or (H, W, 1) "
        "uint8 arrays to the processor; convert RGB with `img.convert(\"L\")`. The processor resizes "
        "to 28x28, rescales by 1/255 and normalizes with mean 0.5 / std 0.5.\n\n"
        "Fine-tune: `AutoModelForImageClassification.from_pretrained(path, num_labels=K, "
        "ignore_mismatched_sizes=True)`.\n"
    )


def pretrain(
    train_x, train_y, test_x, test_y, out_dir,
    *, steps=None, epochs=3.0, batch_size=128, lr=1e-3, weight_decay=0.05, warmup_frac=0.05,
    seed=0, time_budget_min=None, augment_data=True, config=None, log_every=100, extra_meta=None,
) -> dict:
    """Train a ViT on (train_x uint8 [N,28,28], train_y), evaluate on test, write ``out_dir`` atomically.

    ``steps`` overrides ``epochs``. Returns the metrics dict (also written to pretrain_metrics.json).
    """
    import torch
    from transformers import ViTForImageClassification

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    np.random.seed(seed)
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)

    config = config or build_config(image_size=train_x.shape[-1])
    model = ViTForImageClassification(config)
    n_params = sum(p.numel() for p in model.parameters())
    n = len(train_x)
    steps_per_epoch = max(1, n // batch_size)  # the last partial batch of an epoch is dropped
    total = int(steps) if steps else max(1, round(epochs * steps_per_epoch))
    warmup = max(1, int(warmup_frac * total))
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "position_embeddings" in name or "cls_token" in name else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr
    )
    budget_s = time_budget_min * 60 if time_budget_min else None

    print(
        f"[pretrain_vit] ViT {n_params / 1e6:.2f}M params, {n} train images, {total} steps "
        f"(batch {batch_size}, {total / steps_per_epoch:.2f} epochs), seed {seed}"
        + (f", time budget {time_budget_min} min" if budget_s else ""),
        flush=True,
    )
    t0 = time.time()
    step, order, pos = 0, rng.permutation(n), 0
    run_loss, run_n, stopped_early = 0.0, 0, False
    model.train()
    while step < total:
        progress = step / total
        if budget_s:
            progress = max(progress, (time.time() - t0) / budget_s)
            if progress >= 1.0:
                stopped_early = True
                break
        cur_lr = lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        for g in opt.param_groups:
            g["lr"] = cur_lr
        if pos + batch_size > n and pos > 0:
            order, pos = rng.permutation(n), 0
        idx = np.sort(order[pos : pos + batch_size])
        pos += batch_size
        x = to_pixel_values(train_x[idx])
        if augment_data:
            x = augment(x, gen)
        y = torch.as_tensor(train_y[idx], dtype=torch.long)
        loss = model(pixel_values=x, labels=y).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        run_loss += loss.item() * len(idx)
        run_n += len(idx)
        if log_every and (step % log_every == 0 or step == total):
            print(
                f"[pretrain_vit] step {step}/{total} loss {run_loss / run_n:.4f} lr {cur_lr:.2e} "
                f"{time.time() - t0:.0f}s",
                flush=True,
            )
            run_loss, run_n = 0.0, 0
    train_s = time.time() - t0
    acc = evaluate(model, test_x, test_y)
    metrics = {
        "complete": True,
        "dataset": "Fashion-MNIST (Debian dataset-fashion-mnist)",
        "test_accuracy": acc,
        "test_images": int(len(test_x)),
        "train_images": int(n),
        "steps": step,
        "planned_steps": total,
        "epochs": round(step / steps_per_epoch, 3),
        "stopped_by_time_budget": stopped_early,
        "batch_size": batch_size,
        "lr": lr,
        "weight_decay": weight_decay,
        "augment": "hflip + shift+-2" if augment_data else "none",
        "seed": seed,
        "train_seconds": round(train_s, 1),
        "torch_threads": torch.get_num_threads(),
        "params": n_params,
        "num_channels": 1,
        "input": "grayscale (PIL mode L or HxWx1 uint8); processor: resize 28, /255, mean 0.5, std 0.5",
    }
    metrics.update(extra_meta or {})

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        os.chmod(tmp, 0o755)
        model.save_pretrained(str(tmp))
        make_processor(config.image_size).save_pretrained(str(tmp))
        (tmp / "README.md").write_text(_readme(metrics))
        (tmp / METRICS).write_text(json.dumps(metrics, indent=2) + "\n")
        install_dir(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return metrics


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Pretrain a small single-channel ViT on Fashion-MNIST (offline) and save it as an HF folder.",
        epilog=f"Default output: $FROD_CACHE/{ASSET_NAME} (FROD_CACHE defaults to ~/.cache/frod). "
        f"Data: {DATA_DIR} ({APT_HINT}).",
    )
    p.add_argument("--out", type=Path, default=None, help=f"output folder (default: {default_out()})")
    p.add_argument("--force", action="store_true", help="retrain even if a complete output already exists")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--epochs", type=float, default=3.0, help="training epochs (default 3)")
    g.add_argument("--steps", type=int, default=None, help="training steps (overrides --epochs)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--time-budget", type=float, default=9.5,
                   help="training wall-clock budget in minutes; 0 disables (default 9.5)")
    p.add_argument("--no-augment", action="store_true", help="disable flip/shift augmentation")
    p.add_argument("--data-dir", type=Path, default=DATA_DIR, help=f"IDX .gz folder (default {DATA_DIR})")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    out_dir = (args.out or default_out()).expanduser().resolve()
    try:
        if not args.force and is_complete(out_dir):
            m = json.loads((out_dir / METRICS).read_text())
            print(
                f"[pretrain_vit] already done: {out_dir} (test accuracy {m.get('test_accuracy'):.4f}); "
                "use --force to retrain"
            )
            return 0
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        torch.set_num_threads(args.threads)
        t0 = time.time()
        train_x, train_y, test_x, test_y = load_fashion_mnist(args.data_dir)
        print(f"[pretrain_vit] loaded Fashion-MNIST {train_x.shape} / {test_x.shape} in {time.time() - t0:.1f}s")
        metrics = pretrain(
            train_x, train_y, test_x, test_y, out_dir,
            steps=args.steps, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
            time_budget_min=args.time_budget or None, augment_data=not args.no_augment,
        )
        print(
            f"[pretrain_vit] Fashion-MNIST test accuracy {metrics['test_accuracy']:.4f} "
            f"({metrics['steps']} steps, {metrics['epochs']} epochs); wrote {out_dir} "
            f"({folder_size(out_dir) / 1e6:.1f} MB) in {time.time() - t0:.1f}s total"
        )
        return 0
    except AssetError as e:
        print(f"[pretrain_vit] FAILED: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
