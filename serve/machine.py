"""What this process may use: memory and cores within its container's limits (cgroup v2), not the host's.

In a pod or container psutil and sched_getaffinity see the whole node: a server sized from them would reserve a
KV cache the cgroup then kills it for, or start a thread per node core on a 4-CPU quota.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")


def available_memory(cgroup: Path = CGROUP) -> int:
    """Bytes free to this process: the machine's available memory, or the cgroup's headroom if smaller."""
    import psutil

    free = psutil.virtual_memory().available
    limit, used = _read(cgroup / "memory.max"), _read(cgroup / "memory.current")
    if limit is None or limit == "max" or used is None:
        return free
    return max(0, min(free, int(limit) - int(used)))


def usable_cores(cgroup: Path = CGROUP) -> int:
    """Cores this process may run on: its CPU affinity, capped by the cgroup's CPU quota (rounded up)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = _read(cgroup / "cpu.max")  # "<quota> <period>" in microseconds, or "max <period>"
    if quota is None or quota.startswith("max"):
        return cores
    limit, period = (int(x) for x in quota.split()[:2])
    return max(1, min(cores, math.ceil(limit / period)))


def gpu_memory() -> list[tuple[int, int]]:
    """(free, total) bytes of each visible CUDA device; empty on a machine without one (or with a CPU torch)."""
    import torch

    if not torch.cuda.is_available():
        return []
    return [torch.cuda.mem_get_info(i) for i in range(torch.cuda.device_count())]


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None
