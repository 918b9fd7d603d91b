"""What the `llamascope` command sets up before PyTorch loads.

With the environment variable THP_MEM_ALLOC_ENABLE=1, PyTorch's CPU allocator advises every block
of 2 MB or more MADV_HUGEPAGE, so the whole 2 MB pages inside it can be transparent huge pages
(a large weight almost entirely; one of 2-4 MB maybe not at all, as the block is not aligned to
2 MB). For the weights that matters: a decode step streams each of them from memory once, and in
2 MB pages the stream is physically contiguous over 2 MB runs. In 4 KB pages it is only as
contiguous as the kernel's free memory was when the model loaded; on this project's machine,
where the page cache leaves free memory in scattered small blocks, the first model a process
loads read measurably slower than a second copy loaded after it (which got the pages freed by
the first one's temporaries), and as fast as that copy when its weights were put in 2 MB pages.
Separate processes alternated, the setting gave the 1.1B shape in Q4_0 52.1 against 46.6 decode
tokens/s and 167 against 147 prefill tokens/s, SmolLM2 Q4_1 238 against 220, the 1.1B shape in
float32 8.9 against 7.4 and in bfloat16 17.1 against 15.1.

PyTorch reads the variable once, at its first allocation (importing it allocates), so it has to
be set before the first `import torch`: the command does it first thing, and `import llamascope`
does not import PyTorch (its names are imported on first use). A program using the Python API can call
`allocate_in_huge_pages()` before it imports torch, or load with `huge_pages=True`
(loading/hugepages.py), which copies the weights into huge pages after loading.
"""

from __future__ import annotations

import os
import sys

THP_ENV = "THP_MEM_ALLOC_ENABLE"


def allocate_in_huge_pages() -> bool:
    """Ask PyTorch's CPU allocator for 2 MB pages, unless the environment already decides (a
    user's THP_MEM_ALLOC_ENABLE=0 turns them off). Has no effect once PyTorch is imported; returns
    whether the variable is 1, which is whether the allocator uses them if PyTorch loaded after it
    was set."""
    if "torch" not in sys.modules:
        os.environ.setdefault(THP_ENV, "1")
    return os.environ.get(THP_ENV) == "1"
