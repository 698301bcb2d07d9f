"""Reliability figures (issue 12): resume gives the same result as no interruption, and
stored judgments are never reused by another judge setup.

    .venv/bin/python benchmarks/reliability.py --out /tmp/reliability [--kills 3] [--limit 6]

1. Sampling killed and resumed. `conj-lite sample` (the tiny model, tiny-cpu recipe)
   runs uninterrupted with batch_size 4, again with batch_size 7, and a third time in
   a subprocess that is sent SIGKILL `--kills` times at random moments after it has
   written judgments (each time resumed with the same command) until it finishes. The
   three judgments.jsonl are compared row by row, keyed by (pair id, order, kind,
   sample): lost rows, duplicated rows and differing texts are counted.
2. Mismatches refused. `conj-lite judge --output` is run with the tiny judge, then into
   the same file with a judge that differs in one respect (other weights, template,
   context size, max_new_tokens): each must stop (exit 2) naming the field.

Prints one JSON object (also written to OUT/reliability.json).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def sample_cmd(out: Path, limit: int, batch_size: int, seed: int) -> list[str]:
    return [sys.executable, "-m", "conj_lite.cli", "sample", "--recipe", "tiny-cpu", "--out", str(out),
            f"data.limit={limit}", "sampling.n_repeats=4", "sampling.max_new_tokens=32",
            f"sampling.batch_size={batch_size}", f"sampling.seed={seed}", "export.enabled=false"]


def rows_of(path: Path) -> tuple[dict, int]:
    """{key: text} and the number of rows (duplicates show as rows > keys)."""
    rows = [json.loads(line) for line in path.read_text("utf-8").splitlines() if line.strip()]
    return {(r["id"], r["order"], r["kind"], r["sample"]): r["text"] for r in rows}, len(rows)


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2"}


def run_to_end(cmd: list[str], timeout: float = 900) -> None:
    result = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stderr[-2000:]}")


def killed_run(cmd: list[str], judgments: Path, kills: int, rng: random.Random, timeout: float = 900) -> list[int]:
    """Run `cmd`, SIGKILL it `kills` times at random moments after it wrote new rows,
    resume each time; returns the row count at each kill (the process was alive)."""
    at = []
    while len(at) < kills:
        before = judgments.stat().st_size if judgments.exists() else 0
        proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        start = time.monotonic()
        while proc.poll() is None and (not judgments.exists() or judgments.stat().st_size <= before):
            if time.monotonic() - start > timeout:
                proc.kill()
                raise RuntimeError("no progress")
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.3))  # somewhere in the next batches, maybe mid-write (llama.cpp samples the tiny model in ~1 s)
        if proc.poll() is not None:
            break  # it finished before this kill: fewer kills than asked
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        at.append(sum(1 for line in judgments.read_bytes().split(b"\n") if line.strip()))
    run_to_end(cmd, timeout)
    return at


def kill_check(work: Path, kills: int = 3, limit: int = 6, seed: int = 0) -> dict:
    """Uninterrupted (batch 4), other batch size (7) and killed-and-resumed (batch 4) runs."""
    rng = random.Random(seed)
    runs = {name: work / name for name in ("straight", "other_batch", "killed")}
    for path in runs.values():
        shutil.rmtree(path, ignore_errors=True)
    start = time.perf_counter()
    run_to_end(sample_cmd(runs["straight"], limit, 4, seed))
    run_to_end(sample_cmd(runs["other_batch"], limit, 7, seed))
    kill_rows = killed_run(sample_cmd(runs["killed"], limit, 4, seed), runs["killed"] / "judgments.jsonl", kills, rng)
    seconds = time.perf_counter() - start
    ref, ref_rows = rows_of(runs["straight"] / "judgments.jsonl")
    out = {"kills": len(kill_rows), "rows_at_kills": kill_rows, "judgments": len(ref), "seconds": round(seconds, 1)}
    for name in ("other_batch", "killed"):
        got, n_rows = rows_of(runs[name] / "judgments.jsonl")
        out[name] = {"rows": n_rows, "lost": len(set(ref) - set(got)), "extra": len(set(got) - set(ref)),
                     "duplicated": n_rows - len(got),
                     "texts_compared": len(set(ref) & set(got)),
                     "texts_differing": sum(ref[k] != got[k] for k in set(ref) & set(got))}
    out["straight_duplicated"] = ref_rows - len(ref)
    return out


def swap_verdict_rows(src: Path, dst: Path) -> Path:
    """A copy of the tiny model whose output rows for "1" and "2" are swapped."""
    from transformers import AutoTokenizer

    from conj_lite.tiny import swap_verdict_rows as swap

    tok = AutoTokenizer.from_pretrained(str(src))
    one, two = (tok("x: 1", add_special_tokens=False).input_ids[-1], tok("x: 2", add_special_tokens=False).input_ids[-1])
    return swap(src, dst, one, two)


def mismatch_check(work: Path, pairs: int = 3) -> dict:
    """Judge into one --output, then with a judge that differs in one respect."""
    from conj_lite.tiny import tiny_model_path

    good = tiny_model_path()
    wrong = swap_verdict_rows(good, work / "wrong-judge")
    data = REPO / "data" / "sample_prefs.jsonl"
    base = ["--data", str(data), "--limit", str(pairs), "--threads", "2", "--max-new-tokens", "12", "--ctx", "512"]
    variants = {
        "other weights": ["--model", str(wrong)],
        "template": ["--model", str(good), "--template", "zh"],
        "context size": ["--model", str(good), "--ctx", "640"],
        "max_new_tokens": ["--model", str(good), "--max-new-tokens", "13"],
    }
    out = {"scenarios": len(variants), "refused": 0, "resumed_same_judge": None, "fields_named": {}}
    for name, change in variants.items():
        target = work / f"judge-{name.replace(' ', '_')}.jsonl"
        for stale in work.glob(target.name + "*"):
            stale.unlink()
        cmd = [sys.executable, "-m", "conj_lite.cli", "judge", *base, "--output", str(target)]
        run_to_end([*cmd, "--model", str(good)])
        again = subprocess.run([*cmd, "--model", str(good)], cwd=REPO, env=env(), capture_output=True, text=True)
        if out["resumed_same_judge"] is None:
            out["resumed_same_judge"] = f"0 pairs judged ({pairs} already done)" in " ".join(again.stderr.split())
        second = subprocess.run([*cmd, *change], cwd=REPO, env=env(), capture_output=True, text=True)
        text = " ".join(second.stderr.split())
        refused = second.returncode == 2 and "another judge setup" in text
        out["refused"] += refused
        out["fields_named"][name] = text.split("judge setup;", 1)[-1].split(". Never mixed")[0].strip()[:200]
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="/tmp/conj-lite-reliability")
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--limit", type=int, default=6, help="pairs sampled (x2 orders x 6 judgments)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-mismatch", action="store_true")
    args = parser.parse_args(argv)
    work = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    result = {"kill_resume": kill_check(work, args.kills, args.limit, args.seed)}
    if not args.skip_mismatch:
        result["mismatch"] = mismatch_check(work)
    (work / "reliability.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
