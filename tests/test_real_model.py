"""The real model end to end: SmolLM2-135M-Instruct from the package registry.

Slow (a few minutes on 2 cores): the HF directory build, sampling that parses, two
training steps, export to GGUF, and a llama-cpp-python judgment on the result."""

import json

import pytest

from conj_lite.packaged import BASE_GGUF

pytestmark = pytest.mark.slow


def test_the_built_directory_is_an_ordinary_hf_model(smollm2_dir):
    from tokenizers import decoders
    from transformers import AutoConfig

    from conj_lite.models import load_tokenizer

    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert (smollm2_dir / BASE_GGUF).is_file()
    tok = load_tokenizer(str(smollm2_dir))
    # The GGUF's own special tokens, not transformers' guess (which made <|im_start|> the EOS).
    assert tok.eos_token == "<|im_end|>" and AutoConfig.from_pretrained(smollm2_dir).eos_token_id == tok.eos_token_id
    assert isinstance(tok.backend_tokenizer.decoder, decoders.ByteLevel)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")


def test_whole_loop_on_the_real_model(smollm2_dir, sample_data, tmp_path):
    from conj_lite.judging import Judge
    from conj_lite.pipeline import ConjRun

    run = ConjRun.from_recipe("smollm2-135m_cpu", tmp_path / "run", [
        f"data.path={sample_data}", "data.limit=4", "data.heldout=0", "sampling.n_repeats=1",
        "sampling.max_new_tokens=32", "sampling.batch_size=16", "training.max_steps=2", "training.save_steps=2",
        "export.quant_types=[q8_0]",
    ])
    run.sample()
    rows = [json.loads(line) for line in (run.out_dir / "judgments.jsonl").read_text().splitlines()]
    assert rows and all(r["verdict"] in (1, 2) for r in rows), "held sampling: every judgment has a verdict"
    assert all(r["verdict"] == r["hint_slot"] for r in rows if r["kind"] != "repeat")
    run.filter()
    pairs = [json.loads(line) for line in (run.out_dir / "pairs.jsonl").read_text().splitlines()]
    hint_pairs = [p for p in pairs if p["kind"] == "hint"]
    assert hint_pairs, "each (true hint, reversed hint) couple is one positive and one negative"
    for p in pairs:  # the prompt is the plain judge prompt, the targets are whole frames
        assert "Hint" not in json.dumps(p["prompt"])
        for side in ("chosen", "rejected"):
            text = p[side][0]["content"] if isinstance(p[side], list) else p[side]
            assert json.loads(text)["better_answer"] in (1, 2)
    run.train()
    meta = json.loads((run.out_dir / "adapter" / "conj_lite_train.json").read_text())
    assert meta["summary"]["steps"] == 2
    result = run.export()
    gguf = result.gguf_paths["q8_0"]
    from conj_lite.artifacts import read_gguf_metadata

    meta = read_gguf_metadata(gguf)
    assert "<|im_start|>" in meta.get("tokenizer.chat_template", "")
    with Judge.from_gguf(gguf, n_ctx=1024, max_new_tokens=48) as judge:
        verdict = judge.compare("What is 7 + 5?", "12", "13")
    assert verdict.verdict in ("A", "B", "inconsistent") and 0.0 <= verdict.p_a <= 1.0
    assert json.loads(verdict.orders["ab"].text)["better_answer"] in (1, 2)


def test_answers_cannot_write_smollm2s_own_special_tokens_on_either_backend(smollm2_dir):
    """SmolLM2's tokenizer has 14 special tokens besides ChatML (<file_sep>, <repo_name>,
    <jupyter_code>, ...). Text of them inside an answer stays text on both backends:
    the guarded set comes from each tokenizer's own special tokens."""
    from conj_lite.judging import Judge
    from conj_lite.judging.backends import GGUFBackend
    from conj_lite.models import load_tokenizer
    from conj_lite.prompts import build_messages, load_template, render_prompt

    template = load_template("en")
    tok = load_tokenizer(str(smollm2_dir))
    specials = sorted({t.content for t in tok.added_tokens_decoder.values() if t.special})
    assert len(specials) == 17 and "<file_sep>" in specials and "<jupyter_code>" in specials
    hostile = "See " + " and ".join(specials) + "."
    special_ids = {tok.convert_tokens_to_ids(t) for t in specials}

    def count(ids):
        return sorted(i for i in ids if i in special_ids)

    # transformers (the hf backend, sampling and training render through render_prompt)
    plain = tok(render_prompt(tok, build_messages(template, "Q?", "One.", "Two.")), add_special_tokens=False).input_ids
    text = render_prompt(tok, build_messages(template, "Q?", hostile, "Two."))
    assert count(tok(text, add_special_tokens=False).input_ids) == count(plain)
    assert "file_sep" in text and "jupyter_code" in text  # still there to read
    # llama.cpp (tokenize with special=True)
    backend = GGUFBackend(smollm2_dir / BASE_GGUF, n_ctx=2048, n_threads=2)
    try:
        judge = Judge(backend, template)
        plain_ids = backend.tokenize(judge.prompt("Q?", "One.", "Two."))
        hostile_ids = backend.tokenize(judge.prompt("Q?", hostile, "Two."))
        assert count(hostile_ids) == count(plain_ids) and len(count(plain_ids)) >= 4  # ChatML turns only
    finally:
        backend.close()


def test_the_hf_tokenizer_and_llama_cpp_tokenize_the_same(smollm2_dir, repo_root):
    """Training tokenizes with the HF directory's tokenizer, the llama.cpp reference,
    judge and sampling engine with the GGUF's: they must agree. SmolLM2 splits digits
    apart before its byte-level regex; without that split the HF tokenizer read "\\n\\n"
    before a digit as two tokens (7 of the relevance data's 1,322 texts differed)."""
    import gzip

    from llama_cpp import Llama

    from conj_lite.models import load_tokenizer

    tok = load_tokenizer(str(smollm2_dir))
    llm = Llama(str(smollm2_dir / BASE_GGUF), vocab_only=True, verbose=False)
    texts = ["of them:\n\n1. Go", "two ways: \n\n12 steps", "at Fox News\n\n2", "x\n\n\n3.5 and 2024", "a 1b2c 33"]
    with gzip.open(repo_root / "data" / "hh_harmless_single_turn.jsonl.gz", "rt") as f:
        for line in f:
            texts += [v for v in json.loads(line).values() if isinstance(v, str)]
    differ = [t for t in texts if tok(t, add_special_tokens=False).input_ids
              != llm.tokenize(t.encode(), add_bos=False, special=True)]
    assert len(texts) > 1300 and differ == []
