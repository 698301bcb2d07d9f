"""conj_lite.export: merge -> llama.cpp converter -> llama_model_quantize, on the tiny model.

No test downloads anything when llama.cpp's converter is already cached
(~/.cache/conj-lite/llama.cpp/...) or $CONJ_LITE_LLAMA_SDIST names the llama-cpp-python
sdist. On a fresh machine (CI) `find_converter` falls back to `pip download` of the sdist
once, into that cache, exactly as `conj-lite export` does for users."""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
from pathlib import Path

import pytest

from conj_lite import export
from conj_lite.errors import InputError
from conj_lite.export import (
    MERGE_META,
    classify_tensors,
    describe_source,
    export_gguf,
    find_converter,
    installed_llama_cpp_version,
    parse_quant_types,
    system_default_template,
)
from conj_lite.prompts import load_template

# Recorded by make_adapter as training records recipe.prompts.date_string: not the default,
# so a judge that rendered with the default date would be seen.
TRAIN_CHAT_DATE = "1 Jan 2030"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
QUANTS = ("q8_0", "q4_k_m")


def make_adapter(base: Path, out: Path) -> Path:
    """A LoRA adapter on `base` whose weights are not zero (so merging changes the
    model), saved like conj_lite.training saves one. Skipped when already there."""
    if (out / "adapter_config.json").is_file():
        return out
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGETS, init_lora_weights=False)
    staging = out.with_name(out.name + ".partial")
    get_peft_model(model, config).save_pretrained(staging)
    AutoTokenizer.from_pretrained(base).save_pretrained(staging)
    meta = {"base_model": str(base), "load_in_4bit": False, "template": "en", "chat_date": TRAIN_CHAT_DATE}
    (staging / "conj_lite_train.json").write_text(json.dumps(meta))
    staging.rename(out)
    return out


def export_tiny(base: Path, run_dir: Path):
    """adapter -> merged/ + gguf/judge-{f16,q8_0,q4_k_m}.gguf (resumable, shared by test files)."""
    make_adapter(base, run_dir / "adapter")
    return export_gguf(run_dir / "adapter", run_dir, quant_types=QUANTS, ollama_modelfile=True, threads=2)


@pytest.fixture(scope="session")
def exported(tiny_model_dir, tmp_path_factory):
    return export_tiny(tiny_model_dir, tmp_path_factory.getbasetemp() / "tiny-export")


def gguf_fields(path: Path) -> dict:
    import gguf

    reader = gguf.GGUFReader(str(path), "r")
    out = {}
    for key, field in reader.fields.items():
        if key.rsplit(".", 1)[-1] in ("tokens", "scores", "token_type", "merges"):
            continue
        out[key] = field.contents()
    out["_tensor_types"] = {t.name: t.tensor_type.name for t in reader.tensors}
    return out


# ---------------------------------------------------------------- pure parts


def test_parse_quant_types_normalises_and_rejects_unknown():
    assert parse_quant_types("q8_0, Q4_K_M,q8_0") == ("q8_0", "q4_k_m")
    assert parse_quant_types(["q6_k"]) == ("q6_k",)
    assert parse_quant_types("none") == ()
    assert parse_quant_types(None) == ()
    with pytest.raises(InputError, match="unknown quantization type 'q4_k_x'.*q4_k_m"):
        parse_quant_types("q8_0,q4_k_x")


def test_every_quant_type_exists_in_llama_cpp():
    llama_cpp = pytest.importorskip("llama_cpp")
    for name, (constant, _) in export.QUANT_TYPES.items():
        assert hasattr(llama_cpp, constant), name


def test_classify_tensors_reports_only_real_fallbacks():
    tensors = [
        ("token_embd.weight", [256, 1618], "Q4_K"),
        ("blk.0.attn_v.weight", [256, 128], "Q6_K"),  # the _M mix: by design, rows fit
        ("blk.0.ffn_down.weight", [320, 256], "Q5_0"),  # 320 % 256 != 0: a fallback
        ("blk.0.attn_norm.weight", [320], "F32"),  # 1-D: never quantized
    ]
    report = classify_tensors(tensors, "Q4_K", 256)
    assert report.types == {"Q4_K": 1, "Q6_K": 1, "Q5_0": 1, "F32": 1}
    assert report.fallbacks == [
        {"tensor": "blk.0.ffn_down.weight", "shape": [320, 256], "type": "Q5_0", "wanted": "Q4_K"}
    ]


