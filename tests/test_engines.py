"""Sampling engines (conj_lite.engines): what auto picks, the errors, prefix grouping, and
both engines on the real SmolLM2 and the tiny model (frame judgments that parse, hint
verdicts held, verdict rates that agree, a round's LoRA, resume)."""

from __future__ import annotations

import json
import warnings
from collections import Counter
from pathlib import Path

import pytest

from conj_lite.config import SamplingConfig, find_recipe, load_recipe, recipe_from_dict
from conj_lite.engines import (
    LlamaCppEngine,
    TransformersEngine,
    cells_needed,
    choose_engine,
    engine_inputs,
    open_engine,
    open_llama_cpp,
)
from conj_lite.errors import InputError
from conj_lite.prompts import load_template
from conj_lite.sampling import round_trip_texts, row_key, sample_judgments

EN = load_template("en")


def test_the_engine_is_a_checked_recipe_field():
    assert load_recipe().sampling.engine == "auto"
    assert recipe_from_dict({"sampling": {"engine": "llama.cpp"}}).sampling.engine == "llama.cpp"
    with pytest.raises(InputError, match=r"sampling.engine: expected one of \['auto', 'transformers', 'llama.cpp'\]"):
        recipe_from_dict({"sampling": {"engine": "vllm"}})


def test_the_gguf_type_is_a_checked_recipe_field():
    assert load_recipe().sampling.gguf_type == "f32"
    assert recipe_from_dict({"sampling": {"gguf_type": "q8_0"}}).sampling.gguf_type == "q8_0"
    with pytest.raises(InputError, match=r"sampling.gguf_type: expected one of \['f32', 'f16', 'q8_0'\], got 'q4_0'"):
        recipe_from_dict({"sampling": {"gguf_type": "q4_0"}})


def test_llama_cpp_samples_from_the_gguf_type_the_recipe_names(tiny_model_dir, tiny_adapter, sample_pairs, tmp_path):
    """sampling.gguf_type=q8_0: the engine reads a Q8_0 GGUF of the policy and the round's
    adapter as an f32 GGUF LoRA, and says so; the default stays f32."""
    from gguf import GGUFReader

    recipe = load_recipe(find_recipe("tiny-cpu"), ["sampling.n_repeats=2", "sampling.max_new_tokens=16",
                                                   "sampling.gguf_type=q8_0"])
    engine = open_engine("llama.cpp", str(tiny_model_dir), tiny_adapter, recipe)
    try:
        rows = sampled(engine, sample_pairs[:2], recipe.sampling, tmp_path / "q8.jsonl")
        gguf, lora, files = engine.gguf, engine.lora, engine.files
    finally:
        engine.close()
    assert rows and all(r["verdict"] in (1, 2) for r in rows)
    assert files["gguf_from"]["as"] == "q8_0" and files["lora_from"]["as"] == "f32"
    types = Counter(t.tensor_type.name for t in GGUFReader(gguf).tensors)
    assert types["Q8_0"] > 0 and types["F16"] == 0, types
    assert {t.tensor_type.name for t in GGUFReader(lora).tensors} == {"F32"}
    default = load_recipe(find_recipe("tiny-cpu"))
    assert engine_inputs("llama.cpp", str(tiny_model_dir), None, default.sampling.gguf_type)["as"] == "f32"


