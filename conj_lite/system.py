"""What this process may use of the machine."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable


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


def release_memory() -> None:
    """Free what the last stage left behind and hand it back to the OS: collect cycles,
    empty the CUDA cache, and (glibc) trim the malloc arenas, which otherwise keep a
    freed model's pages resident into the next stage."""
    import gc
    import sys

    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
    trim_heap()


def trim_heap() -> None:
    """glibc: hand the free pages of the malloc heaps back to the OS, those between live
    blocks too. A CPU training step allocates tensors of a new size with each batch
    length; freed, they stay resident, and a run's RSS climbs with every longer batch."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to trim


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Start a new peak-RSS window for this process (Linux: /proc/self/clear_refs);
    False where the peak cannot be reset (it then covers the whole process)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """The highest resident set of this process since the last `reset_peak_rss`."""
    kib = _status_kib("VmHWM")
    if kib is None:
        import resource

        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kib * 1024


def children_peak_rss_bytes() -> int:
    """The highest resident set of any finished child process (the llama.cpp converter)."""
    import resource

    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024


# huggingface_hub reads these once, when it is first imported: set them before that.
TELEMETRY_OFF = {"HF_HUB_DISABLE_TELEMETRY": "1"}
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def network_switches(inputs: Iterable[str | None] | None = None, *, local_names: Iterable[str] = ()) -> dict:
    """Keep the Hugging Face libraries off the network unless a run names something only
    the hub has. Telemetry (TRL's trainers start huggingface_hub's telemetry thread on
    every run) is switched off; with `inputs` (the run's model, data and adapter names)
    the hub is set offline too when each of them is None, an existing path or one of
    `local_names` ("tiny", the packaged models). A variable the user set is left as it
    is. Returns what was set."""
    wanted = dict(TELEMETRY_OFF)
    if inputs is not None and not {"HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"} & set(os.environ):
        local = set(local_names)
        if all(name is None or name in local or Path(name).expanduser().exists() for name in inputs):
            wanted.update(OFFLINE)
    set_now = {k: v for k, v in wanted.items() if k not in os.environ}
    os.environ.update(set_now)
    return set_now


@contextmanager
def exclusive(path: Path):
    """Hold an exclusive lock named after `path` (`<path>.lock`, fcntl) for the block, so
    that of several processes asking for the same cached build, one builds it and the
    others wait and then find it. Where fcntl is missing (Windows) there is no lock."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    lock = Path(path).with_name(Path(path).name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
