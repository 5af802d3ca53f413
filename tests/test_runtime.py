"""bilevel.runtime: freed memory stays in the heap, so repeated large allocations stop faulting in fresh pages."""
from __future__ import annotations

import json
import platform
import subprocess
import sys
from types import SimpleNamespace

import pytest

from bilevel import runtime
from tests.conftest import PROJECT_ROOT

# Five 40 MiB allocations (above glibc's own 32 MiB ceiling for heap blocks), then the setting, then five more.
FAULT_COUNT = """
import json, resource, torch
from bilevel.runtime import retain_freed_memory

def faults():
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        torch.empty(40 << 20, dtype=torch.uint8).fill_(1)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start

before = faults()
outcome = retain_freed_memory()
faults()                                   # the first block after the setting is new heap
print(json.dumps({"before": before, "outcome": outcome, "after": faults()}))
"""


@pytest.fixture
def fresh_outcome():
    runtime.retain_freed_memory.cache_clear()
    yield
    runtime.retain_freed_memory.cache_clear()


def test_freed_blocks_are_reused_without_page_faults():
    result = subprocess.run([sys.executable, "-c", FAULT_COUNT], capture_output=True, text=True, cwd=PROJECT_ROOT,
                            check=True)
    counts = json.loads(result.stdout.splitlines()[-1])
    if platform.libc_ver()[0] != "glibc":
        assert counts["outcome"].startswith("left as it is")
        return
    assert counts["outcome"] == runtime.RETAINED
    assert counts["before"] >= 50, counts           # each fresh 40 MiB block faulted in (even with huge pages)
    assert counts["after"] * 10 <= counts["before"], counts


def test_other_c_libraries_are_left_alone(monkeypatch, fresh_outcome):
    monkeypatch.setattr(runtime.platform, "libc_ver", lambda: ("musl", "1.2"))
    assert runtime.retain_freed_memory() == "left as it is: the C library is musl, not glibc"


def test_a_refused_setting_is_reported(monkeypatch, fresh_outcome):
    def mallopt(option, value):
        return 0

    monkeypatch.setattr(runtime.platform, "libc_ver", lambda: ("glibc", "2.36"))
    monkeypatch.setattr(runtime.ctypes, "CDLL", lambda name: SimpleNamespace(mallopt=mallopt))
    assert runtime.retain_freed_memory() == "left as it is: glibc refused the thresholds"


def test_a_process_without_mallopt_is_left_alone(monkeypatch, fresh_outcome):
    monkeypatch.setattr(runtime.platform, "libc_ver", lambda: ("glibc", "2.36"))
    monkeypatch.setattr(runtime.ctypes, "CDLL", lambda name: SimpleNamespace())
    assert runtime.retain_freed_memory() == "left as it is: this process has no mallopt"
