"""Published model shapes and the peak-GPU-memory estimate written into recipe headers.

The shapes are the facts of each model's `config.json` on the Hugging Face hub (hidden
size, MLP width, layers, attention and key-value heads, vocabulary, tied embeddings).
The GPU benchmarks build randomly initialised models of these shapes (memory and speed
do not depend on weight values), and `tests/test_recipes.py` checks every recipe's
"Expected peak memory" header against `estimate_recipe`.

The estimate is arithmetic, not a measurement. Plain path (transformers + bitsandbytes
+ peft, TRL DPO+SFT), terms in bytes:

  weights      linear layers in NF4: 0.5 byte/param x 1.1 (block constants, double
               quantization, slack); embeddings and an untied LM head stay 16-bit
               (bitsandbytes quantizes linear layers only, and skips the LM head), and
               nothing is upcast to fp32 (`weight_bytes`; the GPU check records the real
               bytes by dtype)
  LoRA         r x (in + out) per adapted projection: fp32 weight + fp32 gradient +
               two 8-bit Adam states = 10 bytes/param
  activations  TRL runs chosen and rejected as one batch: 2 x batch x seq tokens.
               With gradient checkpointing every layer keeps its 16-bit input and one
               layer at a time is recomputed (attention, MLP, LoRA dropout copies,
               their gradients): ~(16 x hidden + 6 x MLP) x 2 bytes per token
  logits       tokens x vocab x 2 bytes, three times: the policy's (kept for the
               backward), their gradient, and the reference pass's
  sampling     weights + KV cache for `sampling.batch_size` sequences of
               `max_seq_length` tokens + one layer's prefill activations
  overhead     CUDA context 0.5 GB + 10 % allocator fragmentation

Peak = max(training, sampling). unsloth's path uses less (its own checkpointing and
fused loss), so the plain path is the one a recipe must fit. `benchmarks/train_memory.py`
measures the real figure on a GPU; calibrate the constants here from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

GB = 1024**3
NF4_BYTES = 0.5 * 1.1
LORA_BYTES = 4 + 4 + 2  # fp32 weight, fp32 grad, 8-bit Adam m and v
CUDA_CONTEXT_GB = 0.5
FRAGMENTATION = 1.10
ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Shape:
    arch: str  # transformers architecture family: qwen2, llama, mistral
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool
    head_dim: int | None = None  # None: hidden // heads

    @property
    def dim(self) -> int:
        return self.head_dim or self.hidden // self.heads

    def projections(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear layer in one decoder block."""
        q, kv = self.heads * self.dim, self.kv_heads * self.dim
        h, m = self.hidden, self.intermediate
        return {
            "q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, m), "up_proj": (h, m), "down_proj": (m, h),
        }

    def linear_params(self) -> int:
        return self.layers * sum(i * o for i, o in self.projections().values())

    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2)

    def params(self) -> int:
        return self.linear_params() + self.embedding_params()

    def lora_params(self, r: int, targets=ALL_TARGETS) -> int:
        return self.layers * sum(r * (i + o) for name, (i, o) in self.projections().items() if name in targets)

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        return 2 * self.layers * self.kv_heads * self.dim * dtype_bytes

    def transformers_config(self, vocab_size: int | None = None, **extra):
        """A transformers config of this shape (for random initialisation)."""
        import transformers

        cls = {"qwen2": transformers.Qwen2Config, "llama": transformers.LlamaConfig,
               "mistral": transformers.MistralConfig}[self.arch]
        kwargs = dict(
            hidden_size=self.hidden, intermediate_size=self.intermediate, num_hidden_layers=self.layers,
            num_attention_heads=self.heads, num_key_value_heads=self.kv_heads,
            vocab_size=max(self.vocab, vocab_size or 0), tie_word_embeddings=self.tied,
        )
        if self.head_dim:
            kwargs["head_dim"] = self.head_dim
        kwargs.update(extra)
        return cls(**kwargs)


