"""benchmarks/gpu_check.py cannot rot: its CPU dry run goes through every section's code
(all but the CUDA-only calls) and writes the JSON and markdown the docs take in."""

import json
import os
import subprocess
import sys
from pathlib import Path

import gpu_carry
import gpu_check as gc
import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
# One thread for conj-lite's CPU paths: on a box shared with other jobs two spinning OpenMP
# threads make each sampling draw over SmolLM2's 49k vocabulary 20x slower (measured).
ENV = dict(os.environ, CONJ_LITE_THREADS="1")


def test_next_lengths_brackets_the_longest_fit():
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


def test_plan_lists_what_the_one_call_carries(tmp_path):
    """--plan names each carried file with its size, the total in MiB against the 40 MiB
    goal, and the command; missing wheels (no --prepare yet) make it fail."""
    wheels = tmp_path / "wheels"
    lines: list[str] = []
    assert gpu_carry.plan("main", gc.PLAN_FLAGS, wheels=wheels, out=lines.append) == 1  # nothing prepared
    folder = REPO / ".gpu-wheels" / "main"
    if not any(folder.glob("*.whl")):
        pytest.skip("run `python benchmarks/gpu_check.py --prepare` first (network)")
    lines.clear()
    assert gpu_carry.plan("main", gc.PLAN_FLAGS, out=lines.append) == 0, "\n".join(lines)
    text = "\n".join(lines)
    for wheel in folder.glob("*.whl"):
        assert wheel.name in text
    total = float(next(line for line in lines if line.strip().startswith("total")).split()[1])
    assert total <= gpu_carry.MAIN_GOAL_MIB
    command = next(lines[i + 1] for i, line in enumerate(lines) if line.strip().startswith("command")).strip()
    assert len(command) <= 2000 and "gpu_check.py --real-export merge --out $OUT" in command


def test_slim_wheel_keeps_what_the_machine_loads(tmp_path):
    """bitsandbytes keeps its CUDA 13.0 and CPU libraries, unsloth loses studio/ and its CLI,
    and RECORD lists exactly what is left, with the hashes pip writes."""
    import base64
    import hashlib
    import zipfile

    src = tmp_path / "bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl"
    members = {"bitsandbytes/__init__.py": b"x = 1\n", "bitsandbytes/libbitsandbytes_cuda130.so": b"130",
               "bitsandbytes/libbitsandbytes_cuda128.so": b"128" * 1000, "bitsandbytes/libbitsandbytes_cpu.so": b"cpu",
               "bitsandbytes/libbitsandbytes_rocm72.so": b"rocm", "bitsandbytes-0.50.2.dist-info/METADATA": b"Name: bitsandbytes\n"}
    with zipfile.ZipFile(src, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
        z.writestr("bitsandbytes-0.50.2.dist-info/RECORD", "\n".join(f"{n},," for n in members) + "\n")
    dst = tmp_path / "slim" / src.name
    dst.parent.mkdir()
    assert gpu_carry.slim_wheel(src, dst, gpu_carry.keep_bitsandbytes) == (4, 2)
    with zipfile.ZipFile(dst) as z:
        names = set(z.namelist())
        record = z.read("bitsandbytes-0.50.2.dist-info/RECORD").decode().splitlines()
    assert names == {n for n in members if "cuda128" not in n and "rocm" not in n} | {"bitsandbytes-0.50.2.dist-info/RECORD"}
    digest = base64.urlsafe_b64encode(hashlib.sha256(b"130").digest()).rstrip(b"=").decode()
    assert f"bitsandbytes/libbitsandbytes_cuda130.so,sha256={digest},3" in record
    assert len(record) == 5 and record[-1] == "bitsandbytes-0.50.2.dist-info/RECORD,,"
    assert not gpu_carry.keep_unsloth("studio/backend/app.py") and not gpu_carry.keep_unsloth("unsloth_cli/options.py")
    assert gpu_carry.keep_unsloth("unsloth/__init__.py")


def test_real_model_overrides_differ_only_in_4bit_and_unsloth():
    """The dry run trains the GPU run's recipe with the GPU run's overrides; only 4-bit and
    unsloth, which need CUDA, differ. And they pass the recipe's own checks: the held-out
    pairs it keeps (12) would not fit the 8 pairs the check uses."""
    from conj_lite.config import load_recipe
    from conj_lite.data import heldout_split, load_pairs

    args = {"real_data": "data/sample_prefs.jsonl", "real_pairs": 8, "real_steps": 4, "real_unsloth": "auto",
            "llama_cpp": None}
    gpu_common, gpu_own = gc.real_model_overrides({**args, "dry_run": False})
    dry_common, dry_own = gc.real_model_overrides({**args, "dry_run": True})
    assert gpu_common == dry_common
    assert [o.split("=")[0] for o in gpu_own] == [o.split("=")[0] for o in dry_own] == ["model.load_in_4bit",
                                                                                          "model.use_unsloth"]
    recipe = load_recipe(gc.find_recipe(gc.REAL_RECIPE), gpu_common + gpu_own)
    assert recipe.model.load_in_4bit is True and recipe.model.dtype == "auto"
    pairs = load_pairs(recipe.data.path, limit=recipe.data.limit).pairs
    train, heldout = heldout_split(pairs, recipe.data.heldout)  # raises where the data has too few pairs
    assert len(train) == len(pairs) == 8 and not heldout


def test_learning_curve_is_an_optional_second_step(tmp_path):
    """Never in the main call; asked for, it runs the hook or says why not, and --render
    gives it its own section, not the GPU check's."""
    assert "learning_curve" not in gc.SECTIONS and "learning_curve" in gc.OPTIONAL_SECTIONS
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out), "--work", str(tmp_path / "w"),
                           "--sections", "learning_curve"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    r = json.loads((out / "gpu_check.json").read_text())["sections"]["learning_curve"]
    if not (REPO / "benchmarks" / "learning_curve.py").is_file():
        assert r["status"] == "skipped" and "learning_curve.py" in r["reason"]
    docs = tmp_path / "docs"
    docs.mkdir()
    subprocess.run([sys.executable, str(SCRIPT), "--render", str(out / "gpu_check.json"), "--docs", str(docs)],
                   check=True, capture_output=True, text=True, timeout=120)
    rendered = (docs / "benchmarks.md").read_text()
    assert f"## {gc.CURVE_TITLE}" in rendered and f"## {gc.TITLE}\n" not in rendered
    assert (docs / "benchmarks" / gc.CURVE_RAW_NAME).is_file()


