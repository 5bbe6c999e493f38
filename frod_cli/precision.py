"""What the machine computes fast, and the dtypes a run uses because of it: the one place that knows.

A CPU multiplies float32 at full speed everywhere, but bfloat16 and float16 only where torch's CPU matmul has
a oneDNN kernel for them; elsewhere torch falls back to a scalar loop. Measured on 2-core AMD EPYCs
(docs/PERFORMANCE.md, "Precision"): bfloat16 about 380x slower than float32 in a 2048 x 2048 product where torch
reports the CPU capability AVX2 (no AVX512); where it reports AVX512 without AVX512-FP16, float16 60-190x slower
in 256-2048 products and bfloat16 2-3x faster than float32. The slowdown grows with the size of the product.

How the answer is found: torch's own check, `torch.ops.mkldnn._is_mkldnn_{bf16,fp16}_supported()`, which is
the condition under which its CPU GEMM takes the oneDNN kernel (oneDNN: AVX512-core or AVX2-VNNI-2 for
bfloat16; AVX512-FP16, AMX-FP16 or AVX-NE-CONVERT for float16). It is free and gives the same answer under any
load; a timing alone would not (a shared 2-core machine varies 2x). The CPU flags (/proc/cpuinfo) and torch's
CPU capability string are recorded next to it, not used to decide. The factor quoted in a warning is timed once
per process (a 256 x 256 product per dtype; at most about 0.2 s, and only when a run would compute in an
emulated dtype); a torch without the check falls back to that timing.

`model.dtype=auto` picks bfloat16 where the device computes it natively, else float32 (CUDA: bfloat16 where
the GPU supports it, else float16). A 4-bit base computes in `model.compute_dtype`: by default `model.dtype`,
but float32 on a CPU that emulates `model.dtype`.
"""
from __future__ import annotations

import functools
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch

from frod_cli import FrodCliError

log = logging.getLogger("frod.precision")

DTYPES: Dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
AUTO = "auto"
LOW = ("bfloat16", "float16")  # the dtypes a CPU may emulate
EMULATED_ABOVE = 4.0  # a measured slowdown above this means emulated (only where torch has no oneDNN check)
# cpuinfo flags that say which low-precision products the hardware has (recorded, not decided on)
PRECISION_FLAGS = ("avx512_bf16", "amx_bf16", "avx512_fp16", "amx_fp16", "avx_ne_convert", "avx2_vnni_2")
PROBE_SIZE = 256


def dtype_of(name: str) -> torch.dtype:
    """The torch dtype of a concrete dtype name (not `auto`)."""
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use {', '.join(DTYPES)}")
    return DTYPES[name]


# ------------------------------------------------------------------------------------ what the CPU runs fast
@functools.lru_cache(maxsize=None)
def cpu_capability() -> str:
    """torch's CPU capability (the widest vector ISA its kernels use): AVX512, AVX2, DEFAULT, SVE256, ..."""
    return str(torch.backends.cpu.get_cpu_capability())


