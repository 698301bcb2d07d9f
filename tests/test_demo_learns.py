"""The embedded demo teaches: `conj-lite run smollm2-135m_cpu` as shipped (SmolLM2-135M,
the relevance task on the HH harmless single-turn conversations, one Con-J round),
judged on its 100 held-out pairs before and after training.

Slow: the demo's own sampling and training on 2 CPU cores (the export stage is left
out; the GGUF path has its own tests; about 18 minutes). The floor sits well under the gain the demo
measured (README, docs/benchmarks.md "The embedded demo"): a run that only moves the
position prior, as every SmolLM2 run did before the training fixes of issue 20, gains
about nothing and fails it."""

import json

import pytest

pytestmark = pytest.mark.slow

# Since the LoRA's start is seeded (ninth session) a seed is one run in every process; before, fresh clones of one
# recipe gained anything from +0.0 to +35.0 per order (docs/benchmarks.md, "One seed, one run"). The recipe as
# shipped (steps of 4 examples, the best window kept), seed 0, its training alone: +28.5 [+23, +33.5] per order,
# +33 [+21, +45] by P(A), consistency 63%; seed 1 +14.5 [+8.5, +21] and +18 [+4, +32]; seed 2 +19.5 [+12.5, +26.5]
# and +21 [+7, +34]. A run that only moves the position prior gains about nothing on both, and the floors sit well
# under seed 0's run.
GAIN_FLOOR = 0.10  # per-order accuracy
DECISION_FLOOR = 0.15  # the decision by P(A) averaged over both orders


def test_the_demo_recipe_teaches_its_held_out_pairs(smollm2_dir, tmp_path):
    from conj_lite.pipeline import ConjRun

    run = ConjRun.from_recipe("smollm2-135m_cpu", tmp_path / "run", ["export.enabled=false"])
    run.run_all(export=False)
    result = json.loads((tmp_path / "run" / "heldout.json").read_text())
    assert result["pairs"] >= 100
    before, after = result["before"], result["after"]
    gain, decision = result["gain"]["accuracy"], result["gain"]["accuracy_prob"]
    # the base judge leans on answer 1 and is at chance
    assert before["position_bias"] > 0.9 and abs(before["accuracy"] - 0.5) < 0.05
    # after one round it reads the answers: both measures gain, the per-order gain's paired interval above 0
    assert gain["gain"] >= GAIN_FLOOR and decision["gain"] >= DECISION_FLOOR, (gain, decision)
    assert gain["ci"][0] > 0, (gain, decision)
    # and leans on answer 1 less (52.5% after, from 99.5%)
    assert after["consistency"] > before["consistency"] + 0.1, after
    assert after["position_bias"] < before["position_bias"] - 0.1, after
