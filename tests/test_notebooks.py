"""The Colab and Kaggle notebooks: valid notebooks that call the package's API, and each
one executes top to bottom (nbclient, a real kernel) in tiny-CPU mode, so a notebook
cannot silently rot.

Tiny-CPU mode is the notebooks' own parameter cell: CONJ_LITE_NOTEBOOK_TINY=1 switches to
recipes/tiny-cpu.yaml (the tiny local model, data/sample_prefs.jsonl), a dozen training
pairs and a handful of held-out ones, and skips installing, downloading and pushing;
CONJ_LITE_NOTEBOOK_OUT is the run directory. Export fetches llama.cpp's converter once
into the conj-lite cache if it is not there yet, as tests/test_export.py does."""

from __future__ import annotations

import json
import re
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
IDS = [p.stem for p in NOTEBOOKS]

# What each notebook must do through the package (stage by stage), and what it must
# never do itself: the libraries are the package's business.
API_CALLS = ("ConjRun.from_recipe(", ".data()", "run.sample()", "run.filter()", "run.train(", "run.export()",
             "evaluate(", "write_report(", "Judge.from_gguf(", ".compare(", "load_recipe(")
NOT_IN_NOTEBOOKS = ("import trl", "from trl", "DPOTrainer", "from peft", "import peft", "import llama_cpp",
                    "convert_hf_to_gguf", "llama_model_quantize", "BitsAndBytesConfig", ".generate(")


def code_of(nb) -> str:
    return "\n".join(cell.source for cell in nb.cells if cell.cell_type == "code")


def test_both_notebooks_are_shipped():
    assert {p.name for p in NOTEBOOKS} == {"conj_lite_colab.ipynb", "conj_lite_kaggle.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_is_valid_and_clean(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code_cells), "commit notebooks without outputs"
    first = code_cells[0]
    assert "parameters" in first.metadata.get("tags", [])
    assert "CONJ_LITE_NOTEBOOK_TINY" in first.source


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_calls_the_api_and_reimplements_nothing(path):
    code = code_of(nbformat.read(path, as_version=4))
    for call in API_CALLS:
        assert call in code, f"{path.name} does not call {call}"
    for forbidden in NOT_IN_NOTEBOOKS:
        assert forbidden not in code, f"{path.name} does {forbidden!r} itself; call conj_lite instead"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_default_recipes_exist(path):
    code = code_of(nbformat.read(path, as_version=4))
    named = set(re.findall(r'"(?:recipes/)?([a-z0-9.\-]+_(?:t4|p100|l4|a100))(?:\.yaml)?"', code))
    assert named, "the notebook names no recipe"
    for stem in named:
        assert (REPO / "conj_lite" / "recipes" / f"{stem}.yaml").is_file(), stem


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_runs_end_to_end_in_tiny_cpu_mode(path, tmp_path, monkeypatch, tiny_model_dir):
    from nbclient import NotebookClient

    out = tmp_path / "run"
    monkeypatch.setenv("CONJ_LITE_NOTEBOOK_TINY", "1")
    monkeypatch.setenv("CONJ_LITE_NOTEBOOK_OUT", str(out))
    monkeypatch.setenv("CONJ_LITE_THREADS", "2")
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(REPO)}})
    client.execute()  # raises CellExecutionError, with the cell and its traceback, on any error

    for name in ("train_pairs.jsonl", "judgments.jsonl", "pairs.jsonl", "stats.json",
                 "adapter/adapter_model.safetensors", "adapter/conj_lite_train.json", "merged/config.json",
                 "gguf/judge-q4_k_m.gguf", "eval/report.md", "eval/report.json"):
        assert (out / name).is_file(), name
    report = json.loads((out / "eval" / "report.json").read_text())
    assert set(report["judges"]) == {"before", "after"}
    held_out = [json.loads(line) for line in (out / "eval" / "before.jsonl").read_text().splitlines()]
    train_ids = {json.loads(line)["id"] for line in (out / "train_pairs.jsonl").read_text().splitlines()}
    assert held_out and not train_ids & {r["id"] for r in held_out}, "the held-out pairs were trained on"
    printed = "".join(o.get("text", "") for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs)
    assert len(re.findall(r"verdict (A|B|inconsistent) \(label", printed)) == 2  # LOCAL_JUDGE_PAIRS in tiny mode


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_installs_unsloth_without_its_dependencies(path):
    """As unsloth's own notebooks do: with its dependencies, pip may replace the runtime's
    torch (xformers' wheels pin an exact torch), leaving a driver mismatch or no CUDA. The
    install cell stops when torch changed anyway."""
    code = code_of(nbformat.read(path, as_version=4))
    installs = [line.strip() for line in code.splitlines() if "pip install" in line]
    unsloth = [line for line in installs if "unsloth" in line]
    assert unsloth and all("--no-deps" in line for line in unsloth), installs
    assert not any("xformers" in line for line in installs)
    assert "torch_after != torch_before" in code
