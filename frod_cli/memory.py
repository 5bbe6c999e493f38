"""Memory figures, each named by what it measures: the peak over a stretch of work (`PeakMemory`: the CUDA
allocator's peak on a GPU, the resident set's high-water mark on the CPU) and the current amount. Used by the
training loop (metrics.json, metrics.jsonl) and the benchmarks (`PeakRSS`), so both measure alike.

On Linux the resident set's peak is VmHWM of /proc/self/status, reset at the start of the stretch by writing "5"
to /proc/self/clear_refs (Linux >= 4.0); where that reset is not allowed the peak is the process's since it
started (said in the method's name), and elsewhere getrusage's ru_maxrss."""
from __future__ import annotations

import contextlib
import gc
import sys
import threading
import time
from typing import Iterator, Optional

import torch

MiB = 2**20


@contextlib.contextmanager
def frozen_heap() -> Iterator[None]:
    """Within the block gc.collect() scans only what the block makes: what lived before (the libraries' half a
    million objects) waits in the permanent generation (gc.freeze), so each collection (before a benchmark's memory
    reading, at the end of every run in a test module) takes microseconds instead of most of a second."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def status_bytes(key: str) -> Optional[int]:
    """A `kB` field of /proc/self/status in bytes (VmRSS, VmHWM), or None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def rss_bytes() -> int:
    """The resident set now."""
    v = status_bytes("VmRSS")
    if v is not None:
        return v
    import psutil

    return psutil.Process().memory_info().rss


_RESETS: Optional[bool] = None


def reset_hwm() -> bool:
    """Reset VmHWM to the current resident set; False where the kernel does not allow it (checked once)."""
    global _RESETS
    if _RESETS is False or sys.platform != "linux":
        return False
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        _RESETS = False
        return False
    if _RESETS is None:
        hwm, rss = status_bytes("VmHWM"), status_bytes("VmRSS")
        _RESETS = hwm is not None and rss is not None and hwm <= rss + 4 * MiB
    return bool(_RESETS)


def hwm_bytes() -> int:
    """The resident set's high-water mark (since the last reset, or since the process started)."""
    v = status_bytes("VmHWM")
    if v is not None:
        return v
    import resource

    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale


class PeakMemory:
    """The peak of this process's memory on `device` from `reset()` on, and the current amount."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.method = ""
        self.reset()

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.method = "torch.cuda.max_memory_allocated (tensors; not the CUDA context or the allocator's cache)"
        elif reset_hwm():
            self.method = "VmHWM, the resident set's high-water mark (/proc/self/status, reset via clear_refs)"
        else:
            self.method = ("the process's resident-set high-water mark since it started (VmHWM or ru_maxrss; "
                           "this system does not allow resetting it)")

    def peak_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / MiB
        return hwm_bytes() / MiB

    def current_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device) / MiB
        return rss_bytes() / MiB


class PeakRSS:
    """The resident set's peak over a block (`with PeakRSS() as p:`; then p.before, p.peak, p.extra in bytes):
    VmHWM after a reset through clear_refs, else a thread sampling the resident set every millisecond."""

    def __enter__(self) -> "PeakRSS":
        self.before = rss_bytes()
        self.use_hwm = reset_hwm()
        if not self.use_hwm:
            self._stop = threading.Event()
            self._peak = self.before
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc) -> bool:
        if self.use_hwm:
            self.peak = max(hwm_bytes(), self.before)
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self._peak, rss_bytes())
        self.extra = self.peak - self.before
        return False
