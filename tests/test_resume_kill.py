"""Issue 12, item 3: a sampling run killed with SIGKILL at random points and resumed
writes the same judgments as an uninterrupted run with the same seed, and as a run
with another batch size: nothing lost, nothing duplicated, every text equal.

Real `conj-lite sample` subprocesses on the tiny model (benchmarks/reliability.py,
which also produces the figures in docs/benchmarks.md)."""

from __future__ import annotations

import pytest
import reliability


@pytest.mark.slow
def test_sampling_killed_at_random_points_resumes_to_the_same_texts(tiny_model_dir, tmp_path):
    result = reliability.kill_check(tmp_path, kills=3, limit=8, seed=1)
    assert result["kills"] >= 2, result  # the process was alive and had written rows each time
    assert result["judgments"] >= 24 and result["straight_duplicated"] == 0  # 4 pairs (ties skipped) x 2 orders x 6
    for name in ("killed", "other_batch"):
        got = result[name]
        assert got["lost"] == got["extra"] == got["duplicated"] == 0, (name, got)
        assert got["texts_compared"] == result["judgments"] and got["texts_differing"] == 0, (name, got)
