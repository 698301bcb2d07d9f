"""The CUDA path, checked on the CPU (conj_lite.models, conj_lite.training, conj_lite.pipeline).

No GPU is needed: the compute capability is faked, unsloth is a stub module that records
what was imported before it, and the 4-bit load is the tiny model in 16 bits marked as
bitsandbytes marks a 4-bit model (TRL and peft decide on that mark). What needs a real
GPU (bitsandbytes' kernels, real peak memory) is measured by benchmarks/gpu_check.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conj_lite import training
from conj_lite.config import load_recipe
from conj_lite.models import Runtime, load_causal_lm, resolve_runtime

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("capability, dtype", [((6, 0), "fp16"), ((7, 0), "fp16"), ((7, 5), "fp16"),
                                               ((8, 0), "bf16"), ((8, 9), "bf16"), ((9, 0), "bf16")])
def test_auto_dtype_follows_the_compute_capability(monkeypatch, capability, dtype):
    """P100 (6.0), V100 (7.0), T4 (7.5): fp16; A100 (8.0), L4 (8.9), H100 (9.0): bf16. torch's
    is_bf16_supported() also counts emulation (True on a T4), so it must not decide."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    model = load_recipe(None, ["model.dtype=auto", "model.load_in_4bit=false", "model.use_unsloth=no"]).model
    assert resolve_runtime(model).dtype == dtype


UNSLOTH_STUB = """
import json, os, sys
# A stand-in for unsloth: record which of the libraries it patches were already imported,
# then stop the run (nothing after this point is under test).
with open(os.environ["UNSLOTH_STUB_LOG"], "w") as f:
    json.dump([m for m in ("transformers", "trl", "peft", "datasets") if m in sys.modules], f)
raise SystemExit(0)
"""


def test_conj_lite_run_imports_unsloth_before_what_it_patches(tmp_path):
    """`conj-lite run` with unsloth installed on a (faked) CUDA machine imports unsloth before
    transformers, trl, peft and datasets, or its patches may not apply."""
    stub = tmp_path / "stub"
    (stub / "unsloth").mkdir(parents=True)
    (stub / "unsloth" / "__init__.py").write_text(UNSLOTH_STUB)
    log = tmp_path / "imported-before-unsloth.json"
    code = ("import sys, torch; torch.cuda.is_available = lambda: True\n"
            "from conj_lite.cli import main\n"
            f"sys.exit(main(['run', 'tiny-cpu', '--out', {str(tmp_path / 'run')!r}, 'model.load_in_4bit=false', "
            "'model.use_unsloth=auto']))")
    env = dict(os.environ, UNSLOTH_STUB_LOG=str(log),
               PYTHONPATH=os.pathsep.join([str(stub), str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                          cwd=tmp_path)
    assert log.is_file(), f"unsloth was never imported (rc {proc.returncode}): {proc.stderr[-2000:]}"
    assert json.loads(log.read_text()) == [], "imported before unsloth"


def marked_4bit(monkeypatch):
    """training.load_causal_lm gives the model in 16 bits marked as loaded in 4-bit, as
    transformers marks a bitsandbytes model (the weights themselves stay 16-bit here).
    transformers then imports bitsandbytes to count parameters: a stub without 4-bit
    layers stands in (peft's is_bnb_4bit_available stays False)."""
    import importlib.machinery
    import types

    def load(path, cfg, runtime, weights=None):
        model = load_causal_lm(path, cfg, Runtime("cpu", runtime.dtype, False, False), weights=weights)
        model.is_loaded_in_4bit = True
        return model

    monkeypatch.setattr(training, "load_causal_lm", load)
    if "bitsandbytes" not in sys.modules:
        stub = types.ModuleType("bitsandbytes")
        stub.__spec__ = importlib.machinery.ModuleSpec("bitsandbytes", None)
        stub.nn = types.SimpleNamespace(Params4bit=type("Params4bit", (), {}))
        monkeypatch.setitem(sys.modules, "bitsandbytes", stub)


def test_4bit_training_load_keeps_16bit_weights_frozen(tiny_model_dir, monkeypatch):
    """Nothing of the loaded base is cast to fp32 for QLoRA (peft's
    prepare_model_for_kbit_training did: embeddings, LM head and norms, +2 GiB on a 7B),
    and all of it is frozen: only the LoRA weights peft adds will train. What it holds is
    what benchmarks/shapes.py counts for its weights (16-bit here: linears included)."""
    import torch

    from shapes import Shape, weight_bytes

    marked_4bit(monkeypatch)
    recipe = load_recipe(None, ["model.dtype=bf16", "training.gradient_checkpointing=true"])
    model, _, peft_config, checkpointing = training.load_for_training(
        str(tiny_model_dir), recipe, Runtime("cpu", "bf16", True, False))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not any(p.requires_grad for p in model.parameters())
    assert peft_config is not None and checkpointing is True
    c = model.config
    shape = Shape("llama", c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads,
                  c.num_key_value_heads, c.vocab_size, c.tie_word_embeddings, head_dim=c.head_dim)
    held = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "norm" not in n)
    assert held == weight_bytes(shape, load_in_4bit=False)  # norms aside (a few KB)


def preference_rows(n: int) -> list[dict]:
    from conj_lite.prompts import build_messages, load_template

    template = load_template("en")
    rows = []
    for i in range(n):
        messages = build_messages(template, f"Which answer is right? question {i}", "yes it is", "no it is not")
        rows.append({"id": f"p{i}", "order": "ab", "kind": "repeat", "prompt": messages,
                     "chosen": json.dumps({"rationale": "answer 1 is right", "better_answer": 1}),
                     "rejected": json.dumps({"rationale": "answer 2 is right", "better_answer": 2})})
    return rows


@pytest.mark.slow
def test_bf16_qlora_training_keeps_lora_weights_fp32_and_trains_them(tiny_model_dir, tmp_path, monkeypatch):
    """TRL casts a quantized model's trainable weights to bf16; in bf16 many LoRA updates at
    small learning rates fall below half an ulp and are lost. Trained in bf16 (as on L4 and
    A100) with gradient checkpointing, the adapter comes out fp32 and every LoRA B moved
    from its zero init (gradients reach it through checkpointed layers without
    prepare_model_for_kbit_training)."""
    import torch
    from safetensors.torch import load_file

    marked_4bit(monkeypatch)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in preference_rows(4)))
    recipe = load_recipe(None, ["model.dtype=bf16", "model.load_in_4bit=false", "training.gradient_checkpointing=true",
                                "training.max_steps=2", "training.batch_size=2", "training.grad_accum=1",
                                "training.learning_rate=1e-3", "training.eval_pairs=0", "training.lora_r=4",
                                "training.lora_alpha=8", "model.max_seq_length=256"])
    summary = training.train_adapter(recipe, str(tiny_model_dir), pairs, tmp_path / "out")
    assert summary.steps == 2
    weights = load_file(str(tmp_path / "out" / "adapter" / "adapter_model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.float32}
    lora_b = [t for name, t in weights.items() if "lora_B" in name]
    assert lora_b and all(t.abs().sum() > 0 for t in lora_b)
