"""The held-out pairs judged before and after training (`ConjRun.before_after`) on
llama.cpp (data.heldout_engine: an f16 GGUF of the base, the adapter as a GGUF LoRA);
the recipe field and what auto picks."""

from __future__ import annotations

import json

import pytest

from conj_lite.config import load_recipe, recipe_from_dict
from conj_lite.engines import gguf_engine
from conj_lite.errors import InputError
from conj_lite.pipeline import ConjRun


def test_the_held_out_engine_is_a_checked_recipe_field(tmp_path):
    assert load_recipe().data.heldout_engine == "transformers"  # the model as trained
    with pytest.raises(InputError, match="data.heldout_engine: expected one of"):
        recipe_from_dict({"data": {"heldout_engine": "vllm"}})
    (tmp_path / "config.json").write_text("{}")
    assert gguf_engine("auto", str(tmp_path)) == "llama.cpp"  # on a CPU, a directory llama.cpp can convert
    assert gguf_engine("auto", "org/model") == "transformers"  # a hub id: no GGUF
    assert gguf_engine("transformers", str(tmp_path)) == "transformers"


@pytest.mark.slow
def test_the_held_out_pairs_judged_on_llama_cpp(repo_root, tiny_model_dir, tmp_path):
    """data.heldout_engine=llama.cpp: the f32 GGUF of the base, then with the adapter as a
    GGUF LoRA. (Agreement with transformers is measured on SmolLM2, docs/benchmarks.md:
    llama.cpp's tokenizer reads some texts otherwise than the model's own, the tiny
    model's from the first token.)"""
    overrides = ["data.limit=30", "data.heldout=8", "sampling.n_repeats=2", "sampling.max_new_tokens=48",
                 "training.max_steps=4", "export.enabled=false", "data.heldout_engine=llama.cpp"]
    run = ConjRun.from_recipe(repo_root / "conj_lite" / "recipes" / "tiny-cpu.yaml", tmp_path / "run", overrides)
    run.run_all(export=False)
    result = json.loads((tmp_path / "run" / "heldout.json").read_text())
    assert result["engine"] == "llama.cpp" and result["dtype"] == "f32" and result["pairs"] == 8
    records = {}
    for name in ("before", "after"):
        path = tmp_path / "run" / "heldout" / f"{name}.jsonl"
        records[name] = {r["id"]: r for r in map(json.loads, path.read_text().splitlines())}
        meta = json.loads(path.with_name(path.name + ".meta.json").read_text())
        assert ("lora" in json.dumps(meta)) == (name == "after"), meta  # the adapter is the after judge's
    moved = [abs(records["after"][k]["p1_ab"] - records["before"][k]["p1_ab"]) for k in records["before"]]
    assert max(moved) > 0.001  # the adapter is applied
