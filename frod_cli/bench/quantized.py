"""--quantized: FRoD on a 4-bit (NF4) base next to QLoRA (issue 21; docs/PERFORMANCE.md "4-bit bases").

--quantized memory      LLaMA-7B-shaped causal LMs (hidden 4096, MLP 11008, 32 heads; --q-blocks blocks, a small
                        vocabulary so the blocks dominate), base bf16 or NF4 (computed in bf16), adapted by frod or
                        lora on the paper's targets q k v o gate up: parameter+buffer bytes (the blocks; the whole
                        model with FRoD's shared bases), the peak and the time of a training step (AdamW), and the
                        peak of one evaluation forward without gradients, per call and with every W + dW held
                        (frod_cli.frod.evaluation_cache).
--quantized generation  the llama preset (SmolLM2-shaped, 30 layers) as a causal LM in float32, bf16 and NF4:
                        greedy decoding of --q-gen-batch prompts x --q-new-tokens tokens, with the adapter unmerged
                        (W + dW held: evaluation_cache open over the timing, as within one evaluation, its one-time
                        build timed apart; and per call) against the merged model (Method.merge: for NF4 merged/ as
                        frod writes it, dequantized base + dW in bf16), and the NF4 base alone.

--q-methods: `frod` adapts on the shape-only basis (frod_cli.bench.adapters.adapt_shape_only: V = V^-T = I,
sigma_i = column norms of W_i, read from a temporary basis cache by the registry's frod), whose tensors, sizes
and operations are the HO-GSVD basis's, without its minutes-long decomposition on a CPU; `frod:hogsvd` decomposes
(the real basis); `lora` is QLoRA on the NF4 base. The generation rows use the real basis.
"""
from __future__ import annotations

import contextlib
import copy
import gc
import json
import math
import time
from typing import Any, Dict, List, Sequence

import torch

from frod_cli.bench.adapters import adapt, adapt_shape_only
from frod_cli.bench.common import (DevicePeak, environment, fmt_bytes, int_list, malloc_trim, optimizer_state_bytes,
                                   params_buffers_bytes, ratio, refuse, storage_bytes, summarize, write_result)
from frod_cli.bench.presets import LLAMA_TARGETS, llama_config

QUANT_SHAPES = {"llama7b": dict(hidden=4096, intermediate=11008, heads=32, vocab=1024),
                "tiny": dict(hidden=64, intermediate=160, heads=2, vocab=256)}
QUANT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"]
Q_METHODS = ("frod", "frod:hogsvd", "lora")


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


def quant_adapt(model, method: str, args, targets: Sequence[str] = QUANT_TARGETS):
    """(the adapted model, its Method) for a --q-methods name, through the method registry."""
    if method == "frod":
        return adapt_shape_only(model, args, targets)
    if method == "frod:hogsvd":
        return adapt("frod", model, args, targets)
    if method == "lora":
        return adapt("lora", model, args, targets)
    raise ValueError(f"no 4-bit benchmark method {method!r} (run() checks --q-methods against {Q_METHODS})")


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


def eval_peaks(model, ids, device) -> Dict[str, Dict[str, int]]:
    """The peak of one no-grad forward, per call ("eval") and with every W + dW held ("eval_held")."""
    from frod_cli.frod import evaluation_cache

    model.eval()
    evals = {}
    for held in (False, True):
        gc.collect()
        malloc_trim()
        with DevicePeak(device) as ev, torch.no_grad(), \
                (evaluation_cache(model) if held else contextlib.nullcontext()):
            model(input_ids=ids)
        evals["eval_held" if held else "eval"] = {"peak": ev.peak, "extra": ev.extra}
    return evals


def quant_memory_row(args, blocks: int, base: str, method: str, log) -> Dict[str, Any]:
    """One (blocks, base, method) point of --quantized memory (module docstring)."""
    gc.collect()
    malloc_trim()
    dtype, device = torch.bfloat16, torch.device(args.device)
    model = quant_causal_lm(quant_llama7b_config(args.q_shape, blocks), dtype, "nf4" if base == "nf4" else "none",
                            args.seed, device)
    model, _ = quant_adapt(model, method, args)
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
    with DevicePeak(device) as mem:
        first = quant_step(model, opt, ids)
    times = [first] + [quant_step(model, opt, ids) for _ in range(args.q_steps - 1)]
    evals = eval_peaks(model, ids, device)
    row = {"blocks": blocks, "base": base, "method": method, "device": device.type, "blocks_bytes": quant_state_bytes(layers),
           "model_bytes": quant_state_bytes(model), "trainable": sum(p.numel() for p in trainable),
           "optimizer_bytes": optimizer_state_bytes(opt), "step_peak": mem.peak, "step_extra": mem.extra,
           "rss_before_step": mem.before, "step_s": summarize(times), **evals}
    log(f"# {blocks} blocks {base} {method}: blocks {fmt_bytes(row['blocks_bytes'])} MiB, step peak "
        f"{fmt_bytes(quant_peak(row))} MiB, step {row['step_s']['median']:.2f} s")
    del model, opt, layers, trainable
    return row


