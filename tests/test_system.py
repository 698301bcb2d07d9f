"""The default thread count: the CPUs this process may run on, not every logical CPU."""

import os

import pytest

from conj_lite.system import usable_cpus


def test_usable_cpus_follows_the_affinity_mask(monkeypatch):
    monkeypatch.delenv("CONJ_LITE_THREADS", raising=False)
    mask = os.sched_getaffinity(0)
    assert usable_cpus() == len(mask)
    try:
        os.sched_setaffinity(0, {min(mask)})  # as `taskset -c N` or a container's CPU set would
        assert usable_cpus() == 1
    finally:
        os.sched_setaffinity(0, mask)


def test_conj_lite_threads_overrides_and_is_checked(monkeypatch):
    monkeypatch.setenv("CONJ_LITE_THREADS", "3")
    assert usable_cpus() == 3
    monkeypatch.setenv("CONJ_LITE_THREADS", "three")
    with pytest.raises(ValueError, match="CONJ_LITE_THREADS"):
        usable_cpus()