def test_auto_takes_llama_cpp_on_a_cpu_for_a_model_it_can_have_a_gguf_of(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert choose_engine("auto", str(tmp_path)) == "llama.cpp"  # a local directory: converted once
    assert choose_engine("auto", "HuggingFaceTB/SmolLM2-135M-Instruct") == "transformers"  # a hub id: no GGUF
    assert choose_engine("transformers", str(tmp_path)) == "transformers"
    assert choose_engine("llama.cpp", "org/model") == "llama.cpp"  # by name, whatever the model


def test_a_model_with_no_gguf_names_the_engine_to_use_instead():
    with pytest.raises(InputError) as info:
        open_llama_cpp("org/model", None, load_recipe())
    assert "org/model: sampling.engine=llama.cpp needs a GGUF" in str(info.value)
    assert "sampling.engine=transformers" in str(info.value)


def test_a_missing_llama_cpp_names_the_extra(monkeypatch, tmp_path):
    import conj_lite.engines as engines

    monkeypatch.setattr(engines, "llama_cpp_installed", lambda: False)  # as without the package
    (tmp_path / "config.json").write_text("{}")
    assert choose_engine("auto", str(tmp_path)) == "transformers"
    with pytest.raises(InputError, match=r'pip install "conj-lite\[export\]"'):
        open_llama_cpp(str(tmp_path), None, load_recipe())


def test_the_cache_holds_each_shared_token_once():
    system = [1, 2, 3, 4]
    plain_a, plain_b = system + [10, 11, 12], system + [20, 21, 22]
    groups = [plain_a, plain_a, plain_b]
    # the system prompt once; plain_a's own tokens once but its last (each copy evaluates that one),
    # then 5 new tokens per sequence; plain_b's own 3 tokens and its 5
    assert cells_needed(groups, 5) == 4 + 2 + (1 + 5) * 2 + (3 + 5)


# ---------------------------------------------------------------- the real model


@pytest.fixture(scope="module")
def smollm2():
    import torch

    from conj_lite.packaged import packaged_model_path

    torch.set_num_threads(2)
    return str(packaged_model_path("smollm2-135m"))


@pytest.fixture(scope="module")
def sample_pairs(sample_data):
    from conj_lite.data import load_pairs

    return [p for p in load_pairs(sample_data).pairs if p.label in ("A", "B")]


def sampled(engine, pairs, cfg, path):
    sample_judgments(engine, pairs, EN, cfg, path)
    return [json.loads(line) for line in path.read_text("utf-8").splitlines()]


@pytest.mark.slow
def test_both_engines_write_frame_judgments_that_agree(smollm2, sample_pairs, tmp_path):
    """The same pairs on both engines (the demo's recipe): every judgment parses, the hint
    samples hold the hinted verdict, and the share of plain judgments for answer 1 agrees
    within 0.25 (about 3 standard errors of a difference of two rates over 32 judgments
    each when the rate is near the model's 0.8)."""
    recipe = load_recipe(find_recipe("smollm2-135m_cpu"), ["sampling.n_repeats=4", "sampling.max_new_tokens=24"])
    pairs = sample_pairs[:4]
    rates, rows = {}, {}
    for name in ("transformers", "llama.cpp"):
        engine = open_engine(name, smollm2, None, recipe)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                engine.prepare(EN, recipe.prompts.date_string, round_trip_texts(EN, pairs))
                rows[name] = sampled(engine, pairs, recipe.sampling, tmp_path / f"{name}.jsonl")
        finally:
            engine.close()
        # llguidance reads llama.cpp's vocabulary through a deprecated call, a warning per token
        assert not [w for w in caught if "deprecated" in str(w.message)], caught[:3]
        assert len(rows[name]) == 4 * 2 * (4 + 2)
        assert all(json.loads(r["text"])["better_answer"] == r["verdict"] for r in rows[name])
        assert all(r["verdict"] == r["hint_slot"] for r in rows[name] if r["kind"] != "repeat")
        repeats = [r["verdict"] for r in rows[name] if r["kind"] == "repeat"]
        rates[name] = repeats.count(1) / len(repeats)
    assert set(rows["transformers"][0]) == set(rows["llama.cpp"][0])  # the same row fields
    assert abs(rates["transformers"] - rates["llama.cpp"]) <= 0.25, rates


@pytest.mark.slow
def test_both_engines_render_the_same_prompts(smollm2, sample_pairs):
    from conj_lite.prompts import build_messages, hint_prefix

    recipe = load_recipe(find_recipe("smollm2-135m_cpu"))
    hf, gguf = (open_engine(name, smollm2, None, recipe) for name in ("transformers", "llama.cpp"))
    try:
        for engine in (hf, gguf):
            engine.prepare(EN, recipe.prompts.date_string, round_trip_texts(EN, sample_pairs[:2]))
        pair = sample_pairs[0]
        messages = build_messages(EN, pair.question, pair.answer_a, pair.answer_b)
        for prefix in ("", hint_prefix(EN, 2)):
            text = hf.render(messages, prefix)
            assert gguf.render(messages, prefix) == text
            assert gguf.tokenize(text) == hf.tokenizer(text, add_special_tokens=False).input_ids
    finally:
        hf.close()
        gguf.close()


def broken_decoder_tokenizer(model_dir):
    """SmolLM2's tokenizer with the decoder transformers' GGUF conversion gave it (5.17):
    sentencepiece-style, so its byte-level tokens decode as written ('Ġ' for a space)."""
    from tokenizers import decoders

    from conj_lite.models import load_tokenizer

    tok = load_tokenizer(model_dir)
    tok.backend_tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                                       decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    return tok


@pytest.mark.slow
def test_a_tokenizer_that_does_not_read_its_tokens_back_is_refused_before_sampling(smollm2, sample_pairs):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2).eval()
    engine = TransformersEngine(model, broken_decoder_tokenizer(smollm2), source=smollm2)
    with pytest.raises(InputError) as info:
        engine.prepare(EN, "26 Jul 2024", round_trip_texts(EN, sample_pairs[:2]))
    assert str(info.value).startswith(f"{smollm2}: the tokenizer does not read its own tokens back")
    assert "reads back as" in str(info.value) and "Ġ" in str(info.value)
    from conj_lite.models import load_tokenizer

    fine = TransformersEngine(model, load_tokenizer(smollm2), source=smollm2)
    fine.prepare(EN, "26 Jul 2024", round_trip_texts(EN, sample_pairs[:2]))  # the shipped directory passes