@pytest.mark.slow
def test_a_section_stopped_by_its_box_keeps_its_figures(tmp_path, tiny_model_dir):
    """A section killed by its time box keeps the figures it had written (each stage as it
    ends) and names what is missing and why."""
    out, work = tmp_path / "out", tmp_path / "work"
    # Training that cannot end (100,000 steps) inside a 200 s box; sampling ends well before
    # (about 15 s, 55 s on a box shared with other jobs).
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out), "--work", str(work),
                           "--sections", "real_model", "--box", "real_model=200", "--real-steps", "100000",
                           *gc.PLAN_FLAGS], capture_output=True, text=True, timeout=600, cwd=REPO,
                          env=ENV)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads((out / "gpu_check.json").read_text())["sections"]["real_model"]
    assert r["status"] == "timeout"
    assert {"build", "sample", "filter"} <= set(r["stages"]) and "train" not in r["stages"]
    assert r["stages"]["sample"]["judgments"] > 0
    assert any(m.startswith("real_model: train (ran past its 200s box") for m in r["missing"]), r["missing"]
    md = (out / "gpu_check.md").read_text()
    assert "Missing figures: real_model: train" in md and "| sample |" in md


@pytest.mark.slow
def test_dry_run_writes_json_and_markdown(tmp_path, tiny_model_dir):
    """The dry run, with the flags of the planned GPU call, runs every section."""
    out, work = tmp_path / "out", tmp_path / "work"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out), "--work", str(work),
                           *gc.PLAN_FLAGS], capture_output=True, text=True, timeout=1500, cwd=REPO, env=ENV)
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
    assert m["checkpoint_build_s"] >= 0 and m["main"]["wall_s"] > 0
    assert m["main"]["fits"] is True and m["main"]["peak_rss_gb"] > 0
    assert m["main"]["weights_gb_by_dtype"] and m["main"]["trainable_dtypes"] == {"float32": m["main"]["trainable_dtypes"]["float32"]}
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
    assert r["recipe"].endswith(f"{gc.REAL_RECIPE}.yaml")  # the GPU run's recipe, not tiny-cpu
    common, _ = gc.real_model_overrides(json.loads((work / "dry" / "real_model.config.json").read_text()))
    assert r["overrides"][:len(common)] == common == r["common_overrides"]
    for stage in ("build", "sample", "filter", "train", "export"):
        assert stage in r["stages"]
    assert r["stages"]["train"]["steps"] >= 1
    assert r["stages"]["export"]["merged_only"].startswith("--real-export merge")
    assert any(item.startswith("real_model: convert, quantize") for item in r["missing"])
    assert any(item.startswith("speed: unsloth") for item in s["speed"]["missing"])

    md = (out / "gpu_check.md").read_text()
    assert md.startswith("## GPU check (benchmarks/gpu_check.py)")
    assert "dry run on CPU" in md and "| memory | ok |" in md and "**Training memory**" in md
    assert "Missing figures:" in md
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
