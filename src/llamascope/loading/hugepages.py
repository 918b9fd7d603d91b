"""Weights in transparent huge pages.

A decode step streams every weight from memory once. With 4 KB pages that is a TLB miss (and a
page walk) every 4 KB, and the CPU's stream prefetchers stop at each 4 KB boundary; with 2 MB
pages neither happens. Linux gives anonymous memory huge pages only where the process asks for
them (`madvise(MADV_HUGEPAGE)`) when /sys/kernel/mm/transparent_hugepage/enabled is "madvise",
the common default, and only at the moment the memory is first touched. So after loading, each
large weight is copied into fresh memory advised that way (one tensor at a time, so the peak
grows by the largest tensor only) and the module's tensor is pointed at the copy.

The `llamascope` command does not need it: it has PyTorch's allocator advise every block of 2 MB
or more from the start (startup.py), with no copy, and then the move is skipped. The move is for
programs that imported PyTorch before they could ask for that: it is asked for
(`LoadOptions(huge_pages=True)`, `--huge-pages`), not done by default, since the copy costs load
time (see docs/performance.md).
"""

from __future__ import annotations

import ctypes
import itertools
import logging
import os
import time

import torch
from torch import nn

from .. import decode_step
from ..startup import THP_ENV

log = logging.getLogger("llamascope")

HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = 14
THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"


def thp_mode() -> str:
    """ "always", "madvise" or "never" (the bracketed word); "" where the kernel has no THP."""
    try:
        with open(THP_ENABLED) as f:
            text = f.read()
    except OSError:
        return ""
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else ""


def _advise(libc, address: int, nbytes: int) -> bool:
    """madvise(MADV_HUGEPAGE) on the whole 2 MB pages inside [address, address + nbytes)."""
    start = (address + HUGE_PAGE - 1) // HUGE_PAGE * HUGE_PAGE
    end = (address + nbytes) // HUGE_PAGE * HUGE_PAGE
    return end <= start or libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_HUGEPAGE) == 0


def move_to_huge_pages(model: nn.Module, min_bytes: int = 2 * HUGE_PAGE) -> int:
    """Copy each CPU weight of at least `min_bytes` into memory advised MADV_HUGEPAGE; the
    numbers are unchanged. Returns the bytes moved (0 where THP is off or already "always", or
    where PyTorch's allocator was asked to advise large blocks itself).
    A native decode step records the weights' addresses, so the model's is rebuilt afterwards."""
    mode = thp_mode()
    if os.environ.get(THP_ENV) == "1":
        log.info("huge pages: PyTorch's allocator already advises large blocks (%s=1), nothing to move", THP_ENV)
        return 0
    if mode != "madvise":
        log.info("huge pages: transparent huge pages are %r here, nothing to ask for", mode or "absent")
        return 0
    step = model.decode_step
    if not isinstance(step, decode_step.DecodeStep):
        return _move(model, min_bytes)  # (a compiled step reads the modules' tensors as they are then)
    model.decode_step = None  # it points at the storage about to be replaced
    try:
        return _move(model, min_bytes)
    finally:
        decode_step.enable(model, step.lib)


def _move(model: nn.Module, min_bytes: int) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    moved, seen, start = 0, set(), time.perf_counter()
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        nbytes = tensor.numel() * tensor.element_size()
        if (
            id(tensor) in seen
            or nbytes < min_bytes
            or tensor.device.type != "cpu"
            or tensor._base is not None
            or not tensor.is_contiguous()
        ):
            continue
        seen.add(id(tensor))
        fresh = torch.empty_like(tensor, memory_format=torch.contiguous_format)
        if not _advise(libc, fresh.data_ptr(), nbytes):
            log.debug("madvise(MADV_HUGEPAGE) refused (errno %d): weights stay in 4 KB pages", ctypes.get_errno())
            return moved
        with torch.no_grad():
            fresh.copy_(tensor)  # first touch: the kernel backs the advised range with 2 MB pages
            tensor.data = fresh
        moved += nbytes
    if moved:
        log.info("huge pages: %.0f MB of weights moved in %.1f s", moved / 1e6, time.perf_counter() - start)
    return moved