# From each model's config.json on the hub.
SHAPES: dict[str, Shape] = {
    "qwen2.5-0.5b": Shape("qwen2", 896, 4864, 24, 14, 2, 151936, True),
    "qwen2.5-1.5b": Shape("qwen2", 1536, 8960, 28, 12, 2, 151936, True),
    "qwen2.5-3b": Shape("qwen2", 2048, 11008, 36, 16, 2, 151936, True),
    "qwen2.5-7b": Shape("qwen2", 3584, 18944, 28, 28, 4, 152064, False),
    "llama-3.2-1b": Shape("llama", 2048, 8192, 16, 32, 8, 128256, True, head_dim=64),
    "llama-3.2-3b": Shape("llama", 3072, 8192, 28, 24, 8, 128256, True, head_dim=128),
    "llama-3.1-8b": Shape("llama", 4096, 14336, 32, 32, 8, 128256, False),
    "mistral-7b": Shape("mistral", 4096, 14336, 32, 32, 8, 32768, False),
    "smollm2-135m": Shape("llama", 576, 1536, 30, 9, 3, 49152, True),  # the packaged real model
}

# Hub ids the recipes use -> shape.
HUB_MODELS: dict[str, str] = {
    "Qwen/Qwen2.5-0.5B-Instruct": "qwen2.5-0.5b",
    "Qwen/Qwen2.5-1.5B-Instruct": "qwen2.5-1.5b",
    "Qwen/Qwen2.5-3B-Instruct": "qwen2.5-3b",
    "Qwen/Qwen2.5-7B-Instruct": "qwen2.5-7b",
    "meta-llama/Llama-3.2-1B-Instruct": "llama-3.2-1b",
    "meta-llama/Llama-3.2-3B-Instruct": "llama-3.2-3b",
    "meta-llama/Llama-3.1-8B-Instruct": "llama-3.1-8b",
    "mistralai/Mistral-7B-Instruct-v0.3": "mistral-7b",
}


@dataclass(frozen=True)
class MemoryEstimate:
    parts_gb: dict  # each term, GB
    train_gb: float
    sample_gb: float

    @property
    def peak_gb(self) -> float:
        return max(self.train_gb, self.sample_gb)


def weight_bytes(shape: Shape, load_in_4bit: bool = True) -> float:
    """The base weights the training path holds: linear layers in NF4 (or 16-bit), the
    embeddings and an untied LM head in 16-bit, nothing upcast to fp32 (conj_lite.training
    does not call peft's prepare_model_for_kbit_training; tests/test_gpu_path.py)."""
    return shape.linear_params() * (NF4_BYTES if load_in_4bit else 2) + shape.embedding_params() * 2


def estimate(shape: Shape, *, seq: int, batch: int = 1, lora_r: int = 16, targets=ALL_TARGETS,
             gradient_checkpointing: bool = True, sampling_batch: int = 16, load_in_4bit: bool = True) -> MemoryEstimate:
    """Peak GPU memory of sampling and of QLoRA DPO+SFT training, in GB (see module doc)."""
    weights = weight_bytes(shape, load_in_4bit)
    lora = shape.lora_params(lora_r, targets) * LORA_BYTES
    tokens = 2 * batch * seq  # chosen + rejected in one forward
    per_layer = tokens * (16 * shape.hidden + 6 * shape.intermediate) * 2
    if gradient_checkpointing:
        activations = shape.layers * tokens * shape.hidden * 2 + per_layer
    else:
        activations = shape.layers * per_layer
    logits = 3 * tokens * shape.vocab * 2
    kv_cache = sampling_batch * seq * shape.kv_bytes_per_token()
    prefill = sampling_batch * seq * (3 * shape.intermediate + 4 * shape.hidden) * 2

    def total(*terms):
        return sum(terms) * FRAGMENTATION / GB + CUDA_CONTEXT_GB

    parts = {name: round(value / GB, 2) for name, value in (
        ("weights", weights), ("lora_and_optimizer", lora), ("activations", activations),
        ("logits", logits), ("kv_cache", kv_cache), ("prefill", prefill))}
    return MemoryEstimate(parts, round(total(weights, lora, activations, logits), 1),
                          round(total(weights, kv_cache, prefill), 1))


