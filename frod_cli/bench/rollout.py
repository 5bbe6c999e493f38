"""--rollout: online RL's costs (issue 28; docs/PERFORMANCE.md "RL rollouts").

--rollout throughput  the llama preset (SmolLM2-shaped; --layers/--hidden/--intermediate shrink it) as a causal LM
                      in each of --r-bases (float32, bfloat16, nf4 computed in bfloat16): --r-groups prompts x G =
                      --r-group-size completions of --r-new-tokens tokens sampled the way a GRPO step samples them
                      (frod_cli.rl.rollout.sample_groups, seeded per group), by FRoD with its adapter unmerged,
                      each rollout inside method.evaluation_context (so the time includes building every W + dW at
                      the rollout's first call and freeing it at its end), against the merged model (Method.merge).
                      Tokens generated per second, best of --r-repeats, the two taken in turn; target: FRoD >= 0.9x.
--rollout memory      one GRPO step (rollout, rewards, advantages, the loss of every completion, backward, AdamW)
                      by frod (the shape-only basis, as --quantized memory) and lora on the same base (bf16 and
                      NF4): the peak of the rollout phase and of the update phase, and what the adapter itself
                      holds, against the formula
                        extra_update = trainables x 16 B (fp32 value, gradient, Adam's two moments) + fixed buffers
                                       (FRoD: V and V^-T per category, the pattern; LoRA: none)
                        extra_rollout(FRoD) = sum over adapted layers of m x n x (bytes of the compute dtype): the
                                       W + dW held during the rollout, freed before the update.
"""
from __future__ import annotations

import contextlib
import copy
import gc
import json
import math
import time
from typing import Any, Dict, List

import torch

from frod_cli.bench.adapters import adapt, adapt_shape_only
from frod_cli.bench.common import DevicePeak, environment, fmt_bytes, malloc_trim, params_buffers_bytes, ratio, refuse, \
    write_result
from frod_cli.bench.presets import LLAMA_TARGETS, llama_config
from frod_cli.bench.quantized import perturb_frod, quant_causal_lm, time_build

BASES = ("float32", "bfloat16", "nf4")


class IdsTokenizer:
    """What sampling and rewards read of a tokenizer, over ids only (the random model has no vocabulary)."""

    pad_token_id, eos_token_id, unk_token_id = 0, None, None

    @staticmethod
    def decode(ids, skip_special_tokens: bool = True) -> str:
        return " ".join(map(str, ids))


def base_model(args, base: str) -> torch.nn.Module:
    cfg = llama_config(args)
    cfg.tie_word_embeddings = False  # frod keeps lm_head out of the 4-bit base
    cfg.eos_token_id = None  # every completion runs to the limit: equal token counts for every variant
    dtype = torch.float32 if base == "float32" else torch.bfloat16
    return quant_causal_lm(cfg, dtype, "nf4" if base == "nf4" else "none", args.seed, torch.device(args.device))


def prompts_of(args, vocab: int) -> List[List[int]]:
    g = torch.Generator().manual_seed(args.seed + 1)
    return [torch.randint(1, vocab, (args.r_prompt_len,), generator=g).tolist() for _ in range(args.r_groups)]


def rollout_tokens(model, method, prompts, args, step: int) -> int:
    """One rollout as a GRPO step runs it; the tokens it generated."""
    from frod_cli.rl.rollout import sample_groups

    with method.evaluation_context(model) if method is not None else contextlib.nullcontext():
        ro = sample_groups(model, IdsTokenizer(), prompts, args.r_group_size, seed=args.seed, step=step,
                           groups_per_call=args.r_groups_per_call, max_new_tokens=args.r_new_tokens, top_k=0)
    return sum(ro.lengths())


