"""What every benchmark shares: memory readings (the resident-set peak, a device's peak), byte counts of
parameters, buffers and optimizer state, statistics of repeated timings, the environment record, and the
ending of every benchmark (its JSON written, its table printed)."""
from __future__ import annotations

import ctypes
import datetime as _dt
import json
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, NoReturn, Optional

import torch

# the resident set and its peak over a block: one piece with frod train's metrics (frod_cli/memory.py)
from frod_cli.memory import PeakRSS, reset_hwm, rss_bytes  # noqa: F401 - the benchmarks import them from here

Log = Callable[..., None]


# ---- running -------------------------------------------------------------------------------------------
def offline_environment() -> None:
    """The benchmarks never reach the Hub and print no advisory noise; a variable the user set is kept.
    Called before transformers is imported (it reads them at import)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def make_log(quiet: bool) -> Log:
    """print, flushed at once (a benchmark's progress on a slow machine), or nothing with --quiet."""
    if quiet:
        return lambda *a, **k: None
    return lambda *a, **k: print(*a, **k, flush=True)


def refuse(message: str) -> NoReturn:
    """Bad input to a benchmark: one line on stderr, exit status 2, before any work."""
    print(f"bench: {message}", file=sys.stderr)
    raise SystemExit(2)


def int_list(text, flag: str) -> List[int]:
    """A comma list of integers (--blocks 2,4), or a refusal naming the flag."""
    try:
        return [int(v) for v in str(text).split(",")]
    except ValueError:
        refuse(f"{flag} takes a comma list of integers, got {text!r}")


def sync(device: torch.device) -> None:
    """Wait for the device, so that a wall-clock reading covers the work queued before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- memory --------------------------------------------------------------------------------------------
_LIBC: List[Any] = []


def malloc_trim() -> None:
    """Give freed heap memory back to the OS so that the next RSS reading is the live set."""
    if sys.platform != "linux":
        return
    try:
        if not _LIBC:
            _LIBC.append(ctypes.CDLL("libc.so.6"))
        _LIBC[0].malloc_trim(0)
    except OSError:
        pass


class DevicePeak:
    """The memory peak over a block where the work runs: the CUDA allocator's on a GPU, the resident set's
    (PeakRSS) on the CPU. After the block: before, peak, extra, bytes."""

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


# ---- bytes ---------------------------------------------------------------------------------------------
def storage_bytes(tensors: Iterable[Optional[torch.Tensor]]) -> int:
    """Bytes of the distinct storages under `tensors` (a tensor sharing another's storage counts once; of a sharded
    DTensor, this process's shard)."""
    seen, total = set(), 0
    for t in tensors:
        if t is None or t.device.type == "meta":
            continue
        if hasattr(t, "to_local"):  # a DTensor (FSDP's shards): this process's part
            t = t.to_local()
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
    return storage_bytes([v for st in opt.state.values() for v in st.values() if torch.is_tensor(v)])


# ---- statistics and formatting -------------------------------------------------------------------------
def summarize(vals: List[float]) -> Dict[str, Any]:
    """median, min, max, stdev, spread (max - min over the median, percent), n and every value."""
    if not vals:
        return {}
    med = statistics.median(vals)
    return {"median": med, "min": min(vals), "max": max(vals),
            "stdev": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            "spread_pct": 100.0 * (max(vals) - min(vals)) / med if med else 0.0, "n": len(vals), "all": vals}


def ratio(a, b):
    return (a / b) if (a is not None and b) else None


def fmt_bytes(b) -> str:
    """MiB, no decimals; "-" for none."""
    return f"{b/2**20:.0f}" if b is not None else "-"


def fmt_r(x) -> str:
    return f"{x:.2f}" if x is not None else "-"


# ---- the record ----------------------------------------------------------------------------------------
def loadavg():
    return os.getloadavg() if hasattr(os, "getloadavg") else None


def environment(device: str, dtypes: Iterable[str]) -> Dict[str, Any]:
    """What a result needs to be read later: date, host, versions, CPU, threads, the command line, the load
    at the start (the caller adds loadavg_end), how the resident-set peak was read, the GPU if any; the dtypes its
    figures compute in, each with how this device computes it (a CPU may emulate bfloat16 at a 100th of float32's
    speed: frod_cli/precision.py), and the CPU's capability and native dtypes."""
    import peft
    import transformers

    from frod_cli.precision import cpu_native, cpu_record

    env = {"date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "host": platform.node(), "machine": platform.machine(), "python": platform.python_version(),
           "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
           "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "argv": sys.argv,
           "loadavg_start": loadavg(),
           "peak_rss_method": "VmHWM after clear_refs" if reset_hwm() else "sampling thread"}
    try:
        with open("/proc/cpuinfo") as f:
            env["cpu"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None)
    except OSError:
        pass
    if device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    env.update(cpu_record())
    on_cpu = torch.device(device).type == "cpu"
    env["compute_dtypes"] = {d: ("native" if cpu_native(d) else "emulated") if on_cpu else device for d in dtypes}
    return env


def machine_line(env: Dict[str, Any]) -> str:
    """The line printed above every table: which CPU kind and dtypes its figures need (docs/PERFORMANCE.md)."""
    native = ", ".join(f"{d} {how}" for d, how in env.get("cpu_dtypes", {}).items())
    computed = ", ".join(f"{d} ({how})" for d, how in env.get("compute_dtypes", {}).items())
    return (f"# {env.get('cpu') or env.get('machine')}, torch CPU capability {env.get('cpu_capability')} ({native})"
            f"{', ' + env['gpu'] if env.get('gpu') else ''}; computed in {computed}")


def write_result(result: Dict[str, Any], table: str, path: str) -> int:
    """Every benchmark's ending: the JSON written whole or not at all (result["wall_s"] set by the caller), the
    table printed, where it went."""
    from frod_cli.runs.io import atomic_write_text

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(str(out), json.dumps(result, indent=1, default=str))
    print(machine_line(result["environment"]))
    print(table)
    print(f"# wrote {out} ({result['wall_s']:.0f} s)")
    return 0