def estimate_recipe(recipe) -> MemoryEstimate:
    """The estimate for a loaded `conj_lite.config.Recipe` whose model is in HUB_MODELS."""
    shape = SHAPES[HUB_MODELS[recipe.model.name_or_path]]
    t = recipe.training
    return estimate(
        shape, seq=recipe.model.max_seq_length, batch=t.batch_size, lora_r=t.lora_r, targets=tuple(t.target_modules),
        gradient_checkpointing=t.gradient_checkpointing is not False, sampling_batch=recipe.sampling.batch_size,
        load_in_4bit=recipe.model.load_in_4bit is not False,
    )


# Host RAM of export (merge + convert) over the 16-bit checkpoint size: the largest factor
# `benchmarks/export_time.py --ram` measured (docs/benchmarks/export_ram.json, checked by
# tests/test_recipes.py). Recipe headers state factor x 16-bit size.
EXPORT_RAM_FACTOR = 1.3


def recipe_export_ram(recipe, factor: float = EXPORT_RAM_FACTOR) -> tuple[float, float] | None:
    """(host RAM export needs, 16-bit size of the model), GB, for a recipe whose model is in
    HUB_MODELS (None otherwise)."""
    name = HUB_MODELS.get(recipe.model.name_or_path)
    if name is None:
        return None
    size = SHAPES[name].params() * 2 / GB
    return round(factor * size, 1), round(size, 1)


def checkpoint_dir(name: str, dtype: str) -> Path:

    from conj_lite.tiny import cache_root

    return Path(cache_root()) / "bench" / f"{name}-{dtype}-random"


def random_checkpoint(name: str, dtype: str = "bfloat16", device: str = "cpu", console=print) -> Path:
    """A randomly initialised model of a published shape, saved as a local checkpoint.

    The tokenizer is conj_lite's tiny sentencepiece one (with a chat template); the
    embedding keeps the published vocabulary size, so the embedding, LM head and logits
    cost what the real model's do. Cached under the conj-lite cache (`bench/`);
    `device="cuda"` initialises on the GPU (much faster for 7B shapes)."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from conj_lite.tiny import tiny_model_path

    out = checkpoint_dir(name, dtype)
    tiny = tiny_model_path()
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    tokenizer = AutoTokenizer.from_pretrained(str(tiny))
    shape = SHAPES[name]
    config = shape.transformers_config(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, max_position_embeddings=32768,
    )
    console(f"building a random {name}-shaped checkpoint ({shape.params() / 1e9:.2f}B parameters, {dtype}) in {out}")
    torch.manual_seed(0)
    torch_dtype = getattr(torch, dtype)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(str(staging), safe_serialization=True)
    tokenizer.save_pretrained(str(staging))
    # llama.cpp's converter reads a sentencepiece vocabulary from tokenizer.model
    shutil.copy2(tiny / "tokenizer.model", staging / "tokenizer.model")
    del model
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return out


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Print the memory estimate of each shape (or of recipes).")
    parser.add_argument("recipes", nargs="*", help="recipe YAML files; default: every shape at seq 2048")
    args = parser.parse_args()
    if args.recipes:
        import sys

        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from conj_lite.config import load_recipe

        for path in args.recipes:
            e = estimate_recipe(load_recipe(path))
            print(f"{path}: peak {e.peak_gb} GB (train {e.train_gb}, sample {e.sample_gb}) {e.parts_gb}")
    else:
        for name, shape in SHAPES.items():
            e = estimate(shape, seq=2048)
            print(f"{name:14s} {shape.params() / 1e9:5.2f}B  peak {e.peak_gb:5.1f} GB  train {e.train_gb:5.1f}  "
                  f"sample {e.sample_gb:5.1f}  {e.parts_gb}")
