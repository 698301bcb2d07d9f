"""The judgment frame: one grammar for both backends, held sampling, per-judgment seeds."""

import json

import pytest

from conj_lite.config import SamplingConfig
from conj_lite.frame import closing_grammar, judgment_grammar, sample_seed, verdict_prefix
from conj_lite.parsing import parse_verdict
from conj_lite.prompts import judge_verdict_json, load_template

EN = load_template("en")


def test_format_and_prefix_agree_with_the_grammar_head():
    text = judge_verdict_json(EN, 'Answer 2 is "right".', 2)
    assert text == '{"rationale": "Answer 2 is \\"right\\".", "better_answer": 2}'
    assert text.startswith(verdict_prefix(EN, 'Answer 2 is "right".'))
    assert json.loads(text) == {"rationale": 'Answer 2 is "right".', "better_answer": 2}


def test_grammar_fixes_the_verdict_for_hints():
    assert "[12]" in judgment_grammar(EN)
    fixed = judgment_grammar(EN, 2)
    assert '"2" "}"' in fixed and "[12]" not in fixed
    assert '"1" "}"' in closing_grammar(EN, 1)
    with pytest.raises(ValueError):
        judgment_grammar(EN, 3)


def test_sample_seed_is_stable_and_distinct():
    a = sample_seed(0, "p1", "ab", "repeat", 0)
    assert a == sample_seed(0, "p1", "ab", "repeat", 0)
    others = {sample_seed(0, "p1", "ab", "repeat", 1), sample_seed(0, "p1", "ba", "repeat", 0),
              sample_seed(1, "p1", "ab", "repeat", 0), sample_seed(0, "p2", "ab", "repeat", 0),
              sample_seed(0, "p1", "ab", "hint_true", 0)}
    assert a not in others and len(others) == 5


def _matcher(tokenizer, grammar):
    import llguidance

    from conj_lite.frame import ll_tokenizer_for

    return llguidance.LLMatcher(ll_tokenizer_for(tokenizer, [tokenizer.eos_token_id]),
                                llguidance.grammar_from("gbnf", grammar))


def _accepts(tokenizer, grammar, text) -> bool:
    m = _matcher(tokenizer, grammar)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    return m.try_consume_tokens(ids) == len(ids) and m.is_accepting()


def test_grammar_accepts_judgments_and_refuses_lone_surrogates(tiny_model_dir):
    from conj_lite.models import load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    g = judgment_grammar(EN)
    assert _accepts(tok, g, '{"rationale": "Both are fine, answer 1 is exact.", "better_answer": 1}')
    assert _accepts(tok, g, '{"rationale": "caf\\u00e9", "better_answer": 2}')
    # A lone surrogate escape is valid JSON text but no UTF-8 file can hold it.
    assert not _accepts(tok, g, '{"rationale": "x \\ud83d y", "better_answer": 2}')
    assert not _accepts(tok, judgment_grammar(EN, 1), '{"rationale": "ok", "better_answer": 2}')


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from conj_lite.models import load_tokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), load_tokenizer(str(tiny_model_dir))


def _prompt(tok, q, a1, a2):
    from conj_lite.prompts import build_messages, render_prompt

    return render_prompt(tok, build_messages(EN, q, a1, a2))


def test_held_sampling_always_parses_and_hints_give_their_verdict(tiny):
    from conj_lite.sampling import generate

    model, tok = tiny
    cfg = SamplingConfig(temperature=1.5, top_p=1.0, repetition_penalty=1.0, max_new_tokens=24)
    prompts = [_prompt(tok, "What is 7 + 5?", "12", "13"), _prompt(tok, "Capital of France?", "Lyon", "Paris")]
    grammars = [judgment_grammar(EN, None)] * 2 + [judgment_grammar(EN, 1)] * 2 + [judgment_grammar(EN, 2)] * 2
    out = generate(model, tok, prompts * 3, 1, cfg, seeds=list(range(6)), grammars=grammars, closing_tokens=10)
    texts = [o[0][0] for o in out]
    for text in texts:  # a 24-token budget cuts rationales: the frame is closed in time
        assert json.loads(text)["better_answer"] in (1, 2), text
        assert parse_verdict(text).slot in (1, 2)
    assert [json.loads(t)["better_answer"] for t in texts[2:]] == [1, 1, 2, 2]


