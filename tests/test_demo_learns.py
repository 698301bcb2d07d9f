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

# The demo's runs (training on the CPU is not bit-for-bit repeatable). In fp32 at lr 1e-3 for 80 steps
# (2026-12-06): per-order accuracy +20.0 [+14, +26], the decision by P(A) over both orders +31 [+19, +43],
# consistency 1% -> 53%; the same settings on 640 examples of the learning curve's pool +14.5 [+9.5, +19.5].
# The lowest fresh-clone run so far: +10.5 [+4, +17] and +18 [+5, +30] (2026-12-06, fourth session, cosine);
# the same pairs with the constant schedule the recipe has since: +22.5 [+17, +29] and +30 [+17, +42].
# The recipe as shipped (constant schedule) in a fresh clone: +18.0 [+12, +24] and +34 [+22, +46] (fifth session).
# With the llama.cpp reference and batches padded to 8 (sixth session): +24.0 [+18, +30] and +30 [+18, +42]
# (empty cache), +17.5 [+10.5, +24] and +22 [+9, +34] (fresh clone; its loss spiked at step 76).
# With the held-out pairs on llama.cpp and the digit-splitting tokenizer (seventh session, fresh clone):
# +23.5 [+17, +30] and +33 [+21, +45]. The eighth session's fresh clone of the same recipe: +6.5 [+4, +10] and
# +27 [+14, +40] (it left the plateau at step ~63, its gradient spiked at 64-65 and it fell back: the lowest per-order
# gain so far, and why the per-order floor is 0.04, not 0.07).
# In bf16 (before) the runs gained +3.5 to +10.5 per order; a run that only moves the position prior
# gains about nothing on both.
GAIN_FLOOR = 0.04  # per-order accuracy
DECISION_FLOOR = 0.10  # the decision by P(A) averaged over both orders


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