@functools.lru_cache(maxsize=None)
def cpu_flags() -> Tuple[str, ...]:
    """The low-precision flags of /proc/cpuinfo this CPU has (empty where the file cannot be read)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    have = set(line.split(":", 1)[1].split())
                    return tuple(flag for flag in PRECISION_FLAGS if flag in have)
    except OSError:
        pass
    return ()


def matmul_seconds(name: str, n: int, repeats: int) -> float:
    """The fastest of `repeats` n x n by n x n products in dtype `name` on the CPU (the fastest is the one other
    jobs disturbed least). Kernel selection happens on an 8 x 8 product first: a full-size warm-up would double
    the cost where the dtype is emulated."""
    dtype = dtype_of(name)
    torch.mm(torch.ones(8, 8, dtype=dtype), torch.ones(8, 8, dtype=dtype))
    a = torch.randn(n, n).to(dtype)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, a)
        best = min(best, time.perf_counter() - t0)
    return best


@functools.lru_cache(maxsize=None)
def cpu_slowdown(name: str) -> float:
    """How many times slower a PROBE_SIZE-square matmul runs in dtype `name` than in float32 on this CPU (timed
    once per process, at torch's current thread count)."""
    if name == "float32":
        return 1.0
    return matmul_seconds(name, PROBE_SIZE, 2) / max(matmul_seconds("float32", PROBE_SIZE, 4), 1e-9)


@functools.lru_cache(maxsize=None)
def cpu_native(name: str) -> bool:
    """Whether torch's CPU matmul in dtype `name` runs a vectorized kernel (True) or emulates it (False)."""
    if name == "float32":
        return True
    check = getattr(torch.ops.mkldnn, {"bfloat16": "_is_mkldnn_bf16_supported",
                                       "float16": "_is_mkldnn_fp16_supported"}[name], None)
    if check is not None and torch.backends.mkldnn.is_available():
        try:
            return bool(check())
        except RuntimeError:  # an operator registered without a CPU kernel: time it instead
            pass
    return cpu_slowdown(name) <= EMULATED_ABOVE


def cpu_record() -> Dict[str, Any]:
    """This CPU's answer, for metrics.json and the benchmarks' environment record."""
    return {"cpu_capability": cpu_capability(), "cpu_flags": list(cpu_flags()),
            "cpu_dtypes": {name: "native" if cpu_native(name) else "emulated" for name in LOW}}


def emulation_note(name: str) -> str:
    """'this CPU emulates bfloat16 (torch CPU capability AVX2; no oneDNN bfloat16 kernel): a 256x256 matmul runs
    60x slower than in float32, larger ones slower still'."""
    return (f"this CPU emulates {name} (torch CPU capability {cpu_capability()}; no oneDNN {name} kernel): a "
            f"{PROBE_SIZE}x{PROBE_SIZE} matmul runs {cpu_slowdown(name):.0f}x slower than in float32, larger ones "
            f"slower still")


# ------------------------------------------------------------------------------------ the dtypes of a run
def auto_dtype(device: Any = None) -> str:
    """What `model.dtype=auto` means on `device` (default: CUDA where available, else the CPU)."""
    kind = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if kind == "cpu":
        return "bfloat16" if cpu_native("bfloat16") else "float32"
    return "float32"  # another accelerator: the one dtype every device computes


def resolve_dtype(name: str, device: Any = None) -> torch.dtype:
    """`model.dtype` (or `model.compute_dtype`) as a torch dtype, `auto` resolved for `device`."""
    return dtype_of(auto_dtype(device) if name == AUTO else name)


@dataclass
class Precision:
    """The dtypes one training run uses on its device (`settle`)."""

    device: str  # cpu | cuda | ...
    model_dtype: str  # the frozen weights' (merged/ is written in it)
    compute_dtype: str  # what the products run in: model_dtype, a 4-bit base's compute dtype, or autocast's

    def record(self) -> Dict[str, Any]:
        """metrics.json's fields: the compute dtype, and on a CPU run what that CPU computes natively."""
        out: Dict[str, Any] = {"compute_dtype": self.compute_dtype, "cpu_capability": None}
        if self.device == "cpu":
            out.update(cpu_record())
        return out


def settle(model_cfg: Any, device: Any, mixed_precision: str = "no") -> Precision:
    """The run's dtypes, written into `model_cfg` before anything is loaded or compared with a checkpoint (so the
    run's config holds what it ran with): `model.dtype=auto` resolved for `device`, and a 4-bit base's compute
    dtype chosen. A CPU run that computes in a dtype this CPU emulates gets one warning line, with the measured
    factor and the setting that avoids it; a 4-bit base is not put there unless its compute dtype is named."""
    kind = torch.device(device).type
    asked = str(model_cfg.dtype)
    if asked != AUTO and asked not in DTYPES:
        raise FrodCliError(f"model.dtype must be one of {', '.join(DTYPES)}, {AUTO}; got {asked!r}")
    model_cfg.dtype = auto_dtype(device) if asked == AUTO else asked
    if asked == AUTO:
        log.info("model.dtype=auto: %s on %s", model_cfg.dtype, kind)
    compute = _compute_dtype(model_cfg, kind)
    if mixed_precision != "no":  # autocast on a GPU (a CPU run has turned it off already)
        compute = {"bf16": "bfloat16", "fp16": "float16"}[mixed_precision]
    if kind == "cpu" and not cpu_native(compute):
        fix = ("model.compute_dtype=float32 (or leaving it unset) avoids it" if model_cfg.get("quantization") not in
               (None, "none") else "model.dtype=float32 (or model.dtype=auto) avoids it")
        log.warning("computing in %s: %s; %s", compute, emulation_note(compute), fix)
    return Precision(kind, str(model_cfg.dtype), compute)


def _compute_dtype(model_cfg: Any, kind: str) -> str:
    """A 4-bit base's compute dtype (written into model_cfg.compute_dtype); a plain base computes in model.dtype."""
    named = model_cfg.get("compute_dtype")
    quantized = str(model_cfg.get("quantization") or "none") != "none"
    if named is not None and named not in DTYPES:
        raise FrodCliError(f"model.compute_dtype must be one of {', '.join(DTYPES)} (or unset), got {named!r}")
    if not quantized:
        if named is not None:
            raise FrodCliError("model.compute_dtype applies to a 4-bit base (model.quantization=nf4|fp4) only; an "
                               "unquantized base computes in model.dtype")
        return str(model_cfg.dtype)
    if named is None:
        named = str(model_cfg.dtype)
        if kind == "cpu" and not cpu_native(named):
            log.info("4-bit base: computing in float32, since %s; merged/ is still written in model.dtype=%s "
                     "(model.compute_dtype=%s computes in it anyway)", emulation_note(named), named, named)
            named = "float32"
        model_cfg.compute_dtype = named
    return str(named)


# ------------------------------------------------------------------------------------ the table in PERFORMANCE.md
def matmul_rates(sizes: Tuple[int, ...], repeats: int = 3) -> Dict[int, Dict[str, float]]:
    """size -> dtype -> GFLOP/s of an n x n by n x n product on this CPU (`matmul_seconds`)."""
    return {n: {name: 2 * n ** 3 / matmul_seconds(name, n, repeats) / 1e9 for name in DTYPES} for n in sizes}


def main(argv: Optional[list] = None) -> int:
    """`python -m frod_cli.precision [--sizes 256,1024] [--out f.json]`: what this CPU computes natively, and a
    matmul table per dtype (slow where a dtype is emulated: the largest product takes minutes there)."""
    import argparse
    import json

    ap = argparse.ArgumentParser(prog="python -m frod_cli.precision", description=main.__doc__)
    ap.add_argument("--sizes", default="256,512", help="matrix sizes n of the n x n products, comma-separated")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", default=None, help="also write the record and the rates as JSON here")
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    record = {**cpu_record(), "torch": torch.__version__, "threads": torch.get_num_threads()}
    print(json.dumps(record))
    rates = matmul_rates(tuple(int(s) for s in args.sizes.split(",")))
    print("| n | " + " | ".join(f"{d} GFLOP/s" for d in DTYPES) + " | " + " | ".join(f"{d} x float32 time" for d in LOW) + " |")
    print("|---|" + "---|" * (len(DTYPES) + len(LOW)))
    for n, r in rates.items():
        slower = [f"{r['float32'] / r[d]:.2f}" for d in LOW]
        print(f"| {n} | " + " | ".join(f"{r[d]:.1f}" for d in DTYPES) + " | " + " | ".join(slower) + " |")
    if args.out:
        from frod_cli.runs.io import atomic_write_text

        atomic_write_text(args.out, json.dumps({**record, "gflops": rates}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
