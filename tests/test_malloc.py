"""dlkit.malloc: the `dlkit` command keeps freed CPU memory instead of faulting it back in."""

from __future__ import annotations

import subprocess
import sys

import pytest

# In a fresh interpreter: how many mmapped blocks one 16 MiB tensor adds (glibc's mallinfo2).
PROBE = """
import ctypes, sys
from dlkit.malloc import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else False
import torch
libc = ctypes.CDLL("libc.so.6")
if not hasattr(libc, "mallinfo2"):  # glibc < 2.33
    print("skip -1")
    sys.exit()
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc.mallinfo2.restype = Info
before = libc.mallinfo2().hblks
t = torch.empty(4 << 20)  # 16 MiB
print(applied, libc.mallinfo2().hblks - before)
"""


def probe(mode: str, **env) -> tuple[str, int]:
    import os

    res = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120,
                         env={**os.environ, **env})
    assert res.returncode == 0, res.stderr[-2000:]
    applied, mmapped = res.stdout.split()
    if applied == "skip":
        pytest.skip("this libc has no mallinfo2 (glibc >= 2.33) to observe the effect with")
    return applied, int(mmapped)


glibc = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")


@glibc
def test_large_blocks_come_from_the_heap_once_applied():
    assert probe("default") == ("False", 1)  # glibc's default: a fresh 16 MiB block is mmapped
    assert probe("keep") == ("True", 0)  # served from the heap, reused after free


@glibc
def test_opt_out_and_user_tuning_are_respected():
    assert probe("keep", DLKIT_KEEP_FREED_MEMORY="0") == ("False", 1)
    assert probe("keep", MALLOC_TRIM_THRESHOLD_="1000000")[0] == "False"
