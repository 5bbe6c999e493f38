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

Methods, built through the method registry (frod_cli.methods) as `frod train` builds them: full, lora, dora,
pissa (r = alpha = --lora-r, dropout 0), vera, peft_frod (PEFT's FrodConfig), frod (ours, frod_mode=auto),
frod:<mode>[+u] with mode in auto|materialize|project and "+u" for store_u=true (e.g. frod:materialize+u).

Gradient accumulation (--grad-accum K): a "step" is one optimizer step, K micro-batches (each the
--batch x --seq batch, all different, the same K for every method; loss / K) then opt.step(). Our FRoD
then has two accumulation modes, appended as one more ":" part: frod[:<mode>[+u]]:micro_batch (the
plain path: every micro-batch builds dW and projects its gradient; also what "frod" alone means) and
frod[:<mode>[+u]]:window (method.accumulate=window: Method.accumulation(model, K) around the K micro-batches,
dW once, the gradient projected once at the window's exit, which is timed as part of backward).
"""
from __future__ import annotations

import copy
import gc
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from frod_cli.bench.adapters import build, check_names, frod_accumulation, frod_available, is_our_frod
from frod_cli.bench.common import (PeakRSS, environment, fmt_bytes, fmt_r, int_list, loadavg, malloc_trim,
                                   optimizer_state_bytes, params_buffers_bytes, ratio, refuse, rss_bytes, summarize,
                                   sync, write_result)
from frod_cli.bench.presets import PRESETS, Preset

DEFAULT_METHODS = "full,lora,peft_frod,frod,frod:materialize,frod:project,frod:materialize+u"
DEFAULT_METHODS_ACCUM = "full,lora,peft_frod,frod:micro_batch,frod:window"  # with --grad-accum K > 1
NUM_LABELS = 8
PHASES = ("forward", "backward", "optimizer", "total", "cpu", "window_exit")


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
    times: Dict[str, List[float]] = field(default_factory=lambda: {k: [] for k in PHASES})
    mem: Dict[str, Any] = field(default_factory=dict)
    extra: Dict[str, Any] = field(default_factory=dict)
    window: Optional[Callable] = None  # Method.accumulation(model, K) for the frod ...:window methods
    # after the micro-batches (and the window's exit), before the optimizer: e.g. the average over the ranks
    after_backward: Optional[Callable] = None


@dataclass
class Setup:
    """What every method of one run shares: the base, the micro-batches, the loss, the reference output."""

    base: torch.nn.Module
    batches: List[Dict[str, torch.Tensor]]
    loss_fn: Callable
    device: torch.device
    batch: int
    seq: int
    hidden: int
    tokens: int
    base_pb: int
    base_params: int
    ref_out: torch.Tensor

    @property
    def K(self) -> int:
        return len(self.batches)


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


# ---- one optimizer step ----------------------------------------------------------------------------------
def step_segments(r: Runner, batches, loss_fn, device, window_k: Optional[int] = None):
    """One optimizer step as a generator that yields after each micro-batch: forward + loss and backward
    of each micro-batch in `batches` (loss / K when K > 1), inside r.window's accumulation window when set
    (told window_k micro-batches, default len(batches); entered in the first forward, its exit, the
    projection, is timed as backward, as is r.after_backward), then opt.step() and zero_grad. Only its own
    segments are timed (wall and process CPU time), so that steps of several methods can be interleaved
    micro-batch by micro-batch. Returns the phase times."""
    K = len(batches)
    t = {"forward": 0.0, "backward": 0.0, "optimizer": 0.0, "window_exit": 0.0, "cpu": 0.0}
    losses: List[torch.Tensor] = []
    window = r.window(r.model, window_k or K) if r.window is not None else None
    entered: List[Any] = []

    def enter():  # in the first forward's timing
        if window is not None and not entered:
            entered.append(window.__enter__())

    try:
        for batch in batches:
            yield from micro_batch(r.model, batch, loss_fn, device, K, t, losses, enter)
        w = entered[0] if entered else None
        if w is not None:
            r.extra["window"] = dict(w.memory_bytes(), layers=len(w.layers), of=len(w.parts), builds=w.builds)
    except BaseException:  # also GeneratorExit: the window closes without projecting
        if entered:
            window.__exit__(*sys.exc_info())
        raise
    sync(device)
    c0, te = time.process_time(), time.perf_counter()
    if w is not None:
        window.__exit__(None, None, None)
        sync(device)
    tw = time.perf_counter()
    if r.after_backward is not None:
        r.after_backward()
        sync(device)
    t2 = time.perf_counter()
    r.opt.step()
    r.opt.zero_grad(set_to_none=True)
    sync(device)
    t3 = time.perf_counter()
    t["cpu"] += time.process_time() - c0
    t["window_exit"] = tw - te
    t["backward"] += t2 - te
    t["optimizer"] = t3 - t2
    t["total"] = t["forward"] + t["backward"] + t["optimizer"]
    total_loss = float(sum(float(x) for x in losses))
    if not math.isfinite(total_loss):
        raise RuntimeError(f"{r.name}: non-finite loss {total_loss}")
    return t


def micro_batch(model, batch, loss_fn, device, K: int, t: Dict[str, float], losses: List[torch.Tensor],
                enter: Callable[[], None]):
    """Forward + loss (divided by K) and backward of one micro-batch, its times added to `t` (`enter` runs
    first, timed with the forward); then a yield, where the next method's micro-batch may run."""
    sync(device)
    c0, ta = time.process_time(), time.perf_counter()
    enter()
    out = model(**batch)
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


def drain(gen):
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
                times[r.name] = drain(step_segments(r, batches, loss_fn, device, window_k))
    finally:
        gc.enable()
    if record:
        for r in runners:
            for k, v in times[r.name].items():
                r.times[k].append(v)


def memory_step(r: Runner, batches, loss_fn, device, record: bool = False, window_k: Optional[int] = None):
    """One step of `r` alone with its resident-set peak (and the CUDA allocator's) recorded in r.mem."""
    gc.collect()
    malloc_trim()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        cuda_before = torch.cuda.memory_allocated(device)
    with PeakRSS() as pk:
        run_steps([r], batches, loss_fn, device, record, window_k=window_k)
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


def frod_modes(model: torch.nn.Module, tokens: int, window_k: Optional[int] = None) -> Dict[str, int]:
    """How many FRoD layers run each evaluation order in a training step (FrodLinear.choose_mode), by role;
    with window_k, "window" for the layers that take an accumulation window of window_k micro-batches."""
    from frod_cli.frod import frod_layers
    from frod_cli.frod.targets import role_of

    counts: Dict[str, int] = {}
    for name, mod in frod_layers(model):
        try:
            mode = mod.choose_mode(tokens, True)
            if window_k is not None and mod.prefers_window(tokens, window_k):
                mode = "window"
        except Exception:  # noqa: BLE001
            mode = "?"
        key = f"{role_of(name)} ({mod.out_features}x{mod.in_features}): {mode}"
        counts[key] = counts.get(key, 0) + 1
    return counts


# ---- one run -----------------------------------------------------------------------------------------------
def prepare(args, preset: Preset, log) -> Setup:
    """The base model (frozen, in --dtype on --device), K micro-batches from one generator (the first is the
    K = 1 benchmark's batch), the loss and the base's output on the first batch."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    batch_size, seq = args.batch or preset.batch, args.seq or preset.seq
    torch.manual_seed(args.seed)
    base = preset.build(args).to(dtype=dtype, device=device)
    base.train()
    for p in base.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(args.seed)
    batches = []
    for _ in range(max(1, getattr(args, "grad_accum", 1) or 1)):
        batch = {k: v.to(device) for k, v in preset.make_batch(base, batch_size, seq, g).items()}
        if "pixel_values" in batch:
            batch["pixel_values"] = batch["pixel_values"].to(dtype)
        batches.append(batch)
    per_item = seq if "input_ids" in batches[0] else (base.config.image_size // base.config.patch_size) ** 2 + 1
    hidden = preset.hidden_of(base)
    s = Setup(base=base, batches=batches, loss_fn=make_loss(hidden, batch_size, device, args.seed), device=device,
              batch=batch_size, seq=seq, hidden=hidden, tokens=batch_size * per_item,
              base_pb=params_buffers_bytes(base), base_params=sum(p.numel() for p in base.parameters()),
              ref_out=output_of(base, batches[0]))
    log(f"# preset {preset.name}: {preset.description}; layers={getattr(base.config, 'num_hidden_layers', '?')} "
        f"hidden={hidden} params={s.base_params/1e6:.2f}M; batch {batch_size} x seq {seq} ({s.tokens} tokens)"
        f"{f' x {s.K} micro-batches per optimizer step' if s.K > 1 else ''}; "
        f"{args.dtype} on {device}, {torch.get_num_threads()} threads")
    return s


def build_runner(name: str, s: Setup, args, preset: Preset, log) -> Runner:
    """Method `name` on a deep copy of the base, through the registry: build times, trainables, bytes, its
    AdamW, and (not full) max |output - the base's output| at initialization."""
    gc.collect()
    malloc_trim()
    rss0 = rss_bytes()
    model = copy.deepcopy(s.base)
    method = build(name, args, preset.targets)
    c0, t0 = time.process_time(), time.perf_counter()
    model = method.adapt(model)
    sync(s.device)
    build_s, build_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    gc.collect()
    malloc_trim()
    resident = rss_bytes() - rss0
    diff = None if name == "full" else float((output_of(model, s.batches[0]) - s.ref_out).abs().max())
    r = Runner(name=name, model=model, opt=opt, build_s=build_s, build_cpu_s=build_cpu_s,
               trainable=sum(p.numel() for p in params), pb_bytes=params_buffers_bytes(model),
               resident_build_bytes=resident, init_max_abs_diff=diff)
    if frod_accumulation(name) == "window":
        r.window = method.accumulation
    if is_our_frod(name):
        from frod_cli.frod import summary

        r.extra["summary"] = {k: v for k, v in summary(model).items() if isinstance(v, (int, float, str))}
        r.extra["auto_modes"] = frod_modes(model, s.tokens, s.K if r.window is not None else None)
    log(f"  built {name:<20} in {build_s:7.2f} s (cpu {build_cpu_s:.2f} s); trainable {r.trainable:,}; "
        f"params+buffers {r.pb_bytes/2**20:.1f} MiB; init diff {diff}")
    return r


def measure(runners: List[Runner], s: Setup, args, log) -> Dict[str, Any]:
    """Warmup (also allocates optimizer state), one memory-probe step per method, then the timed steps, all
    round-robin. --probe-timed: the probe is also the first timed step; --warmup-micro-batches /
    --probe-micro-batches: shorter untimed steps (a step's peak does not grow with K beyond 2 micro-batches,
    every buffer exists from the first backward on). Returns what the config records of it."""
    K = s.K
    warm = s.batches[:getattr(args, "warmup_micro_batches", None) or K]
    probe = s.batches[:getattr(args, "probe_micro_batches", None) or K]
    probe_timed = bool(getattr(args, "probe_timed", False)) and args.steps > 0 and len(probe) == K
    interleave = bool(getattr(args, "interleave", False))
    for _ in range(args.warmup):
        run_steps(runners, warm, s.loss_fn, s.device, record=False, interleave=interleave, window_k=K)
    for r in runners:
        r.extra["optimizer_state_bytes"] = optimizer_state_bytes(r.opt)
        memory_step(r, probe, s.loss_fn, s.device, record=probe_timed, window_k=K)
    if probe_timed:
        log("  step 1 (memory probe): %s" % "  ".join(f"{r.name}={r.times['total'][-1]:.3f}s" for r in runners))
    for i in range(1 if probe_timed else 0, args.steps):
        order = runners if i % 2 == 0 or not args.reverse_alternate else runners[::-1]
        run_steps(order, s.batches, s.loss_fn, s.device, record=True, interleave=interleave)
        log("  step %d: %s" % (i + 1, "  ".join(f"{r.name}={r.times['total'][-1]:.3f}s" for r in runners)))
    return {"probe_timed": probe_timed, "warmup_micro_batches": len(warm), "probe_micro_batches": len(probe),
            "interleave": interleave}


def result_row(r: Runner, s: Setup) -> Dict[str, Any]:
    state = r.pb_bytes + r.extra["optimizer_state_bytes"]
    row = {
        "method": r.name,
        "step_s": {k: summarize(v) for k, v in r.times.items()},
        "build_s": r.build_s,
        "build_cpu_s": r.build_cpu_s,
        "trainable": r.trainable,
        "trainable_pct": 100.0 * r.trainable / s.base_params,
        "params_buffers_bytes": r.pb_bytes,
        "params_buffers_vs_base": r.pb_bytes / s.base_pb,
        "resident_after_build_bytes": r.resident_build_bytes,
        "optimizer_state_bytes": r.extra["optimizer_state_bytes"],
        "memory": dict(r.mem, state_bytes=state, step_peak_bytes=state + r.mem["step_peak_extra"]),
        "init_max_abs_diff": r.init_max_abs_diff,
        "grad_accum": s.K,
        "accumulation": frod_accumulation(r.name),
        # the accumulation window's buffers at the end of the memory-probe step's window (bytes): W + dW
        # (weights' dtype) and the float32 gradient sums, and how many FRoD layers took the window
        "window": r.extra.get("window"),
    }
    if "summary" in r.extra:
        row["frod_summary"] = r.extra["summary"]
    if r.extra.get("auto_modes"):
        row["frod_layer_modes"] = r.extra["auto_modes"]
    return row


def add_ratios(rows: List[Dict[str, Any]]) -> None:
    """vs_full and vs_peft_frod of every row: its figures over the reference's (None without the reference)."""
    by = {row["method"]: row for row in rows}
    for row in rows:
        t = row["step_s"]
        for ref in ("full", "peft_frod"):
            rr = by.get(ref)
            if rr is None:
                row[f"vs_{ref}"] = None
                continue
            rt = rr["step_s"]
            phases = {p: ratio(t[k]["median"], rt[k]["median"]) for p, k in
                      (("step", "total"), ("forward", "forward"), ("backward", "backward"), ("optimizer", "optimizer"))}
            row[f"vs_{ref}"] = {
                **phases,
                "build": ratio(row["build_s"], rr["build_s"]) if rr["build_s"] > 1e-6 else None,
                "build_cpu": ratio(row["build_cpu_s"], rr["build_cpu_s"]) if rr["build_cpu_s"] > 1e-6 else None,
                "step_cpu": ratio(t["cpu"]["median"], rt["cpu"]["median"]),
                "params_buffers": ratio(row["params_buffers_bytes"], rr["params_buffers_bytes"]),
                "step_peak_extra": ratio(row["memory"]["step_peak_extra"], rr["memory"]["step_peak_extra"]),
                "step_peak": ratio(row["memory"]["step_peak_bytes"], rr["memory"]["step_peak_bytes"]),
            }


def run_bench(args, preset: Preset, methods: List[str], log=print) -> Dict[str, Any]:
    """One point: every method built on the same base, measured, one row each."""
    s = prepare(args, preset, log)
    runners = [build_runner(name, s, args, preset, log) for name in methods]
    n_layers = getattr(s.base.config, "num_hidden_layers", None)
    s.base = None  # the copies stand alone: the base's memory goes before the measurements
    gc.collect()
    how = measure(runners, s, args, log)
    rows = [result_row(r, s) for r in runners]
    add_ratios(rows)
    return {
        "preset": preset.name,
        "description": preset.description,
        "config": {"batch": s.batch, "seq": s.seq, "tokens_per_step": s.tokens, "hidden": s.hidden,
                   "layers": n_layers, "grad_accum": s.K, "tokens_per_micro_batch": s.tokens,
                   "tokens_per_optimizer_step": s.K * s.tokens, **how,
                   "dtype": args.dtype, "device": str(s.device), "threads": torch.get_num_threads(),
                   "targets": preset.targets, "sparse_rate": args.sparse_rate, "lora_r": args.lora_r,
                   "optimizer": f"AdamW(lr={args.lr}, weight_decay=0.01)", "warmup": args.warmup, "steps": args.steps,
                   "seed": args.seed, "loss": "cross-entropy of a fixed random head on mean-pooled last hidden state"},
        "base_params": s.base_params,
        "base_params_buffers_bytes": s.base_pb,
        "rows": rows,
    }


# ---- tables --------------------------------------------------------------------------------------------
def table(result) -> str:
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
    for r in result["rows"]:
        a.append(time_line(r))
        b.append(memory_line(r))
    return "\n".join(a + [""] + b)


def time_line(r: Dict[str, Any]) -> str:
    t, vf, vp = r["step_s"], r.get("vs_full") or {}, r.get("vs_peft_frod") or {}
    return (f"| {r['method']} | {t['total']['median']:.3f} | {t['total']['min']:.2f}-{t['total']['max']:.2f} | "
            f"{t['forward']['median']:.3f} | {t['backward']['median']:.3f} | {t['optimizer']['median']:.3f} | "
            f"{fmt_r(vf.get('step'))} | {fmt_r(vp.get('step'))} | {t['cpu']['median']:.2f} | {fmt_r(vf.get('step_cpu'))} | "
            f"{fmt_r(vp.get('step_cpu'))} | {r['build_s']:.2f} | {r['build_cpu_s']:.2f} | "
            f"{fmt_r(vp.get('build'))} / {fmt_r(vp.get('build_cpu'))} |")


def memory_line(r: Dict[str, Any]) -> str:
    m, d, win, vf = r["memory"], r["init_max_abs_diff"], r.get("window"), r.get("vs_full") or {}
    mib = lambda b: f"{b / 2**20:.1f}"  # noqa: E731
    win_cell = (f"{mib(win['total'])} ({mib(win['weights'])} / {mib(win['grad_buffers'])}), "
                f"{win['layers']}/{win['of']} layers") if win else "-"
    cuda = ""
    if "cuda_peak" in m:
        cuda = f" (CUDA peak {fmt_bytes(m['cuda_peak'])} MiB, step extra {fmt_bytes(m['cuda_step_peak_extra'])} MiB)"
    return (f"| {r['method']} | {r['trainable']:,} | {r['trainable_pct']:.2f} | {fmt_bytes(r['params_buffers_bytes'])} | "
            f"{r['params_buffers_vs_base']:.3f} | {fmt_bytes(r['optimizer_state_bytes'])} | {fmt_bytes(m['step_peak_extra'])} | "
            f"{fmt_bytes(m['step_peak_bytes'])} | {fmt_r(vf.get('step_peak'))} | {'-' if d is None else f'{d:.2e}'}{cuda} | "
            f"{win_cell} |")


def sweep_table(points, key) -> str:
    methods = [r["method"] for r in points[0]["rows"]]
    others = [m for m in methods if m != "full"]
    head = f"| {key} | tokens | " + " | ".join(f"{m} s" for m in methods) + " | " + " | ".join(
        f"{m} x full" for m in others) + " |"
    lines = [head, "|" + "---|" * (2 + len(methods) + len(others))]
    for p in points:
        by = {r["method"]: r for r in p["rows"]}
        c = p["config"]
        v = {"hidden": c["hidden"], "grad_accum": c.get("grad_accum", 1)}.get(key, c["tokens_per_step"])
        cells = [f"{by[m]['step_s']['total']['median']:.3f}" for m in methods]
        rat = [fmt_r((by[m].get("vs_full") or {}).get("step")) for m in others]
        tokens = c.get("tokens_per_optimizer_step", c["tokens_per_step"])
        lines.append(f"| {v} | {tokens} | " + " | ".join(cells) + " | " + " | ".join(rat) + " |")
    return "\n".join(lines)


# ---- the command ---------------------------------------------------------------------------------------
def add_args(ap) -> None:
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
    add_sweep_args(ap)
    ap.add_argument("--allow-missing", action="store_true", help="drop frod methods when frod_cli.frod is not importable")
    ap.add_argument("--out", default=None, help="JSON path (default bench_out/<preset>[-sweep].json)")
    ap.add_argument("--quiet", action="store_true")


def add_sweep_args(ap) -> None:
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


def chosen_methods(args) -> List[str]:
    """--methods (or the default for K), every name checked before anything is built; without our FRoD,
    refused, or with --allow-missing dropped."""
    if args.grad_accum < 1:
        refuse("--grad-accum must be >= 1")
    if args.methods is None:
        accum = args.grad_accum > 1 or args.sweep_grad_accum
        args.methods = DEFAULT_METHODS_ACCUM if accum else DEFAULT_METHODS
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    check_names(methods)
    why = frod_available() if any(is_our_frod(m) for m in methods) else None
    if why:
        if not args.allow_missing:
            refuse(why + " (use --allow-missing to drop the frod methods)")
        print(f"# {why}: dropping the frod methods", file=sys.stderr)
        methods = [m for m in methods if not is_our_frod(m)]
    return methods


def sweep(args, preset: Preset, methods: List[str], log):
    """One run per value of --sweep-hidden / --sweep-tokens / --sweep-grad-accum: (points, key)."""
    key = "hidden" if args.sweep_hidden else ("tokens" if args.sweep_tokens else "grad_accum")
    values = int_list(args.sweep_hidden or args.sweep_tokens or args.sweep_grad_accum, f"--sweep-{key.replace('_', '-')}")
    points = []
    for v in values:
        a = copy.copy(args)
        if key == "hidden":
            a.hidden = v
        elif key == "grad_accum":
            a.grad_accum = v
        else:
            a.seq = args.seq or preset.seq
            a.batch = max(1, v // a.seq)
        points.append(run_bench(a, preset, methods, log))
        gc.collect()
        malloc_trim()
    return points, key


def run(args, log) -> int:
    methods = chosen_methods(args)
    torch.set_num_threads(args.threads)
    preset = PRESETS[args.preset]
    env, t0 = environment(args.device, [args.dtype]), time.perf_counter()
    if args.sweep_hidden or args.sweep_tokens or args.sweep_grad_accum:
        points, key = sweep(args, preset, methods, log)
        result = {"environment": env, "sweep": key, "points": points, "wall_s": time.perf_counter() - t0}
        text, default_out = sweep_table(points, key), f"bench_out/{args.preset}-sweep-{key}.json"
    else:
        result = run_bench(args, preset, methods, log)
        result.update(environment=env, wall_s=time.perf_counter() - t0)
        text, default_out = table(result), f"bench_out/{args.preset}.json"
    result["environment"]["loadavg_end"] = loadavg()
    return write_result(result, text, args.out or default_out)


def selected(args) -> bool:
    return True  # the default benchmark