def test_a_judgment_does_not_depend_on_its_batch(tiny):
    """Per-sequence seeds: the same judgment alone, in another batch, or in another row."""
    from conj_lite.sampling import generate

    model, tok = tiny
    cfg = SamplingConfig(temperature=1.2, top_p=0.95, repetition_penalty=1.0, max_new_tokens=32)
    p1 = _prompt(tok, "What is 7 + 5?", "12", "13")
    p2 = _prompt(tok, "Name a primary colour of paint, and say why it is primary.", "Green", "Red")
    g = judgment_grammar(EN)
    alone = generate(model, tok, [p1], 2, cfg, seeds=[11, 12], grammars=[g, g])[0]
    mixed = generate(model, tok, [p2, p1], 2, cfg, seeds=[5, 6, 11, 12], grammars=[g] * 4)[1]
    swapped = generate(model, tok, [p1], 2, cfg, seeds=[12, 11], grammars=[g, g])[0]
    assert [t for t, _, _ in alone] == [t for t, _, _ in mixed]
    assert [t for t, _, _ in alone] == [t for t, _, _ in reversed(swapped)]


def test_free_format_is_seeded_too(tiny):
    from conj_lite.sampling import generate

    model, tok = tiny
    cfg = SamplingConfig(temperature=1.2, top_p=0.95, repetition_penalty=1.0, max_new_tokens=24)
    p = _prompt(tok, "What is 7 + 5?", "12", "13")
    first = generate(model, tok, [p], 3, cfg, seeds=[1, 2, 3])[0]
    again = generate(model, tok, [p, p], 1, cfg, seeds=[2, 3])
    assert [first[1][0], first[2][0]] == [again[0][0][0], again[1][0][0]]


def test_a_lone_surrogate_in_a_judgment_is_written_and_read_back(tmp_path):
    """A model can write `\\ud83d` inside a JSON string; the row must still be stored
    (a crash here repeated on every resume) and read back unchanged."""
    from conj_lite.jsonio import JudgmentFile, read_jsonl, write_jsonl

    text = json.loads('{"rationale": "smile \\ud83d", "better_answer": 1}')["rationale"]
    row = {"id": "p1", "text": text}
    log = JudgmentFile(tmp_path / "judgments.jsonl")
    log.append([row])
    assert log.load() == [row]
    write_jsonl(tmp_path / "pairs.jsonl", [row])
    assert read_jsonl(tmp_path / "pairs.jsonl") == [row]
    (tmp_path / "pairs.jsonl").read_text("utf-8")  # valid UTF-8


def test_a_verdict_only_judge_has_its_own_frame():
    from dataclasses import replace

    from conj_lite.judging.verdicts import split_canonical_judgment

    only = replace(EN, rationale=False)
    assert verdict_prefix(only, "ignored") == '{"better_answer": '
    assert judgment_grammar(only) == 'root ::= "{\\"better_answer\\": " [12] "}"\n'
    assert split_canonical_judgment(only, '{"better_answer": 2}') == (None, 2, '{"better_answer": ')
    assert split_canonical_judgment(only, '{"rationale": "x", "better_answer": 2}')[1] is None
    assert "rationale" not in only.to_dict() or only.to_dict()["rationale"] is False
    assert "rationale" not in EN.to_dict()  # the default is not written: older records stay equal


def test_eos_list_and_cut():
    """Turn ends other than tokenizer.eos_token (Llama-3 <|eot_id|>, Phi-3 <|end|>, Gemma
    <end_of_turn>) stop a judgment; a pad token equal to an EOS is cut there, not dropped
    from the middle of the text."""
    from types import SimpleNamespace

    from conj_lite.sampling import cut_at_eos, eos_token_ids

    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[128001, 128009]))
    tok = SimpleNamespace(eos_token_id=128001)
    assert eos_token_ids(model, tok) == [128001, 128009]
    assert eos_token_ids(SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=7)), SimpleNamespace(eos_token_id=2)) == [7, 2]
    assert cut_at_eos([5, 6, 128009, 9, 128001], [128001, 128009]) == ([5, 6], "stop")
    assert cut_at_eos([5, 6, 9], [2]) == ([5, 6, 9], "length")


def test_top_k_is_ours_not_the_model_generation_config(tiny):
    """top_k 0 means no top-k, even when the model's generation config sets one (Qwen2.5:
    20): transformers 5 reads top_k=None as 'use the model's'."""
    from conj_lite.sampling import generate

    model, tok = tiny
    saved = model.generation_config.top_k
    model.generation_config.top_k = 1  # would make every sample the greedy one
    try:
        cfg = SamplingConfig(temperature=3.0, top_p=1.0, top_k=0, repetition_penalty=1.0, max_new_tokens=12)
        out = generate(model, tok, [_prompt(tok, "What is 7 + 5?", "12", "13")], 6, cfg, seeds=list(range(6)))[0]
    finally:
        model.generation_config.top_k = saved
    assert len({text for text, _, _ in out}) > 1
