"""The judgment frame: one grammar for both backends, held sampling, per-judgment seeds."""

import json

import pytest

from conj_lite.config import SamplingConfig
from conj_lite.frame import closing_grammar, judgment_grammar, judgment_lark, sample_seed, verdict_prefix
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
                                llguidance.grammar_from("gbnf" if "::=" in grammar else "lark", grammar))


def _accepts(tokenizer, grammar, text) -> bool:
    m = _matcher(tokenizer, grammar)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    return m.try_consume_tokens(ids) == len(ids) and m.is_accepting()


@pytest.mark.parametrize("grammar", [judgment_grammar, judgment_lark], ids=["gbnf", "lark"])
def test_grammar_accepts_judgments_and_refuses_lone_surrogates(tiny_model_dir, grammar):
    """The GBNF (the GGUF judge) and the Lark form (sampling) hold the same language."""
    from conj_lite.models import load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    g = grammar(EN)
    assert _accepts(tok, g, '{"rationale": "Both are fine, answer 1 is exact.", "better_answer": 1}')
    assert _accepts(tok, g, '{"rationale": "caf\\u00e9 \\"quoted\\" \\\\ \\n", "better_answer": 2}')
    # A lone surrogate escape is valid JSON text but no UTF-8 file can hold it.
    assert not _accepts(tok, g, '{"rationale": "x \\ud83d y", "better_answer": 2}')
    assert not _accepts(tok, g, '{"rationale": "a "quote" inside", "better_answer": 2}')
    assert not _accepts(tok, g, '{"rationale": "ok", "better_answer": 3}')
    assert not _accepts(tok, grammar(EN, 1), '{"rationale": "ok", "better_answer": 2}')
    assert _accepts(tok, grammar(EN, 2), '{"rationale": "ok", "better_answer": 2}')
    zh = load_template("zh")
    assert _accepts(tok, grammar(zh), judge_verdict_json(zh, "答案一更好。", 1))


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


# ---------------------------------------------------------------- the batched draw


def _chi_square_limit(df: int, z: float = 3.72) -> float:
    """The chi-square value a fit exceeds with probability ~1e-4 (Wilson-Hilferty)."""
    return df * (1 - 2 / (9 * df) + z * (2 / (9 * df)) ** 0.5) ** 3


def _nucleus(logits, temperature, top_p):
    """The distribution draw_tokens samples, computed the plain way (one row, a full sort)."""
    import torch

    probs = torch.softmax(logits.double() / temperature, dim=-1)
    sorted_p, index = torch.sort(probs, descending=True)
    keep = (sorted_p.cumsum(-1) - sorted_p) <= top_p
    out = torch.zeros_like(probs)
    out[index[keep]] = sorted_p[keep]
    return out / out.sum()


@pytest.mark.parametrize("top_p, candidates", [(0.9, 1024), (0.9, (8, 1024)), (0.9, 8), (0.999, 1024), (1.0, 1024)],
                         ids=["topk-nucleus", "second-tier", "full-sort", "nucleus-past-the-candidates", "no-top-p"])
def test_the_batched_draw_samples_the_nucleus_distribution(top_p, candidates):
    """10,000 rows, each with its own uniform, follow the temperature/top-p distribution
    (chi-square test), whether the nucleus is found among the candidates or by sorting."""
    import torch

    from conj_lite.frame import draw_tokens

    g = torch.Generator().manual_seed(0)
    vocab, rows = 2000, 10000
    logits = torch.randn(vocab, generator=g) * 2
    logits[::7] = float("-inf")  # refused by a grammar
    drawn = draw_tokens(logits.expand(rows, -1), torch.rand(rows, generator=g), temperature=0.8, top_p=top_p,
                        candidates=candidates)
    expected = _nucleus(logits, 0.8, top_p) * rows
    size = int((expected > 0).sum())
    assert 20 < size < 1024 if top_p == 0.9 else size > 1024  # within the candidates, or past them
    assert expected[::7].sum() == 0 and not bool(torch.isin(drawn, torch.arange(0, vocab, 7)).any())
    counts = torch.bincount(drawn, minlength=vocab).double()
    assert counts[expected == 0].sum() == 0  # nothing outside the nucleus
    big = expected >= 5
    pooled_e, pooled_c = expected[~big].sum(), counts[~big].sum()  # rare tokens pooled into one bin
    chi2 = float((((counts[big] - expected[big]) ** 2) / expected[big]).sum())
    if pooled_e > 0:
        chi2 += float((pooled_c - pooled_e) ** 2 / pooled_e)
    df = int(big.sum()) + (1 if pooled_e > 0 else 0) - 1
    assert chi2 < _chi_square_limit(df), (chi2, df)


def test_tokens_tied_at_the_edge_of_the_candidates_enter_the_nucleus_by_token_id():
    """Five tokens hold 0.88 of the mass and twelve tie at 0.01 each: the top-0.895 nucleus
    is the five and the two tied tokens of lowest id (20 and 21). torch.topk keeps three of
    the tied tokens, its own choice (22-24 here); taking the nucleus from those candidates
    because they hold more than top_p drew 22 and 23, tokens outside the nucleus."""
    import torch

    from conj_lite.frame import draw_tokens

    probs = torch.zeros(200)
    probs[150:155], probs[20:32] = 0.88 / 5, 0.01
    rows = 4000
    for candidates in (8, (8, 1024), (6, 16)):
        drawn = draw_tokens(probs.log().expand(rows, -1), torch.rand(rows, generator=torch.Generator().manual_seed(0)),
                            temperature=1.0, top_p=0.895, candidates=candidates)
        assert set(drawn.tolist()) == {20, 21, 150, 151, 152, 153, 154}, candidates


