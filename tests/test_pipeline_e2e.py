"""The whole Con-J loop on the tiny local model: sample -> filter -> train."""

import json
import subprocess
import sys

import pytest

from conj_lite.pipeline import ConjRun

FAST = [
    "data.limit=14",
    "sampling.n_repeats=4",
    "sampling.max_new_tokens=48",
    "export.enabled=false",
]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, repo_root, tiny_model_dir):
    out = tmp_path_factory.mktemp("run")
    run = ConjRun.from_recipe(repo_root / "conj_lite" / "recipes" / "tiny-cpu.yaml", out, FAST)
    run.run_all()
    return run


@pytest.mark.slow
def test_run_writes_every_output(trained_run):
    out = trained_run.out_dir
    for name in ("judgments.jsonl", "pairs.jsonl", "stats.json", "recipe.yaml", "adapter/adapter_config.json"):
        assert (out / name).exists(), name
    judgments = [json.loads(line) for line in (out / "judgments.jsonl").read_text().splitlines()]
    keys = {(j["id"], j["order"], j["kind"], j["sample"]) for j in judgments}
    labelled = 14 - sum(1 for p in trained_run.data().pairs if p.label == "tie")
    # per labelled pair: 2 orders x (4 repeats + 1 true hint + 1 reversed hint)
    assert len(judgments) == len(keys) == labelled * 2 * 6
    stats = json.loads((out / "stats.json").read_text())
    pairs = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert stats["dpo_pairs"] == len(pairs) > 0
    assert sum(stats["dpo_pairs_by_kind"].values()) == len(pairs)


@pytest.mark.slow
def test_the_run_says_what_each_stage_cost(trained_run):
    costs = json.loads((trained_run.out_dir / "costs.json").read_text())["stages"]
    assert [c["stage"] for c in costs] == ["model + data", "sample", "filter", "train"]
    assert all(c["seconds"] >= 0 and c["peak_rss_gb"] > 0.05 for c in costs)
    assert all(c["peak_is_per_stage"] for c in costs)  # Linux resets the peak per stage
    # the training stage holds a model and an optimizer; filtering only reads JSON
    by_stage = {c["stage"]: c for c in costs}
    assert by_stage["train"]["seconds"] > by_stage["filter"]["seconds"]


def test_the_peak_window_starts_again_after_a_reset():
    from conj_lite.system import peak_rss_bytes, release_memory, reset_peak_rss

    block = bytearray(300 * 2**20)  # touch 300 MB
    block[:: 4096] = b"x" * len(block[:: 4096])
    high = peak_rss_bytes()
    del block
    release_memory()
    assert reset_peak_rss()
    assert peak_rss_bytes() < high - 200 * 2**20


@pytest.mark.slow
def test_training_moved_lora_weights_and_grew_the_margin(trained_run):
    from safetensors.torch import load_file

    weights = load_file(str(trained_run.out_dir / "adapter" / "adapter_model.safetensors"))
    lora_b = [t for name, t in weights.items() if "lora_B" in name]
    assert lora_b, "no LoRA B matrices saved"
    # peft initialises B to zero: any non-zero entry was learnt.
    assert max(float(t.abs().max()) for t in lora_b) > 0
    meta = json.loads((trained_run.out_dir / "adapter" / "conj_lite_train.json").read_text())
    before, after = meta["summary"]["before"], meta["summary"]["after"]
    # The margin is what DPO pushes up, step by step; the accuracy (share of pairs with a
    # positive margin) may already be full, or not yet move, in a few steps on some machine.
    assert after["margin"] > before["margin"]
    assert after["accuracy"] >= before["accuracy"]
    assert meta["history"], "no training log"
    assert meta["chat_date"] == trained_run.recipe.prompts.date_string


@pytest.mark.slow
def test_rerun_skips_complete_stages(trained_run, capsys):
    mtimes = {p.name: p.stat().st_mtime for p in trained_run.out_dir.glob("*.jsonl")}
    run = ConjRun.from_recipe(trained_run.recipe, trained_run.out_dir)
    run.run_all()
    assert {p.name: p.stat().st_mtime for p in trained_run.out_dir.glob("*.jsonl")} == mtimes


def cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "conj_lite.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def test_cli_missing_data_file_names_it(tmp_path):
    result = cli("run", "conj_lite/recipes/tiny-cpu.yaml", "--out", str(tmp_path), "data.path=nope/missing.jsonl")
    assert result.returncode == 2
    assert "missing.jsonl" in result.stderr


def test_cli_bad_jsonl_line_names_file_and_line(tmp_path, repo_root):
    bad = tmp_path / "bad.jsonl"
    good = (repo_root / "data" / "sample_prefs.jsonl").read_text().splitlines()[:3]
    bad.write_text("\n".join(good[:2] + ['{"question": "q", "answer_a": "x"'] + good[2:]) + "\n")
    result = cli("filter", "--recipe", str(repo_root / "conj_lite" / "recipes" / "tiny-cpu.yaml"), "--out", str(tmp_path / "o"), f"data.path={bad}")
    assert result.returncode == 2
    assert f"{bad}:3" in result.stderr.replace("\n", "")


def test_cli_unknown_recipe_key(tmp_path, repo_root):
    result = cli("sample", "--recipe", str(repo_root / "conj_lite" / "recipes" / "tiny-cpu.yaml"), "--out", str(tmp_path), "sampling.nrepeats=2")
    assert result.returncode == 2
    assert "nrepeats" in result.stderr


def test_cli_filter_without_judgments(tmp_path, repo_root):
    result = cli("filter", "--recipe", str(repo_root / "conj_lite" / "recipes" / "tiny-cpu.yaml"), "--out", str(tmp_path))
    assert result.returncode == 2
    assert "judgments.jsonl" in result.stderr


def test_train_without_pairs_is_a_clear_error(tmp_path, repo_root):
    (tmp_path / "pairs.jsonl").write_text("")
    result = cli("train", "--recipe", str(repo_root / "conj_lite" / "recipes" / "tiny-cpu.yaml"), "--out", str(tmp_path))
    assert result.returncode == 2
    assert "no DPO pairs" in result.stderr.replace("\n", " ")
