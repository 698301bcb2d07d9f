"""Data-parallel training under `accelerate launch`, two CPU processes.

Multi-GPU users run the unchanged training entry point under accelerate:

    accelerate launch --multi_gpu --num_processes 2 -m conj_lite.cli train --recipe R --out DIR

On a CPU-only machine the same command starts two processes through torch's elastic
launcher, and the Trainer (use_cpu) joins them over gloo: real data parallelism, the
code path of the GPU case minus NCCL and bitsandbytes. (`accelerate launch --cpu
--num_processes 2` is not the way to test it: without mpirun accelerate starts a single
process and says nothing.)
"""

from __future__ import annotations

import inspect
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conj_lite import training
from conj_lite.pipeline import ConjRun

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "conj_lite" / "recipes" / "tiny-cpu.yaml"
ACCELERATE = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which("accelerate")

pytestmark = pytest.mark.skipif(ACCELERATE is None, reason="the accelerate command is not installed")


def launch(*args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0", *args]
    env = dict(os.environ, CONJ_LITE_THREADS="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


PROBE = """
import json, sys
from pathlib import Path
from accelerate import PartialState
from conj_lite.config import load_recipe
from conj_lite.models import resolve_runtime
from conj_lite.training import trainer_config

recipe = load_recipe(sys.argv[1])
runtime = resolve_runtime(recipe.model)
args = trainer_config(recipe, runtime, Path(sys.argv[2]), gradient_checkpointing=False)
state = PartialState()
probe = {"rank": args.process_index, "world_size": args.world_size, "parallel_mode": str(args.parallel_mode),
         "distributed_type": str(state.distributed_type), "device": str(args.device), "runtime": runtime.device}
# one file per rank: the two processes share stdout, and their lines interleave
(Path(sys.argv[2]) / f"probe-{args.process_index}.json").write_text(json.dumps(probe))
"""


def test_launch_makes_two_data_parallel_cpu_processes(tmp_path):
    """conj_lite's own TrainingArguments, built under the launcher: two ranks, gloo data parallel."""
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    result = launch(str(script), str(RECIPE), str(tmp_path), cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    probes = [json.loads(f.read_text()) for f in sorted(tmp_path.glob("probe-*.json"))]
    assert sorted(p["rank"] for p in probes) == [0, 1]
    for p in probes:
        assert p["world_size"] == 2
        assert p["distributed_type"] == "DistributedType.MULTI_CPU"
        assert p["parallel_mode"] == "ParallelMode.DISTRIBUTED"
        assert p["device"].startswith("cpu") and p["runtime"] == "cpu"


@pytest.fixture(scope="module")
def pairs_run(tmp_path_factory, tiny_model_dir):
    """pairs.jsonl from the tiny model (sample + filter in this process)."""
    out = tmp_path_factory.mktemp("accelerate")
    run = ConjRun.from_recipe(RECIPE, out, ["data.limit=16", "sampling.n_repeats=2", "sampling.max_new_tokens=48"])
    run.sample()
    run.filter()
    return out


SAVES_ON_MAIN_ONLY = "is_main_process" in inspect.getsource(training.train_adapter)


@pytest.mark.slow
@pytest.mark.xfail(
    not SAVES_ON_MAIN_ONLY, strict=False,
    reason="conj_lite.training.train_adapter saves the adapter from every rank into the same "
           "adapter.partial directory; under two processes one rank renames it while the other still "
           "writes (FileNotFoundError). Fix: save, write the metadata and rename on the main process only, "
           "between accelerator.wait_for_everyone() barriers.",
)
def test_train_entry_point_runs_data_parallel(pairs_run, tmp_path):
    """`conj-lite train` unchanged under accelerate: completes, one adapter, and each rank
    took half the pairs (fewer optimizer steps than one process takes)."""
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(pairs_run / "pairs.jsonl", out / "pairs.jsonl")
    n_pairs = sum(1 for line in (out / "pairs.jsonl").read_text().splitlines() if line.strip())
    recipe_batch = 4  # tiny-cpu.yaml: training.batch_size, grad_accum 1
    result = launch("-m", "conj_lite.cli", "train", "--recipe", str(RECIPE), "--out", str(out),
                    "training.epochs=1", cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    meta = json.loads((out / "adapter" / "conj_lite_train.json").read_text())
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert not (out / "adapter.partial").exists()
    one_process = math.ceil(n_pairs / recipe_batch)
    two_processes = {math.ceil(math.ceil(n_pairs / recipe_batch) / 2), math.ceil(math.ceil(n_pairs / 2) / recipe_batch)}
    assert one_process >= 3, f"too few pairs ({n_pairs}) to tell one process from two"
    assert meta["summary"]["steps"] in two_processes, (meta["summary"]["steps"], n_pairs)
