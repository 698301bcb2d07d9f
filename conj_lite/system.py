"""What this process may use of the machine."""

from __future__ import annotations

import os


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity: a container's or `taskset`'s
    share), not every logical CPU of the machine; the default thread count of the
    CPU paths. CONJ_LITE_THREADS overrides it."""
    env = os.environ.get("CONJ_LITE_THREADS")
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            raise ValueError(f"CONJ_LITE_THREADS must be a whole number, got {env!r}") from None
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1
