"""Grammar-held greedy decoding checked the cheap way round (GreedyGrammar): the best
token is asked about alone, the whole vocabulary only when the grammar refuses it. It
must pick exactly what llama.cpp's grammar-first greedy chain picks."""

from __future__ import annotations

import pytest

from conj_lite.data import load_pairs
from conj_lite.judging import Judge
from conj_lite.judging.backends import GreedyGrammar
from conj_lite.judging.verdicts import judgment_grammar
from conj_lite.prompts import ordered_answers


def grammar_first(judge, ids, n):
    """Reference: llama-cpp-python's own generate with the grammar in its sampler chain."""
    from llama_cpp.llama_grammar import LlamaGrammar

    grammar = LlamaGrammar.from_string(judgment_grammar(judge.template), verbose=False)
    out = []
    for token in judge.backend.llm.generate(ids, temp=0.0, top_k=1, grammar=grammar, reset=True):
        if judge.backend._llama_cpp.llama_vocab_is_eog(judge.backend.vocab, token) or len(out) >= n:
            break
        out.append(token)
    return out


def checked_lazily(judge, ids, n):
    backend = judge.backend
    held = GreedyGrammar(backend._llama_cpp, backend.vocab, judgment_grammar(judge.template), backend.llm.n_vocab())
    out = []
    try:
        ptr = backend._evaluate(ids)
        while len(out) < n:
            token = held.pick(ptr)
            if backend._llama_cpp.llama_vocab_is_eog(backend.vocab, token):
                break
            out.append(token)
            backend.llm.eval([token])
            ptr = backend._llama_cpp.llama_get_logits_ith(backend.llm.ctx, -1)
        return out, held.steps, held.full_checks
    finally:
        held.close()


def prompts(judge, pairs):
    return [judge.backend.tokenize(judge.prompt(p.question, *ordered_answers(p.answer_a, p.answer_b, order)))
            for p in pairs for order in ("ab", "ba")]


@pytest.fixture(scope="module")
def tiny_gguf(tiny_model_dir, tmp_path_factory):
    from test_export import export_tiny

    return export_tiny(tiny_model_dir, tmp_path_factory.getbasetemp() / "tiny-export").gguf_paths["q8_0"]


def test_lazy_check_picks_the_grammar_first_tokens_on_a_model_that_fights_the_grammar(tiny_gguf, sample_data):
    # The random-init model rarely wants a token the grammar allows: the whole-vocabulary path.
    pairs = load_pairs(sample_data).pairs[:2]
    with Judge.from_gguf(tiny_gguf, n_threads=2, warn=None) as judge:
        total_steps = total_full = 0
        for ids in prompts(judge, pairs):
            lazy, steps, full = checked_lazily(judge, ids, 40)
            assert lazy == grammar_first(judge, ids, 40)
            total_steps, total_full = total_steps + steps, total_full + full
        assert total_full > 0, "the refused-token path was exercised"


@pytest.mark.slow
def test_lazy_check_on_the_real_model_rarely_needs_the_whole_vocabulary(sample_data):
    from conj_lite.packaged import BASE_GGUF, packaged_model_path

    gguf = packaged_model_path("smollm2-135m") / BASE_GGUF
    pairs = load_pairs(sample_data).pairs[:2]
    with Judge.from_gguf(gguf, template="en", n_threads=2, warn=None) as judge:
        total_steps = total_full = 0
        for ids in prompts(judge, pairs):
            lazy, steps, full = checked_lazily(judge, ids, 48)
            assert lazy == grammar_first(judge, ids, 48)
            total_steps, total_full = total_steps + steps, total_full + full
        # An instruct model writing inside the frame mostly wants allowed tokens.
        assert total_full < total_steps / 2, (total_full, total_steps)
