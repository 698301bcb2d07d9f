"""Issue 12, item 2: pipeline stages know their inputs. A stage is skipped or resumed
only while the inputs it recorded are today's; otherwise it runs again, says why, and
keeps its old outputs in stale-<time>/."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from conj_lite.cli import main
from conj_lite.config import load_recipe, save_recipe
from conj_lite.jsonio import read_jsonl
from conj_lite.pipeline import ConjRun, final_adapter_of

FAST = ["data.limit=4", "sampling.n_repeats=2", "sampling.max_new_tokens=24", "export.enabled=false",
        "training.max_steps=2", "training.epochs=1", "training.save_steps=100"]


def recipe_path(repo_root: Path) -> Path:
    return repo_root / "conj_lite" / "recipes" / "tiny-cpu.yaml"


@pytest.fixture(scope="module")
def sampled(tmp_path_factory, repo_root, tiny_model_dir):
    """A run directory after sample + filter (copied by each test)."""
    out = tmp_path_factory.mktemp("sampled")
    run = ConjRun.from_recipe(recipe_path(repo_root), out, FAST)
    run.sample()
    run.filter()
    return out


def copy_run(sampled: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(sampled, out)
    return out


def said(capsys) -> str:
    """What the run printed (rich writes to stderr), with line wraps undone."""
    captured = capsys.readouterr()
    return " ".join((captured.out + captured.err).split())


def stale_dirs(out: Path) -> list[Path]:
    return sorted(out.glob("stale-*"))


@pytest.mark.slow
def test_changing_the_model_resamples_and_keeps_the_old_judgments(sampled, repo_root, tiny_model_dir, tmp_path,
                                                                 capsys):
    out = copy_run(sampled, tmp_path)
    before = read_jsonl(out / "judgments.jsonl")
    capsys.readouterr()
    run = ConjRun.from_recipe(recipe_path(repo_root), out, [*FAST, f"model.name_or_path={tiny_model_dir}"])
    run.sample()
    text = said(capsys)
    assert "sample (round 1): inputs changed:" in text and 'model.settings.name_or_path: was "tiny"' in text
    [stale] = stale_dirs(out)
    assert read_jsonl(stale / "judgments.jsonl") == before  # kept, not deleted
    after = read_jsonl(out / "judgments.jsonl")
    assert len(after) == len(before)  # sampled again, not mixed (old code: skipped, 0 new)
    record = json.loads((out / "sampled_from.json").read_text())
    assert record["inputs"]["model"]["settings"]["name_or_path"] == str(tiny_model_dir)
    # same weights, same per-judgment seeds: the same judgments, so the filter stays current
    assert sorted(r["text"] for r in after) == sorted(r["text"] for r in before)
    assert run.filter_is_current(1)
    capsys.readouterr()
    ConjRun.from_recipe(recipe_path(repo_root), out, [*FAST, f"model.name_or_path={tiny_model_dir}"]).sample()
    assert "already in" in said(capsys) and len(stale_dirs(out)) == 1


@pytest.mark.slow
def test_changing_the_template_resamples(sampled, repo_root, tiny_model_dir, tmp_path, capsys):
    out = copy_run(sampled, tmp_path)
    base = [*FAST, f"model.name_or_path={tiny_model_dir}"]
    ConjRun.from_recipe(recipe_path(repo_root), out, base).sample()  # the model moved: resampled once
    n = len(read_jsonl(out / "judgments.jsonl"))
    template = tmp_path / "strict.yaml"  # the en template with another name and system prompt
    text = (repo_root / "conj_lite" / "templates" / "en.yaml").read_text("utf-8")
    template.write_text(text.replace("name: en", "name: strict").replace("You are", "You are a strict judge;"),
                        "utf-8")
    capsys.readouterr()
    ConjRun.from_recipe(recipe_path(repo_root), out, [*base, f"prompts.template={template}"]).sample()
    assert "inputs changed: model.template" in said(capsys)
    rows = read_jsonl(out / "judgments.jsonl")
    assert len(rows) == n and len(stale_dirs(out)) == 2  # both earlier samplings kept
    assert json.loads((out / "sampled_from.json").read_text())["inputs"]["model"]["template"]["name"] == "strict"


@pytest.mark.slow
def test_a_filtering_edit_reruns_the_filter(sampled, repo_root, tmp_path, capsys):
    out = copy_run(sampled, tmp_path)
    same = ConjRun.from_recipe(recipe_path(repo_root), out, FAST)
    assert same.filter_is_current(1)
    edited = ConjRun.from_recipe(recipe_path(repo_root), out, [*FAST, "filtering.max_pairs=1"])
    assert not edited.filter_is_current(1)  # old code: current, because only file times were compared
    old_pairs = read_jsonl(out / "pairs.jsonl")
    capsys.readouterr()
    result = edited.filter(1)
    assert "filter (round 1): inputs changed: filtering.max_pairs: was 3, now 1" in said(capsys)
    assert edited.filter_is_current(1)
    assert read_jsonl(stale_dirs(out)[0] / "pairs.jsonl") == old_pairs
    assert len(result.pairs) <= len(old_pairs)


@pytest.mark.slow
def test_train_reruns_when_pairs_change_and_export_takes_the_last_round(sampled, repo_root, tmp_path, capsys):
    out = copy_run(sampled, tmp_path)
    run = ConjRun.from_recipe(recipe_path(repo_root), out, FAST)
    run.train(1)
    meta = (out / "adapter" / "conj_lite_train.json").read_text()
    capsys.readouterr()
    run.run_all(export=False)
    assert "adapter already in" in said(capsys)
    edited = ConjRun.from_recipe(recipe_path(repo_root), out, [*FAST, "filtering.hint_pair=false"])
    edited.run_all(export=False)
    assert "train (round 1): inputs changed: data:" in said(capsys)  # old code: skipped, the adapter existed
    assert (stale_dirs(out)[0] / "adapter" / "conj_lite_train.json").read_text() == meta
    record = json.loads((out / "trained_from.json").read_text())
    assert record["complete"] and record["inputs"]["data"]["digest"] == \
        edited.train_inputs(out / "pairs.jsonl", edited.recipe, None)["data"]["digest"]


def test_export_out_takes_the_final_rounds_adapter(tmp_path, repo_root, capsys):
    out = tmp_path / "run"
    out.mkdir()
    recipe = load_recipe(recipe_path(repo_root))
    save_recipe(replace(recipe, rounds=2), out / "recipe.yaml")
    (out / "adapter").mkdir()  # round 1's adapter
    assert final_adapter_of(out) == out / "round-2" / "adapter"
    assert main(["export", "--out", str(out)]) == 2  # not round 1's adapter
    assert "round-2/adapter:noadapterhere" in said(capsys).replace(" ", "")
    save_recipe(replace(recipe, rounds=1), out / "recipe.yaml")
    assert final_adapter_of(out) == out / "adapter"
    assert final_adapter_of(tmp_path) is None


def test_the_sampling_gguf_type_is_an_input_of_the_llama_cpp_engine_only(repo_root, tiny_model_dir, tmp_path):
    """A change of sampling.gguf_type samples again on llama.cpp (another GGUF), and changes
    nothing the transformers engine reads."""
    def inputs(*overrides):
        run = ConjRun.from_recipe(recipe_path(repo_root), tmp_path / "run",
                                  [*FAST, f"model.name_or_path={tiny_model_dir}", *overrides])
        return run.sampling_inputs(None)

    f32, q8 = inputs("sampling.engine=llama.cpp"), inputs("sampling.engine=llama.cpp", "sampling.gguf_type=q8_0")
    assert (f32["engine"]["as"], q8["engine"]["as"]) == ("f32", "q8_0")
    assert "gguf_type" not in f32["sampling"]
    assert inputs("sampling.engine=transformers") == inputs("sampling.engine=transformers", "sampling.gguf_type=q8_0")
