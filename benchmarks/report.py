"""Write one benchmark's section of docs/benchmarks.md (and its raw JSON) in place."""

from __future__ import annotations

import datetime as dt
import json
import platform
import re
from importlib import metadata
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"
HEADER = "# Benchmarks\n\nMeasured figures, newest run of each benchmark. Raw numbers sit beside this file in `docs/benchmarks/`. Ratios are measured side by side in one run; absolute times only mean something on a GPU.\n"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    return None


def machine() -> str:
    import os

    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu_name()}, {os.cpu_count()} cores, {gpu}"


def package_versions(*names: str) -> dict:
    """{name: version or None}, with the Python version first."""
    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def versions(*names: str) -> str:
    return ", ".join(f"{name} {v}" for name, v in package_versions(*names).items() if v and name != "python")


def write_section(title: str, body: str, raw: dict, raw_name: str) -> Path:
    """Replace (or add) the `## title` section of docs/benchmarks.md."""
    DOCS.mkdir(exist_ok=True)
    (DOCS / "benchmarks").mkdir(exist_ok=True)
    (DOCS / "benchmarks" / raw_name).write_text(json.dumps(raw, indent=2) + "\n")
    path = DOCS / "benchmarks.md"
    text = path.read_text() if path.exists() else HEADER
    section = f"## {title}\n\n{body.strip()}\n\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section
    path.write_text(text)
    return path


def today() -> str:
    return dt.date.today().isoformat()
