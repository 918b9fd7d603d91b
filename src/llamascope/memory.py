"""This process's memory: resident size and peak (for bench and load reports), and how freed
memory goes back to the system while loading."""

from __future__ import annotations

import contextlib
import ctypes
import resource

import torch


def peak_rss_bytes() -> int:
    """Peak resident memory of this process (VmHWM on Linux: ru_maxrss carries a parent's peak
    across exec)."""
    peak = _status_bytes("VmHWM:")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_bytes() -> int | None:
    """Resident memory of this process now (None where /proc is not available)."""
    return _status_bytes("VmRSS:")


def _status_bytes(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def load_added_rss(loaded, peak_after: int) -> int | None:
    """How far loading raised this process's resident memory above what it held as loading began:
    the peak since, less the RSS then. Known only when the peak was set during or after loading
    (higher than the peak before it) or the process had never been above its RSS at that moment."""
    before, peak_before = loaded.rss_before_bytes, loaded.peak_rss_before_bytes
    if before is None or peak_before is None:
        return None
    if peak_after > peak_before or peak_before <= before:
        return peak_after - before
    return None


@contextlib.contextmanager
def freed_memory_returned():
    """While loading, large freed buffers go back to the system at once (glibc only).

    Loading makes many short-lived copies of a few MB (raw blocks before repacking, projections
    before fusing). glibc raises its mmap threshold after the first large free, so later copies
    come from the heap, whose freed pages stay resident and pile up to about twice the weights.
    During loading every allocation of 64 KiB or more is mapped
    and unmapped on its own (with 1 MiB, the k and v projections of a small model, freed when
    fused, still piled up in the heap); afterwards the thresholds go to glibc's own ceilings (mmap 32 MiB,
    trim 64 MiB), where its adaptive thresholds end up in a running process anyway.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        yield
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    mallopt(M_MMAP_THRESHOLD, 64 << 10)
    try:
        yield
    finally:
        if hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)
        # Setting one threshold fixes both: keep freed heap memory as the adaptive mode would
        # (twice the mmap threshold), or every decode step faults its buffers back in.
        mallopt(M_MMAP_THRESHOLD, 32 << 20)
        mallopt(M_TRIM_THRESHOLD, 64 << 20)


def available_bytes(device: torch.device) -> int | None:
    """Memory a new allocation on `device` can take now: MemAvailable on the CPU (Linux), the free
    memory of a CUDA device; None where it cannot be told."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
