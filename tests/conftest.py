"""Shared fixtures: the tiny local model (built once per machine, cached) and data paths."""

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
