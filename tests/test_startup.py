"""What the command sets before PyTorch loads (startup.py): PyTorch's allocator in 2 MB pages.

Each check runs in a fresh interpreter, since the setting only works before `import torch`."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
needs_thp = pytest.mark.skipif(not THP.exists(), reason="this kernel has no transparent huge pages")

# Prints whether a 64 MB tensor's mapping is advised MADV_HUGEPAGE ("hg" in its VmFlags).
ADVISED = """
import torch
t = torch.ones(16 << 20)
address = t.data_ptr() + (32 << 20)
inside = False
for line in open("/proc/self/smaps"):
    head = line.split()[0]
    if head.endswith(":"):  # a field of the current mapping
        if head == "VmFlags:" and inside:
            print("advised" if "hg" in line.split()[1:] else "not advised")
            break
    else:  # a mapping's header: start-end perms ...
        start, end = (int(v, 16) for v in head.split("-"))
        inside = start <= address < end
else:
    print("no mapping holds the tensor")
"""


def run(code: str, **env: str) -> str:
    environ = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**environ, **env}, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_importing_llamascope_and_its_command_leaves_pytorch_unloaded():
    code = "import sys, llamascope, llamascope.cli; print('torch' in sys.modules)"
    assert run(code) == "False"
    assert run("import sys; from llamascope import Engine; print('torch' in sys.modules)") == "True"


@needs_thp
def test_the_allocator_advises_huge_pages_only_when_asked_before_torch_loads():
    ask = "from llamascope.startup import allocate_in_huge_pages; assert allocate_in_huge_pages()\n"
    assert run(ask + ADVISED) == "advised"
    assert run(ADVISED) == "not advised"  # PyTorch's default
    late = "import torch\nfrom llamascope.startup import allocate_in_huge_pages\nallocate_in_huge_pages()\n"
    assert run(late + ADVISED) == "not advised"  # too late: the allocator read its setting already


def test_a_users_setting_wins():
    code = (
        "import os\nfrom llamascope.startup import allocate_in_huge_pages\n"
        "print(allocate_in_huge_pages(), os.environ['THP_MEM_ALLOC_ENABLE'])"
    )
    assert run(code, THP_MEM_ALLOC_ENABLE="0") == "False 0"
    assert run(code) == "True 1"


def test_the_command_asks_first():
    code = (
        "import os\nfrom llamascope import cli\n"
        "status = cli.main(['info', '--model', '/nonexistent/model.gguf'])\n"
        "print(status, os.environ.get('THP_MEM_ALLOC_ENABLE'))"
    )
    assert run(code) == "1 1"