def test_a_row_draws_the_same_token_alone_or_in_any_batch():
    """draw_tokens: a row's token depends on its logits and its uniform only (top-k,
    top-p, a neighbour that needs the full sort, greedy)."""
    import torch

    from conj_lite.frame import draw_tokens

    g = torch.Generator().manual_seed(1)
    peaked = torch.randn(6, 5000, generator=g) * 8
    flat = torch.randn(2, 5000, generator=g) * 0.1  # its nucleus is most of the vocabulary
    batch = torch.cat([peaked, flat])
    batch[0, 10:20] = batch[0].max()  # ties, ordered by token id whatever else is in the batch
    u = torch.rand(8, generator=g)
    for options in ({"temperature": 0.9, "top_p": 0.95}, {"temperature": 1.2, "top_k": 40, "top_p": 0.8},
                    {"temperature": 0.7}, {"temperature": 0.0}):
        together = draw_tokens(batch, u, **options)
        alone = torch.cat([draw_tokens(batch[i:i + 1], u[i:i + 1], **options) for i in range(8)])
        reordered = draw_tokens(batch.flip(0), u.flip(0), **options).flip(0)
        assert together.tolist() == alone.tolist() == reordered.tolist(), options


def test_unpack_bitmask_reads_llguidance_bits():
    import numpy as np
    import torch

    from conj_lite.frame import unpack_bitmask

    words = torch.tensor([[1 - 2**31, -1], [0, 1 << 4]], dtype=torch.int32)  # bits 0 and 31; all; bit 36
    allowed = unpack_bitmask(words, 70)  # 64 bits known, 6 tokens past the mask are refused
    reference = np.unpackbits(words.numpy().view(np.uint8), bitorder="little").reshape(2, 64).astype(bool)
    assert allowed[:, :64].numpy().tolist() == reference.tolist()
    assert not allowed[:, 64:].any() and allowed[0, 0] and allowed[0, 31] and allowed[1, 36]
    assert unpack_bitmask(words, 40).shape == (2, 40)


def test_repetition_penalty_is_transformers_own():
    import torch
    from transformers import RepetitionPenaltyLogitsProcessor

    from conj_lite.frame import apply_repetition_penalty

    g = torch.Generator().manual_seed(2)
    scores = torch.randn(3, 50, generator=g)
    seen = torch.tensor([[1, 2, 2, 7], [0, 0, 0, 0], [49, 3, 8, 9]])
    ours = apply_repetition_penalty(scores, seen, 1.3)
    theirs = RepetitionPenaltyLogitsProcessor(1.3)(seen, scores.clone())
    assert torch.equal(ours, theirs)
    assert apply_repetition_penalty(scores, seen, 1.0) is scores


def test_round_trip_problem_says_where_the_text_changed():
    from conj_lite.frame import round_trip_problem

    same = round_trip_problem(["a b", " c"], list, lambda ids: "".join(ids))
    assert same is None
    broken = round_trip_problem(['{"rationale": "x"}'], list, lambda ids: "".join(ids).replace(" ", "Ġ"))
    assert broken == "'{\"rationale\": \"x\"}' reads back as '{\"rationale\":Ġ\"x\"}'"


def test_sampled_verdicts_follow_the_model_verdict_distribution(tiny):
    """At the verdict position of a real prompt, the frame sampler's draws (grammar mask,
    temperature, one uniform per row) follow the model's own probabilities over the
    tokens the grammar allows there (a binomial test over 3,000 seeded rows)."""
    import torch

    from conj_lite.frame import FrameSampler

    model, tok = tiny
    frame = '{"rationale": "Answer 1 adds up.", "better_answer": '
    ids = tok(_prompt(tok, "What is 7 + 5?", "12", "13") + frame, add_special_tokens=False).input_ids
    with torch.inference_mode():
        logits = model(torch.tensor([ids])).logits[0, -1].float()
    head = tok(frame, add_special_tokens=False).input_ids
    grammar, rows, temperature = judgment_grammar(EN), 3000, 1.3
    sampler = FrameSampler(tok, [grammar] * rows, list(range(rows)), temperature=temperature,
                           max_new_tokens=64, eos_ids=[tok.eos_token_id])
    for token in head:  # every row's grammar walked up to the verdict digit
        sampler.advance(range(rows), [token] * rows)
    drawn = sampler.choose(logits.expand(rows, -1), len(head)).tolist()
    m = _matcher(tok, grammar)
    assert m.consume_tokens(head)
    allowed = [t for t in range(logits.shape[0]) if m.validate_tokens([t]) == 1]
    digit = {t: tok.decode([t]).strip()[:1] for t in allowed}
    assert set(digit.values()) == {"1", "2"} and set(drawn) <= set(allowed)
    p = torch.softmax(logits[allowed] / temperature, -1)
    p1 = float(sum(q for t, q in zip(allowed, p.tolist()) if digit[t] == "1"))
    k = sum(digit[t] == "1" for t in drawn)
    assert abs(k - rows * p1) < 4 * (rows * p1 * (1 - p1)) ** 0.5 + 1, (k, rows * p1)