def throughput_row(args, base: str, log) -> Dict[str, Any]:
    model = base_model(args, base)
    model, method = adapt("frod", model, args, LLAMA_TARGETS)
    perturb_frod(model)
    merged = method.merge(copy.deepcopy(model))
    prompts = prompts_of(args, model.config.vocab_size)
    variants = {"frod_adapter": (model, method), "merged": (merged, None)}
    for m, meth in variants.values():  # warm-up, untimed
        rollout_tokens(m, meth, prompts[:1], args, step=0)
    best = {name: math.inf for name in variants}
    tokens = {}
    for rep in range(args.r_repeats):
        for name, (m, meth) in variants.items():
            t0 = time.perf_counter()
            tokens[name] = rollout_tokens(m, meth, prompts, args, step=rep)
            best[name] = min(best[name], time.perf_counter() - t0)
    row = {"base": base, **{f"{n}_tokens_per_s": tokens[n] / best[n] for n in variants},
           **{f"{n}_s": best[n] for n in variants}, "tokens": tokens["merged"],
           "build_s": time_build(model, len(prompts) * args.r_group_size)}
    row["adapter_vs_merged"] = ratio(row["frod_adapter_tokens_per_s"], row["merged_tokens_per_s"])
    log(f"# rollout {base}: {json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()})}")
    return row


def _even_ids(prompts, completions, completion_ids, **columns):
    """A reward with spread (the share of even token ids): the advantages, and so the gradients, are not zero."""
    return [sum(t % 2 == 0 for t in ids) / max(len(ids), 1) for ids in completion_ids]


def grpo_step_peaks(model, method, args) -> Dict[str, int]:
    """Peaks (bytes) of one GRPO step's two phases: collect (rollout, rewards, advantages) and update (the loss of
    every completion in micro-batches of --r-micro-batch, backward, AdamW)."""
    from frod_cli.rl.step import GrpoSettings, batch_loss, collect
    from frod_cli.tasks.rewards import RewardSet

    params = [p for group in method.param_groups(model).values() for p in group]
    opt = torch.optim.AdamW(params, lr=1e-4)
    settings = GrpoSettings(group_size=args.r_group_size, max_completion_length=args.r_new_tokens, top_k=0,
                            groups_per_call=args.r_groups_per_call)
    prompts, tok = prompts_of(args, model.config.vocab_size), IdsTokenizer()
    rewards = RewardSet([_even_ids], [1.0], ["even_ids"])
    model.train()
    out = {}
    for step in range(args.r_steps):  # the first step allocates Adam's moments; the last one is reported
        gc.collect()
        malloc_trim()
        with DevicePeak(args.device) as rollout_peak:
            data = collect(model, method, tok, prompts, [""] * len(prompts), {}, rewards, settings, seed=args.seed,
                           step=step)
        rows = list(range(len(data.rollout.completions)))
        with DevicePeak(args.device) as update_peak:
            for start in range(0, len(rows), args.r_micro_batch):
                loss, _ = batch_loss(model, data, tok, rows[start : start + args.r_micro_batch], settings)
                loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        out = {"rollout_peak": rollout_peak.peak, "update_peak": update_peak.peak}
    return out


def memory_row(args, base: str, name: str) -> Dict[str, Any]:
    model = base_model(args, base)
    before = params_buffers_bytes(model)
    model, method = adapt_shape_only(model, args, LLAMA_TARGETS) if name == "frod" else adapt(name, model, args,
                                                                                             LLAMA_TARGETS)
    adapter = params_buffers_bytes(model) - before
    trainables = sum(p.numel() for p in model.parameters() if p.requires_grad)
    held = 0
    if name == "frod":
        from frod_cli.frod import evaluation_cache_bytes

        held = evaluation_cache_bytes(model)
    row = {"base": base, "method": name, "trainables": trainables, "adapter_bytes": adapter,
           "formula_update_extra": adapter + 12 * trainables, "formula_rollout_held": held,
           **grpo_step_peaks(model, method, args)}
    del model, method
    gc.collect()
    return row