@pytest.mark.slow
def test_a_grammar_error_while_sampling_stops_the_stage(smollm2, sample_pairs, tmp_path):
    """Without the check, the broken tokenizer made every judgment stop at `{"rationale"::`
    with a warning and the run went on to write unknown verdicts; now the stage stops."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2).eval()
    engine = TransformersEngine(model, broken_decoder_tokenizer(smollm2), source=smollm2)
    cfg = SamplingConfig(n_repeats=1, hint_samples=1, max_new_tokens=16, repetition_penalty=1.0, temperature=0.8)
    out = tmp_path / "judgments.jsonl"
    with pytest.raises(InputError, match=f"{smollm2}: sampling stopped: the judgment grammar refused token"):
        sample_judgments(engine, sample_pairs[:1], EN, cfg, out)
    assert not out.exists() or out.read_text() == ""  # no judgment without a verdict was written


# ---------------------------------------------------------------- the tiny model: LoRA, resume


@pytest.fixture(scope="module")
def tiny_adapter(tiny_model_dir, tmp_path_factory):
    """A LoRA adapter on the tiny model with random (non-zero) weights, as a round leaves one."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    lora = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                                            init_lora_weights=False))
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.mul_(20.0)  # a change the judgments show
    path = tmp_path_factory.mktemp("adapter") / "adapter"
    lora.save_pretrained(path)
    return path


@pytest.mark.slow
def test_llama_cpp_samples_from_the_base_plus_the_round_lora(tiny_model_dir, tiny_adapter, sample_pairs, tmp_path):
    recipe = load_recipe(find_recipe("tiny-cpu"), ["sampling.n_repeats=2", "sampling.max_new_tokens=16"])
    pairs = sample_pairs[:3]
    texts = {}
    for name, adapter in (("base", None), ("lora", tiny_adapter)):
        engine = open_engine("llama.cpp", str(tiny_model_dir), adapter, recipe)
        try:
            assert isinstance(engine, LlamaCppEngine)
            policy = engine.policy()
            assert (policy["lora"] is None) == (adapter is None) and policy["gguf"]["kind"] == "file"
            rows = sampled(engine, pairs, recipe.sampling, tmp_path / f"{name}.jsonl")
        finally:
            engine.close()
        assert all(r["verdict"] in (1, 2) for r in rows)
        texts[name] = {row_key(r): r["text"] for r in rows}
    assert texts["base"].keys() == texts["lora"].keys()
    changed = sum(texts["base"][k] != texts["lora"][k] for k in texts["base"])
    assert changed >= len(texts["base"]) // 2, changed  # the adapter is applied


@pytest.mark.slow
def test_llama_cpp_sampling_resumes_to_the_same_judgments(tiny_model_dir, sample_pairs, tmp_path):
    """Killed after some batches (the file cut), a resumed run completes every key once
    and writes the texts an uninterrupted run wrote: each judgment is seeded by its key."""
    recipe = load_recipe(find_recipe("tiny-cpu"), ["sampling.n_repeats=2", "sampling.max_new_tokens=16",
                                      "sampling.batch_size=8"])
    pairs = sample_pairs[:4]
    engine = open_engine("llama.cpp", str(tiny_model_dir), None, recipe)
    try:
        full = sampled(engine, pairs, recipe.sampling, tmp_path / "full.jsonl")
        cut = tmp_path / "cut.jsonl"
        cut.write_text("".join(json.dumps(r) + "\n" for r in full[:9]), "utf-8")  # in the middle of a batch's example
        resumed = sampled(engine, pairs, recipe.sampling, cut)
    finally:
        engine.close()
    assert Counter(row_key(r) for r in resumed) == Counter(row_key(r) for r in full)
    assert resumed[:9] == full[:9]
    assert {row_key(r): r["text"] for r in resumed} == {row_key(r): r["text"] for r in full}


_POLICY_GGUF = """
import sys
from conj_lite.config import find_recipe, load_recipe
from conj_lite.engines import policy_gguf
gguf, lora, _ = policy_gguf(sys.argv[1], None, load_recipe(find_recipe("tiny-cpu")))
print(gguf)
"""


@pytest.mark.slow
def test_processes_that_convert_the_same_model_at_once_build_one_gguf(tiny_model_dir, tmp_path):
    """The GPU check's training workers start side by side and each wants the policy's
    GGUF (training.ref_engine=llama.cpp): one converts, the others wait and read it (the
    CI failure of 2026-12-07: one worker's conversion read a file another had removed)."""
    import os
    import subprocess
    import sys

    from conj_lite.export import converter_cache_dir, find_converter

    converter = find_converter()  # cached once per machine; the empty cache below links to it
    cache = tmp_path / "cache"  # nothing converted in it yet
    linked = cache / "llama.cpp" / converter_cache_dir(converter.version).name
    linked.parent.mkdir(parents=True)
    linked.symlink_to(converter.root)
    env = {**os.environ, "CONJ_LITE_CACHE": str(cache)}
    procs = [subprocess.Popen([sys.executable, "-c", _POLICY_GGUF, str(tiny_model_dir)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in range(3)]
    results = [(p.wait(timeout=600), p.stdout.read(), p.stderr.read()) for p in procs]
    for code, _, err in results:
        assert code == 0, err[-3000:]
    paths = {out.strip().splitlines()[-1] for _, out, _ in results}
    assert len(paths) == 1
    gguf = Path(paths.pop())
    assert gguf.is_file() and gguf.read_bytes()[:4] == b"GGUF"
    assert not [p.name for p in gguf.parent.glob(gguf.name + ".*") if not p.name.endswith((".lock", ".log"))]
