"""benchmarks/real_learnability.py: runs from another session join the report only when
they were made against the same base judge on the same sets."""

import json

import pytest
import real_learnability as rl


def results(runs, base_acc=0.5, command="python benchmarks/real_learnability.py X", n_test=100):
    metrics = {m: 0.5 for m in ("accuracy", "consistency", "position_bias", "unparseable_rate", "accuracy_prob")}
    metrics |= {f"{m}_ci": [0.4, 0.6] for m in metrics}
    base = {"hh_heldout": metrics | {"accuracy": base_acc, "mean_p1": 0.78}}
    row = {"hh_heldout": metrics | {"gain": {"gain": 0.0, "ci": [0.0, 0.0]}, "consistency_change": 0.0,
                                    "mean_p1": 0.5}}
    return {"meta": {"date": "2026-12-02", "machine": "x86_64, 2 CPU cores, no GPU", "torch": "t",
                     "transformers": "t", "trl": "t", "command": command, "n_train": 24, "n_test": n_test,
                     "n_llmbar": 0},
            "summary": {"base": base, "runs": [{"variant": v, "seed": s, "times": {"train": 1.0}, "dpo_pairs": 3,
                                                "train": {}, **row} for v, s in runs]}}


def test_merge_keeps_earlier_runs_not_run_again_in_variant_then_seed_order():
    old = results([("conj", 0), ("conj", 1), ("rise", 0)], command="old")
    new = results([("rise", 1), ("rise", 0)], command="new")
    merged = rl.merge(new, json.loads(json.dumps(old)), ["rise"], "old.json")
    assert [(r["variant"], r["seed"]) for r in merged["summary"]["runs"]] == [
        ("conj", 0), ("conj", 1), ("rise", 0), ("rise", 1)]
    assert merged["meta"]["commands"] == ["old", "new"]
    assert merged["meta"]["merged"]["runs"] == ["conj seed 0", "conj seed 1"]
    text = rl.render(merged)
    assert "Commands: `old`; `new`" in text and text.count("| rise seed 0 |") == 2  # both tables


def test_merge_refuses_runs_made_against_another_base_or_other_sets():
    with pytest.raises(SystemExit, match="hh_heldout"):
        rl.merge(results([("rise", 1)]), results([("conj", 0)], base_acc=0.6), ["rise"], "old.json")
    with pytest.raises(SystemExit, match="sizes"):
        rl.merge(results([("rise", 1)]), results([("conj", 0)], n_test=50), ["rise"], "old.json")
