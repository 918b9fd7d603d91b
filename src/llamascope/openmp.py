"""One OpenMP team for the model: the threads of a process that runs it from a thread of its own.

PyTorch's parallel operations and the native kernels share one OpenMP runtime (PyTorch's libgomp).
Each thread that opens a parallel region becomes the master of a team of its own, whose workers
live as long as that thread. libgomp spins a waiting worker (about a millisecond) only while it
manages no more threads than there are CPUs; past that it sleeps and wakes each one through the
kernel at every region. A decode step is a hundred-odd regions, so on two CPUs a model loaded on
the main thread and run by the server's scheduler thread (two teams: three managed threads)
decoded the default model in 8.2-8.7 ms a token instead of 3.9-4.3 (docs/serving.md).

So a server keeps one team, the scheduler's:

    release_pool()    # on the thread that loaded the model: its workers end
    serial_thread()   # on every other thread that may call PyTorch: its regions run on itself

Both do nothing where the runtime is not libgomp or cannot be found.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import sys
from pathlib import Path

import torch

log = logging.getLogger("llamascope")

OMP_PAUSE_HARD = 2  # omp_pause_resource_t: the runtime lets go of its threads


@functools.cache
def runtime() -> ctypes.CDLL | None:
    """PyTorch's libgomp as this process has loaded it (the native kernels link to the same), or
    None. (Other wheels may bring copies of their own, sentencepiece's for one, under other names.)"""
    if not sys.platform.startswith("linux"):
        return None
    torch.get_num_threads()  # (PyTorch's OpenMP is loaded and initialised by now)
    try:
        with open("/proc/self/maps") as maps:
            paths = {Path(line.split()[-1]) for line in maps if "libgomp" in line and "/" in line}
    except OSError:
        return None
    torch_lib = Path(torch.__file__).parent / "lib"
    ours = [p for p in paths if p.parent == torch_lib] or [p for p in paths if p.name == "libgomp.so.1"]
    if len(ours) != 1:
        return None
    library = ctypes.CDLL(str(ours[0]))
    for name in ("omp_pause_resource_all", "omp_set_num_threads"):
        if not hasattr(library, name):
            return None
    return library


def release_pool() -> bool:
    """End the calling thread's OpenMP workers (its team of earlier parallel regions) -> whether
    the runtime did. A later region on this thread starts a new team."""
    library = runtime()
    return library is not None and library.omp_pause_resource_all(OMP_PAUSE_HARD) == 0


def serial_thread() -> None:
    """Run the calling thread's parallel regions on itself alone, so that it never starts workers.
    (PyTorch sets each thread's OpenMP thread count from torch.get_num_threads() on its first
    parallel operation there; that happens first, then this thread's count becomes 1.)"""
    library = runtime()
    if library is not None:
        torch.get_num_threads()
        library.omp_set_num_threads(1)
