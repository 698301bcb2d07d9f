"""benchmarks/gpu_check.py cannot rot: its CPU dry run goes through every section's code
(all but the CUDA-only calls) and writes the JSON and markdown the docs take in."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_next_lengths_brackets_the_longest_fit():
    gc = load_script()
    # between the longest fit and the shortest failure
    assert gc.next_lengths({2048: True, 3072: True, 4096: False, 6144: False}, 3, 128) == [3328, 3584, 3840]
    # all fit: look further; none fit: look below
    assert gc.next_lengths({2048: True, 4096: True}, 2, 256) == [6144, 8192]
    assert gc.next_lengths({2048: False}, 3, 256) == [512, 1024, 1536]
    # nothing left to split, or nothing known
    assert gc.next_lengths({2048: True, 2176: False}, 2, 128) == []
    assert gc.next_lengths({}, 2, 128) == []


def test_check_env_is_fast_and_names_what_is_missing():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--check-env"], capture_output=True, text=True, timeout=60)
    assert proc.returncode in (0, 1), proc.stderr
    out = proc.stdout
    for name in ("trl", "datasets", "bitsandbytes", "unsloth", "gguf", "llama_cpp_python", "conj-lite"):
        assert name in out
    assert "missing:" in out
    seconds = float(out.rsplit("(", 1)[1].split("s)")[0])
    assert seconds < 2.0


@pytest.mark.slow
def test_dry_run_writes_json_and_markdown(tmp_path, tiny_model_dir):
    out, work = tmp_path / "out", tmp_path / "work"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out), "--work", str(work)],
                          capture_output=True, text=True, timeout=1500, cwd=REPO)
    log = (out / "gpu_check.log").read_text() if (out / "gpu_check.log").is_file() else ""
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + log[-5000:]
    data = json.loads((out / "gpu_check.json").read_text())
    assert data["dry_run"] is True
    env = data["environment"]
    for key in ("date", "command", "gpu", "driver", "torch_cuda", "versions", "python"):
        assert key in env
    assert env["versions"]["torch"]
    s = data["sections"]
    assert list(s) == ["memory", "speed", "sampling", "real_model"]

    m = s["memory"]
    assert m["status"] == "ok", m
    assert m["main"]["fits"] is True and m["main"]["peak_rss_gb"] > 0
    assert len(m["search"]) >= 3 and {r["round"] for r in m["search"]} == {1, 2}
    # the simulated 16 GB card: the search brackets its cap
    assert m["longest_fitting_seq"] <= 480 < m["first_failing_seq"]
    assert m["estimate_compared"] and all("difference" in c for c in m["estimate_compared"])

    sp = s["speed"]
    assert sp["status"] == "ok", sp
    assert sp["paths"]["plain"]["tokens_per_s"] > 0 and sp["unsloth_skipped"]

    sa = s["sampling"]
    assert sa["status"] == "ok", sa
    assert sa["variants"]["16bit"]["ratio"] > 0
    assert sa["variants"]["4bit"]["status"] == "skipped"

    r = s["real_model"]
    assert r["status"] == "ok", r
    for stage in ("build", "sample", "filter", "train", "export"):
        assert stage in r["stages"]
    assert r["stages"]["train"]["steps"] >= 1

    md = (out / "gpu_check.md").read_text()
    assert md.startswith("## GPU check (benchmarks/gpu_check.py)")
    assert "dry run on CPU" in md and "| memory | ok |" in md and "**Training memory**" in md
    assert "**Sampling**" in md and "**Real model end to end**" in md

    # --render puts the section into a docs file (a copy, not the repo's)
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "benchmarks.md").write_text("# Benchmarks\n\n## Other\n\ntext\n")
    subprocess.run([sys.executable, str(SCRIPT), "--render", str(out / "gpu_check.json"), "--docs", str(docs)],
                   check=True, capture_output=True, text=True, timeout=120)
    rendered = (docs / "benchmarks.md").read_text()
    assert "## Other" in rendered and "## GPU check (benchmarks/gpu_check.py)" in rendered
    assert json.loads((docs / "benchmarks" / "gpu_check.json").read_text())["dry_run"] is True