def quant_peak(r: Dict[str, Any], what: str = "step") -> int:
    """The peak of a step (or an evaluation: what="eval" / "eval_held"): the CUDA allocator's peak on a GPU; on
    the CPU the live state (parameters, buffers, 4-bit state, optimizer state) plus the block's resident-set
    growth, as the rest of the benchmarks report it (the resident set itself also holds what loading left:
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
        q, f, ql = at.get((b, "nf4", frod)), at.get((b, "bf16", frod)), at.get((b, "nf4", "lora"))
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


# ---- --quantized generation ------------------------------------------------------------------------------
class IdsOnlyTokenizer:
    """The little of a tokenizer that frod_cli.decoding.generate_ids reads (ids only: no text)."""

    pad_token_id, eos_token_id, unk_token_id = 0, None, None


def generation_row(base: str, cfg, prompts, settings, args) -> Dict[str, Any]:
    """One base dtype: the variants timed round-robin (A B C A B C ...) so that the load of a shared machine
    hits them alike; whether the unmerged adapter and the merged model pick the same tokens."""
    from frod_cli.decoding import generate_ids
    from frod_cli.frod import evaluation_cache

    dtype = torch.float32 if base == "float32" else torch.bfloat16
    model = quant_causal_lm(cfg, dtype, "nf4" if base == "nf4" else "none", args.seed, torch.device(args.device))
    variants = {"base_4bit": copy.deepcopy(model)} if base == "nf4" else {}
    model, method = quant_adapt(model, "frod:hogsvd", args, LLAMA_TARGETS)  # the preset's: every block linear
    perturb_frod(model)
    per_call = copy.deepcopy(model)
    merged = method.merge(copy.deepcopy(model))
    build_s = time_build(per_call, len(prompts))
    tok = IdsOnlyTokenizer()
    with evaluation_cache(model):  # open for the whole timing: the cache warm, as within one evaluation
        variants.update({"adapter_held": model, "adapter_per_call": per_call, "merged": merged})
        timings = time_generations(variants, tok, prompts, settings, args.q_repeats)
        same = generate_ids(model, tok, prompts, **settings) == generate_ids(merged, tok, prompts, **settings)
    return {"base": base, **timings, "build_s": build_s, "same_tokens": same,
            "held_vs_merged": ratio(timings["adapter_held"], timings["merged"]),
            "per_call_vs_merged": ratio(timings["adapter_per_call"], timings["merged"])}


def quant_generation(args, log) -> List[Dict[str, Any]]:
    """--quantized generation (module docstring): one row per base dtype."""
    cfg = llama_config(args)
    cfg.tie_word_embeddings = False  # frod keeps lm_head out of the 4-bit base (a tied head would be quantized too)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, cfg.vocab_size, (args.q_prompt_len,), generator=g).tolist() for _ in range(args.q_gen_batch)]
    settings = dict(max_new_tokens=args.q_new_tokens, do_sample=False, batch_size=args.q_gen_batch)
    rows = []
    for base in args.q_gen_bases.split(","):
        row = generation_row(base, cfg, prompts, settings, args)
        log(f"# generation {base}: {json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()})}")
        rows.append(row)
        gc.collect()
    return rows


def time_build(model, batch: int) -> float:
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


def perturb_frod(model) -> None:
    """Move lambda and S off their initial values, so that dW is not zero (merged and unmerged then differ
    from the base, and their tokens are compared for real)."""
    from frod_cli.frod import frod_layers

    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, layer in frod_layers(model):
            layer.frod_lambda.mul_(1 + 0.05 * torch.randn(layer.frod_lambda.shape, generator=g))
            layer.frod_s.add_(0.01 * torch.randn(layer.frod_s.shape, generator=g))


def time_generations(variants, tok, prompts, settings, repeats: int) -> Dict[str, float]:
    """name -> the fastest of `repeats` greedy generations (seconds) of each model after one untimed warm-up
    each, the variants taken in turn."""
    from frod_cli.decoding import generate_ids

    best = {name: math.inf for name in variants}
    for model in variants.values():
        generate_ids(model, tok, prompts, **{**settings, "max_new_tokens": 2})
    for _ in range(repeats):
        for name, model in variants.items():
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


# ---- the command ---------------------------------------------------------------------------------------
def compute_dtypes(args) -> List[str]:
    """What the rows compute in: memory's bf16 and NF4 rows in bfloat16; generation's bases in their dtype
    (NF4: bfloat16 compute)."""
    if args.quantized == "memory":
        return ["bfloat16"]
    return sorted({"float32" if base == "float32" else "bfloat16" for base in args.q_gen_bases.split(",")})


def selected(args) -> bool:
    return bool(args.quantized)


def run(args, log) -> int:
    methods, blocks = args.q_methods.split(","), int_list(args.q_blocks, "--q-blocks")
    unknown = [m for m in methods if m not in Q_METHODS]
    if unknown:
        refuse(f"unknown --q-methods name {unknown[0]!r}; use {', '.join(Q_METHODS)}")
    torch.set_num_threads(args.threads)
    env, t0 = environment(args.device, compute_dtypes(args)), time.perf_counter()
    if args.quantized == "memory":
        rows = [quant_memory_row(args, b, base, m, log) for b in blocks for base in ("bf16", "nf4") for m in methods]
        text = quant_memory_table(rows)
    else:
        rows = quant_generation(args, log)
        text = quant_generation_table(rows)
    result = {"environment": env, "mode": args.quantized, "rows": rows, "wall_s": time.perf_counter() - t0}
    return write_result(result, text, args.out or f"bench_out/quantized-{args.quantized}.json")


def add_args(ap) -> None:
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
