"""Loading base models and tokenizers: CPU full precision, CUDA 4-bit QLoRA, unsloth.

The thin edge between recipes and transformers/bitsandbytes/unsloth. unsloth patches
transformers and trl when imported, so it must be imported before trl, and it refuses
to import without a GPU: `unsloth_available()` checks both before touching it.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from .config import ModelConfig, Recipe
from .errors import InputError
from .prompts import load_template
from .packaged import is_packaged, packaged_model_path
from .tiny import tiny_model_path


DTYPES = ("bf16", "fp16", "fp32")


@dataclass(frozen=True)
class Runtime:
    """Where and how a model runs, decided once from the recipe and the machine."""

    device: str  # "cuda" or "cpu"
    dtype: str  # "bf16", "fp16" or "fp32": compute dtype
    load_in_4bit: bool
    use_unsloth: bool

    @property
    def torch_dtype(self):
        return torch_dtype_of(self.dtype)


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def local_rank() -> int:
    """This process's GPU under `accelerate launch` / torchrun (0 otherwise)."""
    return int(os.environ.get("LOCAL_RANK", 0))


def unsloth_available() -> bool:
    return cuda_available() and importlib.util.find_spec("unsloth") is not None


def auto_dtype() -> str:
    """bf16 where the card computes in bf16 (compute capability 8.0+: A100, L4, H100),
    fp16 on older cards (T4 7.5, V100 7.0, P100 6.0), fp32 on the CPU. Decided by the
    capability: torch's `is_bf16_supported()` also counts emulation and says True on a
    T4, which would train in emulated bf16."""
    import torch

    if not cuda_available():
        return "fp32"
    major, _ = torch.cuda.get_device_capability(local_rank())
    return "bf16" if major >= 8 else "fp16"


def _unsloth_choice(cfg: ModelConfig) -> str:
    return {True: "yes", False: "no"}.get(cfg.use_unsloth, cfg.use_unsloth)  # YAML reads yes/no as booleans


def _multi_process() -> bool:
    return int(os.environ.get("WORLD_SIZE", 1)) > 1  # unsloth is single-GPU


def will_use_unsloth(cfg: ModelConfig) -> bool:
    """Whether a run of this model config takes the unsloth path here."""
    return _unsloth_choice(cfg) in ("auto", "yes") and not _multi_process() and unsloth_available()


def import_unsloth_early(cfg: ModelConfig) -> None:
    """Import unsloth now if this run will use it: it patches transformers, trl and peft
    as it is imported, so it must come before them (conj-lite imports them lazily; the
    first is `progress.quiet_libraries`)."""
    if will_use_unsloth(cfg):
        import unsloth  # noqa: F401


def resolve_runtime(cfg: ModelConfig) -> Runtime:
    """Pick device, dtype, 4-bit and unsloth from the recipe and the hardware."""
    on_cuda = cuda_available()
    dtype = auto_dtype() if cfg.dtype == "auto" else cfg.dtype
    if dtype not in DTYPES:
        raise InputError(f"model.dtype must be auto, bf16, fp16 or fp32, got {cfg.dtype!r}")
    load_in_4bit = on_cuda if cfg.load_in_4bit is None else cfg.load_in_4bit
    if load_in_4bit and not on_cuda:
        raise InputError("model.load_in_4bit needs a CUDA GPU (bitsandbytes); set it to false for CPU runs")
    if load_in_4bit and importlib.util.find_spec("bitsandbytes") is None:
        raise InputError('4-bit QLoRA needs bitsandbytes: pip install "conj-lite[gpu]"')
    choice = _unsloth_choice(cfg)
    if choice not in ("auto", "yes", "no"):
        raise InputError(f"model.use_unsloth must be auto, yes or no, got {cfg.use_unsloth!r}")
    if choice == "yes" and _multi_process():
        raise InputError("model.use_unsloth: yes does not run under multi-process data parallel; set it to no")
    use_unsloth = will_use_unsloth(cfg)
    if choice == "yes" and not use_unsloth:
        raise InputError('model.use_unsloth: yes needs a CUDA GPU and unsloth: pip install "conj-lite[unsloth]"')
    return Runtime(device="cuda" if on_cuda else "cpu", dtype=dtype, load_in_4bit=load_in_4bit, use_unsloth=use_unsloth)


def import_unsloth_first(runtime: Runtime) -> None:
    """unsloth must patch transformers/trl before trl is imported."""
    if runtime.use_unsloth:
        import unsloth  # noqa: F401


def resolve_model_path(recipe: Recipe, progress=None, console=None) -> str:
    """The base model's path or hub id; builds the tiny local model for 'tiny' and the
    HF directory of a packaged real model (`conj_lite.packaged`, e.g. 'smollm2-135m').

    The tiny model does not depend on the data, so one cached build serves every
    recipe, test and benchmark with the same shapes."""
    name = recipe.model.name_or_path
    if is_packaged(name):
        return str(packaged_model_path(name, console=console))
    if name != "tiny":
        return name
    return str(tiny_model_path(recipe.model.tiny, template=load_template(recipe.prompts.template), progress=progress))


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot load a tokenizer: {exc}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # generation appends to the right
    if not getattr(tokenizer, "chat_template", None):
        raise InputError(f"{path}: the tokenizer has no chat template; use an instruct/chat model")
    return tokenizer


def bnb_config(runtime: Runtime):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=runtime.torch_dtype,
    )


def torch_dtype_of(name: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def load_causal_lm(path: str, cfg: ModelConfig, runtime: Runtime, weights: str | None = None):
    """The base model for sampling or training (4-bit on CUDA when asked). `weights`:
    the dtype its unquantized weights are loaded in (default: the compute dtype)."""
    from transformers import AutoModelForCausalLM

    dtype = torch_dtype_of(weights) if weights else runtime.torch_dtype
    kwargs = {"dtype": dtype, "trust_remote_code": cfg.trust_remote_code}
    if runtime.load_in_4bit:
        kwargs["quantization_config"] = bnb_config(runtime)
        kwargs["device_map"] = {"": local_rank()}  # each data-parallel process on its own GPU
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot load a causal language model: {exc}") from None
    if runtime.device == "cuda" and not runtime.load_in_4bit:
        model = model.to(f"cuda:{local_rank()}")
    return model


def load_for_sampling(path: str, cfg: ModelConfig, runtime: Runtime, adapter: str | Path | None = None):
    """Model and tokenizer ready for `generate`, optionally with a trained adapter."""
    if runtime.use_unsloth:
        import_unsloth_first(runtime)
        from unsloth import FastLanguageModel

        model, tokenizer = FastLanguageModel.from_pretrained(
            model_name=str(adapter or path),
            max_seq_length=cfg.max_seq_length,
            dtype=runtime.torch_dtype,
            load_in_4bit=runtime.load_in_4bit,
        )
        FastLanguageModel.for_inference(model)
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return model, tokenizer
    tokenizer = load_tokenizer(path, cfg.trust_remote_code)
    model = load_causal_lm(path, cfg, runtime)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
        if not runtime.load_in_4bit:
            model = model.merge_and_unload()  # plain weights generate faster than base + LoRA
    model.eval()
    return model, tokenizer


def set_cpu_threads() -> None:
    """Use every CPU this process may run on for torch (a notebook may have set fewer)."""
    import torch

    from .system import usable_cpus

    if not cuda_available():
        torch.set_num_threads(usable_cpus())
