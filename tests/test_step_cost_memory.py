"""
The CPU memory measure of `benchmarks/step_cost.py`: each mode's peak is read in a fresh subprocess, so the reading
must be that subprocess's own peak, never its parent's.
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

MiB = 2**20

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="the CPU memory measure reads /proc")


def run_child(code: str) -> list[int]:
    """Run `code` in a fresh Python with the benchmarks importable; the integers it prints last."""
    child = f"import sys\nsys.path.insert(0, {str(BENCHMARKS)!r})\nimport step_cost_measures\n" + code
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, check=True)
    return [int(v) for v in out.stdout.split()]


def test_peak_rss_rises_with_memory_the_process_touches():
    # in a fresh process: this test process's own high-water mark may already sit above anything it allocates now
    before, after = run_child(
        "import torch\n"
        "before = step_cost_measures.peak_rss_bytes()\n"
        "block = torch.ones(256 * 2**20 // 4)  # 256 MiB of float32, written, so resident\n"
        "print(before, step_cost_measures.peak_rss_bytes())\n"
    )
    assert after - before >= 200 * MiB


def test_a_subprocess_reads_its_own_peak_not_the_parents():
    # What the default step_cost run hit: its memory subprocesses start from a parent that has timed every mode. Linux
    # carries `ru_maxrss` over from the parent across execve, so every mode read the parent's peak.
    held = torch.ones(1024 * MiB // 4)  # the parent holds 1 GiB, resident
    own_peak, ru_maxrss = run_child(
        "import resource\n"
        "print(step_cost_measures.peak_rss_bytes(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)\n"
    )
    assert held[-1].item() == 1.0
    assert own_peak < 1024 * MiB  # the child imports torch, never 1 GiB
    if ru_maxrss >= 1024 * MiB:  # the kernel carried the parent's peak over (as it does on Linux with vfork + exec)
        assert own_peak < ru_maxrss - 256 * MiB