def memory_table(rows: List[Dict[str, Any]]) -> str:
    lines = ["| base | method | trainables | adapter bytes | formula: update extra | formula: rollout W+dW held | "
             "rollout peak | update peak |", "|" + "---|" * 8]
    for r in rows:
        lines.append(f"| {r['base']} | {r['method']} | {r['trainables']:,} | {fmt_bytes(r['adapter_bytes'])} | "
                     f"{fmt_bytes(r['formula_update_extra'])} | {fmt_bytes(r['formula_rollout_held'])} | "
                     f"{fmt_bytes(r['rollout_peak'])} | {fmt_bytes(r['update_peak'])} |")
    by = {(r["base"], r["method"]): r for r in rows}
    for base in sorted({r["base"] for r in rows}):
        f, lo = by.get((base, "frod")), by.get((base, "lora"))
        if f and lo:
            lines.append(f"- {base}: update peak frod - lora {fmt_bytes(f['update_peak'] - lo['update_peak'])} (formula "
                         f"{fmt_bytes(f['formula_update_extra'] - lo['formula_update_extra'])}); rollout peak frod - "
                         f"lora {fmt_bytes(f['rollout_peak'] - lo['rollout_peak'])} (formula "
                         f"{fmt_bytes(f['formula_rollout_held'])} held)")
    return "\n".join(lines)


def throughput_table(rows: List[Dict[str, Any]]) -> str:
    lines = ["| base | FRoD adapter, W+dW built and freed per rollout (tokens/s) | merged (tokens/s) | adapter / merged "
             "| tokens per rollout | building W+dW alone (s) | merged rollout (s) |", "|" + "---|" * 7]
    for r in rows:
        lines.append(f"| {r['base']} | {r['frod_adapter_tokens_per_s']:.1f} | {r['merged_tokens_per_s']:.1f} | "
                     f"{r['adapter_vs_merged']:.2f} | {r['tokens']} | {r['build_s']:.2f} | {r['merged_s']:.2f} |")
    return "\n".join(lines)


# ---- the command ---------------------------------------------------------------------------------------
def selected(args) -> bool:
    return bool(args.rollout)


def run(args, log) -> int:
    bases = args.r_bases.split(",")
    unknown = [b for b in bases if b not in BASES]
    if unknown:
        refuse(f"unknown --r-bases name {unknown[0]!r}; use {', '.join(BASES)}")
    counts = ("r_groups", "r_group_size", "r_new_tokens", "r_repeats", "r_micro_batch", "r_groups_per_call",
              "r_prompt_len", "r_steps")
    low = next((c for c in counts if getattr(args, c) < 1), None)
    if low:
        refuse(f"--{low.replace('_', '-')} must be at least 1, got {getattr(args, low)}")
    torch.set_num_threads(args.threads)
    dtypes = sorted({"float32" if b == "float32" else "bfloat16" for b in bases})
    env, t0 = environment(args.device, dtypes), time.perf_counter()
    if args.rollout == "throughput":
        rows = [throughput_row(args, b, log) for b in bases]
        text = throughput_table(rows)
    else:
        rows = [memory_row(args, b, m) for b in bases for m in ("frod", "lora")]
        text = memory_table(rows)
    result = {"environment": env, "mode": args.rollout, "rows": rows, "wall_s": time.perf_counter() - t0}
    return write_result(result, text, args.out or f"bench_out/rollout-{args.rollout}.json")


def add_args(ap) -> None:
    g = ap.add_argument_group("--rollout: RL rollouts with FRoD against the merged model, a GRPO step's memory "
                              "(docs/PERFORMANCE.md)")
    g.add_argument("--rollout", choices=["throughput", "memory"], default=None)
    g.add_argument("--r-bases", default="bfloat16,nf4", help=f"comma list of {', '.join(BASES)}")
    g.add_argument("--r-groups", type=int, default=4, help="prompts per rollout")
    g.add_argument("--r-group-size", type=int, default=8, help="G: completions per prompt")
    g.add_argument("--r-groups-per-call", type=int, default=4, help="groups per generate call")
    g.add_argument("--r-new-tokens", type=int, default=64)
    g.add_argument("--r-prompt-len", type=int, default=32)
    g.add_argument("--r-repeats", type=int, default=2)
    g.add_argument("--r-micro-batch", type=int, default=8, help="completions per backward (--rollout memory)")
    g.add_argument("--r-steps", type=int, default=2, help="GRPO steps per method (--rollout memory); the last is reported")