def test_system_default_template_only_fills_a_missing_system_message():
    import jinja2.sandbox

    chatml = (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    system = 'You are a "fair" judge\\ of answers.\nBe brief.'
    patched = system_default_template(chatml, system)
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def render(template, messages):
        return env.from_string(template).render(messages=messages, add_generation_prompt=True)

    with_system = [{"role": "system", "content": "custom"}, {"role": "user", "content": "hi"}]
    assert render(patched, with_system) == render(chatml, with_system)
    user_only = [{"role": "user", "content": "hi"}]
    assert render(patched, user_only) == render(chatml, [{"role": "system", "content": system}] + user_only)
    assert system_default_template(patched, system) == patched  # idempotent
    assert system_default_template(chatml, None) == chatml


# ---------------------------------------------------------------- converter sources


def fake_sdist(path: Path, version: str, extra: dict | None = None) -> Path:
    """A tiny stand-in for the llama-cpp-python sdist with the converter's layout."""
    top = f"llama_cpp_python-{version}"
    files = {
        f"{top}/llama_cpp/__init__.py": f'__version__ = "{version}"\n',
        f"{top}/vendor/llama.cpp/convert_hf_to_gguf.py": "from conversion import ModelBase\n",
        f"{top}/vendor/llama.cpp/conversion/__init__.py": "",
        f"{top}/vendor/llama.cpp/gguf-py/gguf/__init__.py": "",
        f"{top}/vendor/llama.cpp/ggml/src/huge.c": "int main(void) { return 0; }\n",
        f"{top}/vendor/llama.cpp/models/templates/chatml.jinja": "{{ x }}",
        **(extra or {}),
    }
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_converter_from_sdist_extracts_only_the_converter(tmp_path, monkeypatch):
    monkeypatch.setenv("CONJ_LITE_CACHE", str(tmp_path / "cache"))
    version = installed_llama_cpp_version()
    sdist = fake_sdist(tmp_path / f"llama_cpp_python-{version}.tar.gz", version,
                       {f"llama_cpp_python-{version}/vendor/llama.cpp/../../evil.py": "boom"})
    converter = find_converter(sdist=sdist, download=False)
    assert converter.version == version
    files = sorted(str(p.relative_to(converter.root)) for p in converter.root.rglob("*") if p.is_file())
    assert files == [
        "conj_lite_converter.json",
        "conversion/__init__.py",
        "convert_hf_to_gguf.py",
        "gguf-py/gguf/__init__.py",
        "models/templates/chatml.jinja",
    ]
    assert not (tmp_path / "evil.py").exists()
    # The second call uses the cache, even without the sdist.
    assert find_converter(download=False).root == converter.root


def test_sdist_of_another_version_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("CONJ_LITE_CACHE", str(tmp_path / "cache"))
    sdist = fake_sdist(tmp_path / "llama_cpp_python-0.0.1.tar.gz", "0.0.1")
    with pytest.raises(InputError, match=r"0\.0\.1 but .* is installed.*match the runtime"):
        find_converter(sdist=sdist, download=False)


def test_no_converter_and_no_download_says_how_to_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("CONJ_LITE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("CONJ_LITE_LLAMA_SDIST", raising=False)
    with pytest.raises(InputError, match="CONJ_LITE_LLAMA_SDIST"):
        find_converter(download=False)


def test_failed_pip_download_names_the_fixes(tmp_path, monkeypatch):
    monkeypatch.setenv("CONJ_LITE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("CONJ_LITE_LLAMA_SDIST", raising=False)

    def offline(cmd, **kwargs):
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-binary" in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version that satisfies the requirement")

    monkeypatch.setattr(export.subprocess, "run", offline)
    with pytest.raises(InputError) as info:
        find_converter()
    message = str(info.value)
    assert "pip download failed" in message and "Could not find a version" in message
    assert "CONJ_LITE_LLAMA_SDIST" in message and "--llama-cpp" in message


def test_llama_cpp_dir_must_hold_the_converter(tmp_path):
    with pytest.raises(InputError, match="no convert_hf_to_gguf.py"):
        find_converter(tmp_path)
    (tmp_path / "convert_hf_to_gguf.py").write_text("from conversion import X\n")
    (tmp_path / "gguf-py" / "gguf").mkdir(parents=True)
    (tmp_path / "gguf-py" / "gguf" / "__init__.py").write_text("")
    with pytest.raises(InputError, match="conversion/ package"):
        find_converter(tmp_path)
    (tmp_path / "conversion").mkdir()
    (tmp_path / "conversion" / "__init__.py").write_text("")
    assert find_converter(tmp_path).version is None  # a checkout: version unknown, a note is printed


def test_describe_source_rejects_what_is_not_a_model(tmp_path):
    with pytest.raises(InputError, match="no such adapter or model directory"):
        describe_source(tmp_path / "missing")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(InputError, match="expected a directory"):
        describe_source(tmp_path / "file.txt")
    with pytest.raises(InputError, match="not a model directory"):
        describe_source(tmp_path)


def test_failed_conversion_leaves_no_file_that_looks_complete(tmp_path):
    root = tmp_path / "llama.cpp"
    (root / "gguf-py" / "gguf").mkdir(parents=True)
    (root / "gguf-py" / "gguf" / "__init__.py").write_text("")
    # A converter that writes half a file and dies, as an out-of-memory kill would.
    (root / "convert_hf_to_gguf.py").write_text(
        "import sys\nout = sys.argv[sys.argv.index('--outfile') + 1]\n"
        "open(out, 'wb').write(b'GGUF half')\nprint('unsupported architecture Foo')\nsys.exit(1)\n"
    )
    converter = export.Converter(root, None, "test")
    target = tmp_path / "gguf" / "judge-f16.gguf"
    target.parent.mkdir()
    with pytest.raises(InputError, match=r"converter.*failed \(exit code 1\)[\s\S]*unsupported architecture Foo"):
        export.convert_to_gguf(tmp_path, target, converter, template=load_template("en"))
    assert sorted(p.name for p in target.parent.iterdir()) == ["convert.log"]


# ---------------------------------------------------------------- end to end on the tiny model


@pytest.mark.slow
def test_export_writes_merged_model_and_gguf_files(exported):
    merged = exported.merged_dir
    for name in ("model.safetensors", "tokenizer.json", "tokenizer.model", "chat_template.jinja", MERGE_META):
        assert (merged / name).is_file(), name
    assert [f.type for f in exported.files] == ["f16", *QUANTS]
    for f in exported.files:
        assert f.path.is_file() and f.path.stat().st_size == f.size > 0
        assert f.path.name == f"judge-{f.type}.gguf"
    gguf_dir = merged.parent / "gguf"
    assert not list(gguf_dir.glob("*.partial")) and not list(merged.parent.glob("*.partial"))
    sizes = {f.type: f.size for f in exported.files}
    assert sizes["f16"] > sizes["q8_0"] > sizes["q4_k_m"]


@pytest.mark.slow
def test_gguf_carries_chat_template_special_tokens_and_judge_template(exported, tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    template = load_template("en")
    for f in exported.files:
        fields = gguf_fields(f.path)
        assert fields["tokenizer.chat_template"].startswith("{# conj-lite: default judge system prompt #}")
        assert "<|im_start|>" in fields["tokenizer.chat_template"]
        assert fields["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
        assert fields["tokenizer.ggml.bos_token_id"] == tokenizer.bos_token_id
        assert fields["tokenizer.ggml.add_bos_token"] is False  # like the HF tokenizer
        assert json.loads(fields["conj_lite.judge_template"]) == template.to_dict()
        assert fields["conj_lite.chat_date"] == TRAIN_CHAT_DATE  # the date training gave the chat template
        assert fields["general.name"] == "judge"
    q4 = gguf_fields(exported.gguf_paths["q4_k_m"])["_tensor_types"]
    assert q4["blk.0.attn_q.weight"] == "Q4_K" and q4["blk.0.attn_norm.weight"] == "F32"
    q8 = exported.files[1]
    assert q8.tensor_types.get("Q8_0", 0) >= 14 and q8.fallbacks == []


@pytest.mark.slow
def test_judges_render_with_the_date_training_recorded(exported):
    """A recipe's prompts.date_string reaches the judge on both backends: through the
    adapter's conj_lite_train.json (transformers) and the GGUF's conj_lite.chat_date."""
    from conj_lite.judging import Judge
    from conj_lite.prompts import chat_format

    assert json.loads((exported.merged_dir / MERGE_META).read_text())["chat_date"] == TRAIN_CHAT_DATE
    with Judge.from_gguf(exported.gguf_paths["q8_0"], n_threads=2, warn=None) as judge:
        assert chat_format(judge.backend.chat_template).date_string == TRAIN_CHAT_DATE
    with Judge.from_hf(exported.merged_dir.parent / "adapter", n_threads=2, warn=None) as judge:
        assert chat_format(judge.backend.tokenizer).date_string == TRAIN_CHAT_DATE
    with Judge.from_hf(exported.merged_dir, n_threads=2, warn=None) as judge:  # the merged model records it too
        assert chat_format(judge.backend.tokenizer).date_string == TRAIN_CHAT_DATE


@pytest.mark.slow
def test_merge_applies_the_adapter(exported, tiny_model_dir):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_dir = exported.merged_dir.parent
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    merged = AutoModelForCausalLM.from_pretrained(exported.merged_dir, dtype=torch.float32)
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(run_dir / "adapter"))
    reference = reference.merge_and_unload()
    name = "model.layers.0.self_attn.q_proj.weight"
    w_base, w_merged = base.state_dict()[name], merged.state_dict()[name]
    w_ref = reference.state_dict()[name]
    assert not torch.allclose(w_base, w_merged, atol=1e-3)  # the LoRA changed the weights
    assert torch.allclose(w_merged, w_ref, atol=2e-3)  # ... exactly as peft merges it (16-bit rounding)
    meta = json.loads((exported.merged_dir / MERGE_META).read_text())
    assert meta["dtype"] == "float16" and meta["kind"] == "adapter" and meta["add_bos_token"] is False


@pytest.mark.slow
def test_export_resumes_and_redoes_only_missing_files(exported, tiny_model_dir):
    run_dir = exported.merged_dir.parent
    again = export_tiny(tiny_model_dir, run_dir)
    assert again.merge_skipped and all(f.skipped for f in again.files)
    (run_dir / "gguf" / "judge-q8_0.gguf").unlink()
    third = export_tiny(tiny_model_dir, run_dir)
    assert {f.type: f.skipped for f in third.files} == {"f16": True, "q8_0": False, "q4_k_m": True}
    assert (run_dir / "gguf" / "judge-q8_0.gguf").stat().st_size == exported.files[1].size


@pytest.mark.slow
def test_ollama_modelfile(exported):
    text = exported.modelfile.read_text()
    assert exported.modelfile.name == "judge-q4_k_m.Modelfile"
    assert "FROM ./judge-q4_k_m.gguf" in text and "<|im_start|>assistant" in text
    assert f'SYSTEM """{load_template("en").system}"""' in text and "PARAMETER temperature 0" in text


@pytest.mark.slow
def test_verify_compares_hf_and_gguf(exported):
    report = export.verify_export(exported.merged_dir, exported.gguf_paths, 4, threads=2)
    assert report.pairs == 4 and set(report.files) == {"f16", *QUANTS}
    assert report.files["f16"]["agreement"] == 1.0
    assert report.files["f16"]["max_p_diff"] < 0.01
    assert all(row["max_p_diff"] < 0.1 for row in report.files.values())


@pytest.mark.slow
def test_adapter_on_the_wrong_base_is_an_input_error(exported, tmp_path):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    other = tmp_path / "other-base"
    config = LlamaConfig(vocab_size=1618, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1)
    LlamaForCausalLM(config).save_pretrained(other)
    AutoTokenizer.from_pretrained(exported.merged_dir).save_pretrained(other)
    with pytest.raises(InputError, match="does not fit the base model"):
        export.merge_adapter(exported.merged_dir.parent / "adapter", tmp_path / "merged", base=str(other))
    assert not (tmp_path / "merged").exists()


@pytest.mark.slow
def test_quantization_fallbacks_are_reported(tiny_model_dir, tmp_path):
    """Rows of 320 values do not split into 256-value k-quant blocks: llama.cpp falls
    back to another type for those tensors, and the export says so."""
    import shutil

    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    model_dir = tmp_path / "odd-shapes"
    config = LlamaConfig(vocab_size=1618, hidden_size=320, intermediate_size=640, num_hidden_layers=1,
                         num_attention_heads=5, num_key_value_heads=5)
    LlamaForCausalLM(config).save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(model_dir)
    shutil.copy(tiny_model_dir / "tokenizer.model", model_dir / "tokenizer.model")
    result = export_gguf(model_dir, tmp_path / "run", quant_types=("q4_k_m",), threads=2)
    q4 = result.files[1]
    assert q4.type == "q4_k_m" and q4.fallbacks
    assert all(f["shape"][0] % 256 != 0 and f["type"] != "Q4_K" for f in q4.fallbacks)
    assert "blk.0.attn_q.weight" in {f["tensor"] for f in q4.fallbacks}
    manifest = json.loads((tmp_path / "run" / "gguf" / "export.json").read_text())
    assert manifest["files"]["q4_k_m"]["fallbacks"] == q4.fallbacks


@pytest.mark.slow
def test_cli_export(exported, tmp_path):
    from conj_lite.cli import main

    run_dir = exported.merged_dir.parent
    assert main(["export", "--out", str(run_dir), "--quant", "q8_0,q4_k_m", "--ollama"]) == 0
    assert main(["export", "--out", str(tmp_path)]) == 2  # no adapter there
    assert main(["export", "--out", str(run_dir), "--quant", "q9_9"]) == 2


@pytest.mark.slow
def test_small_lora_deltas_survive_the_merge_of_a_bf16_base(tiny_model_dir, tmp_path):
    """Merged in bf16, a LoRA delta of std ~1e-4 on weights of std ~0.02 is mostly rounded
    away (~30% error); merged in fp32 and saved as f16 it keeps within a few percent."""
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from conj_lite.export import merge_adapter

    base_dir = tmp_path / "base-bf16"
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    base.save_pretrained(base_dir)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(base_dir)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                           LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj"], lora_dropout=0.0))
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data.normal_(0.0, 0.01)  # B A: delta std ~ 4 * 1e-4 / 2 = 2e-4
    model.save_pretrained(tmp_path / "adapter")
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    w = layer.base_layer.weight.detach().clone()
    delta = (layer.lora_B["default"].weight @ layer.lora_A["default"].weight).detach() * layer.scaling["default"]
    merge_adapter(tmp_path / "adapter", tmp_path / "merged", base=str(base_dir))
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))["model.layers.0.self_attn.q_proj.weight"]
    error = ((merged.float() - (w + delta)).norm() / delta.norm()).item()
    assert merged.dtype == torch.float16
    assert error < 0.10, f"merged delta error {error:.1%}"


@pytest.mark.slow
def test_export_verify_compares_with_base_plus_adapter(exported, tiny_model_dir):
    """--verify checks the GGUFs against what training produced (base + adapter), not
    against the merged model, which would hide what the merge lost."""
    run_dir = exported.merged_dir.parent
    result = export_gguf(run_dir / "adapter", run_dir, quant_types=QUANTS, ollama_modelfile=True, threads=2, verify=2)
    assert result.verify.reference == str(run_dir / "adapter")
    assert result.verify.files["f16"]["agreement"] == 1.0 and result.verify.files["f16"]["max_p_diff"] < 0.01


# ---------------------------------------------------------------- merge memory and precision

MERGE_RSS = r"""
import json, sys
from pathlib import Path
from conj_lite.export import merge_adapter

def status(key):
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(key))
    return int(line.split()[1]) * 1024

small, big, out = sys.argv[1:4]
merge_adapter(small, out + "-small")  # imports and first-use costs, not measured
before = status("VmRSS:")
Path("/proc/self/clear_refs").write_text("5")  # restart the high-water mark (VmHWM) here
merge_adapter(big, out)
print("RESULT", json.dumps({"before": before, "peak": status("VmHWM:")}))
"""


def bf16_base_and_adapter(tiny_model_dir, out: Path, *, hidden=768, intermediate=2048, layers=8):
    """A random bf16 Llama (the tiny tokenizer) and a LoRA adapter with non-zero fp32 weights
    on it, marked as trained in 4-bit: what a QLoRA run leaves for export."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    base, adapter = out / "base", out / "adapter"
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=4, vocab_size=len(tokenizer),
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    lora = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGETS, lora_dropout=0.0))
    for name, param in lora.named_parameters():
        if "lora_" in name:
            param.data = torch.randn(param.shape, dtype=torch.float32) * 0.01  # fp32, as training keeps them
    lora.save_pretrained(adapter)
    tokenizer.save_pretrained(adapter)
    meta = {"base_model": str(base), "load_in_4bit": True, "template": "en"}
    (adapter / "conj_lite_train.json").write_text(json.dumps(meta))
    return base, adapter


@pytest.mark.slow
def test_merge_holds_about_one_16bit_copy_of_the_model(tiny_model_dir, tmp_path):
    """The merge loads the base in 16 bits (no float32 copy of the model, which made export
    need twice the RAM the recipes state) and reads it without mmap: peak RSS of the
    merging process, over what it held before, stays near the 16-bit size."""
    import sys

    _, small = bf16_base_and_adapter(tiny_model_dir, tmp_path / "small", hidden=128, intermediate=256, layers=2)
    base, adapter = bf16_base_and_adapter(tiny_model_dir, tmp_path / "big")
    size = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    proc = subprocess.run([sys.executable, "-c", MERGE_RSS, str(small), str(adapter), str(tmp_path / "merged")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rss = json.loads(proc.stdout.split("RESULT ", 1)[1])
    ratio = (rss["peak"] - rss["before"]) / size
    # Loading in float32 measured 3.1x here, a 16-bit load through mmap over 2x. At this size
    # the allocator keeps some freed float32 deltas (~0.4x); benchmarks/export_time.py --ram
    # measures real shapes (1.5B, 3B) against the 1.3x the recipes use.
    assert ratio < 1.8, f"merging a {size / 2**20:.0f} MiB model took {ratio:.2f}x its 16-bit size"


@pytest.mark.slow
def test_merge_rounds_w_plus_delta_once_from_a_16bit_base(tiny_model_dir, tmp_path):
    """Each merged weight is fp16(float32(W) + scale * B @ A): the delta is added in float32
    and rounded once, as when the whole model was merged in float32. Exactly so, except
    for base weights below fp16's normal range (|W| < 2^-14), which the 16-bit load has
    already rounded to an fp16 subnormal: there the sum may round to the next fp16 value."""
    import torch
    from safetensors.torch import load_file

    from conj_lite.export import merge_adapter

    base, adapter = bf16_base_and_adapter(tiny_model_dir, tmp_path, hidden=128, intermediate=256, layers=2)
    merge_adapter(adapter, tmp_path / "merged")
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    weights = load_file(str(base / "model.safetensors"))
    lora = load_file(str(adapter / "adapter_model.safetensors"))
    scale = 16 / 8
    checked = 0
    for key, a in lora.items():
        if ".lora_A." not in key:
            continue
        b = lora[key.replace(".lora_A.", ".lora_B.")]
        assert a.dtype == b.dtype == torch.float32
        name = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
        expected = (weights[name].float() + scale * (b @ a)).to(torch.float16)
        assert merged[name].dtype == torch.float16
        tiny = weights[name].float().abs() < 2.0**-14
        assert torch.equal(merged[name][~tiny], expected[~tiny]), name
        ulp = (torch.nextafter(expected[tiny], torch.tensor(torch.inf, dtype=torch.float16)) - expected[tiny]).float()
        assert ((merged[name][tiny].float() - expected[tiny].float()).abs() <= ulp).all(), name
        checked += 1
    assert checked == 2 * len(LORA_TARGETS)
