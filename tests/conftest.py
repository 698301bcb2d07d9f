"""Shared fixtures: the tiny local model (built once per machine, cached) and data paths."""

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
LLMBAR_NATURAL = SHARED / "data" / "llmbar" / "Dataset" / "LLMBar" / "Natural" / "dataset.json"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def sample_data() -> Path:
    return REPO / "data" / "sample_prefs.jsonl"


@pytest.fixture(scope="session")
def llmbar_natural() -> Path:
    if not LLMBAR_NATURAL.is_file():
        pytest.skip("../shared/data/llmbar is not next to the repo")
    return LLMBAR_NATURAL


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The default tiny judge (the same build as recipes/tiny-cpu.yaml uses)."""
    import torch

    from conj_lite.tiny import tiny_model_path

    torch.set_num_threads(2)
    return tiny_model_path()


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real default model, SmolLM2-135M-Instruct, built from its registry package (cached)."""
    import torch

    from conj_lite.packaged import packaged_model_path

    torch.set_num_threads(2)
    return packaged_model_path("smollm2-135m")


class SmallDisk:
    """A tmpfs of a few KiB mounted at `path`: a disk that really fills up."""

    def __init__(self, path: Path):
        self.path = path

    def grow(self, size: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(self.path)], check=True)


@pytest.fixture
def small_disk(tmp_path):
    """A 64 KiB tmpfs (SmallDisk). Mounting needs root, as CI and these machines run;
    skipped where it is not allowed."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {made.stderr.decode(errors='replace').strip()}")
    try:
        yield SmallDisk(mount)
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)
