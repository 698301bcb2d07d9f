"""The recipe schema: one YAML file describes a whole Con-J run.

Every section is a dataclass whose fields carry their defaults and a one-line help
(`metadata["help"]`). `load_recipe` reads YAML, applies `section.key=value` overrides
and rejects unknown keys or wrong types with the file name and the key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import InputError


def opt(default, help: str, **kw):
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class TinyConfig:
    """Shapes of the locally built model used when `model.name_or_path: tiny`."""

    hidden_size: int = opt(256, "hidden size (a multiple of 256 keeps k-quants usable)")
    intermediate_size: int = opt(512, "MLP width")
    num_hidden_layers: int = opt(2, "transformer layers")
    num_attention_heads: int = opt(4, "attention heads")
    num_key_value_heads: int = opt(2, "key/value heads")
    vocab_size: int = opt(2048, "sentencepiece vocabulary size")
    max_position_embeddings: int = opt(2048, "longest sequence the model takes")
    warmup_steps: int = opt(150, "steps of format warm-up so the model writes JSON judgments")
    warmup_batch_size: int = opt(16, "examples per format warm-up step")
    warmup_lr: float = opt(3e-3, "learning rate of the format warm-up")
    seed: int = opt(0, "seed of the build")


@dataclass
class ModelConfig:
    name_or_path: str = opt("tiny", "a Hugging Face model id or local directory; 'tiny' builds a small local model")
    tiny: TinyConfig = field(default_factory=TinyConfig, metadata={"help": "shapes of the tiny local model"})
    load_in_4bit: bool | None = opt(None, "4-bit NF4 QLoRA; default: on when CUDA is available")
    dtype: str = opt("auto", "compute dtype: auto (bf16 on CUDA compute capability 8.0+, fp16 on older cards, fp32 on CPU), "
                     "bf16, fp16, fp32")
    use_unsloth: str | bool = opt("auto", "auto (when installed and on CUDA), yes, no")
    max_seq_length: int = opt(2048, "longest prompt+judgment in tokens")
    trust_remote_code: bool = opt(False, "passed to from_pretrained")


@dataclass
class DataConfig:
    path: str = opt("data/sample_prefs.jsonl", "a JSON/JSONL/Parquet/CSV file, a save_to_disk directory or a HF dataset name")
    preset: str = opt("auto", "auto, canonical, llmbar, chosen_rejected, annotators, or 'fields' with `fields` below")
    fields: dict = opt({}, "explicit field mapping: question, a, b, label (and id, subset)")
    label_map: dict | str = opt({}, "label values to A/B/tie: a mapping {'0': 'A', '1': 'B'}, text '0=A,1=B,2=tie', "
                                "or a named map (autoj, pandalm)")
    split: str = opt("train", "split of a HF dataset")
    limit: int | None = opt(None, "use the first N pairs")
    skip_invalid: bool = opt(False, "write bad rows to a rejects file instead of stopping")
    heldout: int = opt(0, "keep N labelled pairs (chosen by a hash of their ids) out of sampling and training; "
                       "`conj-lite run` judges them before and after training and prints what changed")
    heldout_engine: str = opt("transformers", "what judges the held-out pairs before and after training: "
                              "transformers (the base, then the base with the adapter, in the training dtype: the "
                              "model as trained, its own tokenizer) or llama.cpp (an f32 GGUF of the base, the "
                              "adapter as a GGUF LoRA at run time, llama.cpp's tokenizer: as the GGUF judge reads "
                              "prompts; 1.4x faster on the demo's CPU); auto: llama.cpp on a CPU when installed and "
                              "the model has a GGUF or can be converted to one")
    task: str = opt("preference", "preference: judge the data's own pairs; relevance: each question's own reply "
                    "against a reply to another question (seeded; conj_lite/relevance.py), an easier real signal")
    max_chars: int | None = opt(None, "leave out pairs whose question and answers are longer (characters) than this")
    pairs_per_question: int = opt(1, "relevance task: training pairs built per question (each with another wrong "
                                  "answer)")
    seed: int = opt(0, "seed of the relevance task's wrong answers and slots")


@dataclass
class PromptConfig:
    template: str = opt("en", "built-in template (en, zh) or a YAML file with user/hint/system")
    date_string: str = opt("26 Jul 2024", "the date given to chat templates that print one (Llama 3.x: "
                           "'Today Date'); pinned so the judge's prompt never changes by day")


# The policy's GGUF for llama.cpp's work on the model's own weights (the DPO reference,
# the held-out pairs, sampling unless sampling.gguf_type says otherwise): f32, the weights
# training computes with, without f16's rounding (the reference is within 0.004 nats of
# TRL's fp32 forward; f16: 0.011). Its speed depends on the CPU (benchmarks/gguf_types.py):
# on AVX2 alone llama.cpp evaluates prompts ~1.7x faster from f32 than from f16 (f16 is
# converted on the fly); with AVX-512 f16 is ~8% faster at prompts and ~1.8x at decoding.
POLICY_GGUF_TYPE = "f32"


@dataclass
class SamplingConfig:
    n_repeats: int = opt(8, "repeated judgments per pair and order (paper: 8)")
    hint_samples: int = opt(1, "hint-driven judgments per pair, order and hint (true, reversed)")
    format: str = opt("frame", "frame: every judgment is written inside the judge's JSON frame (grammar-held, as the "
                      "GGUF judge; hint samples take the hinted verdict), so every sample has a verdict; free: "
                      "free-form text, read by the parser, unreadable ones become negatives (the paper; large models)")
    temperature: float = opt(1.2, "sampling temperature (paper: 1.2)")
    top_p: float = opt(0.95, "nucleus sampling (paper: 0.95)")
    top_k: int = opt(0, "top-k sampling; 0 = off (the paper uses none)")
    repetition_penalty: float = opt(1.2, "repetition penalty (paper: 1.2)")
    max_new_tokens: int = opt(512, "longest judgment in tokens")
    batch_size: int = opt(16, "sequences per generate call (prompts x samples); lower it if memory runs out")
    both_orders: bool = opt(True, "judge every pair in both answer orders")
    hints: bool = opt(True, "add hint-driven samples (Con-J); off for the no-hint ablation")
    seed: int = opt(0, "sampling seed")
    engine: str = opt("auto", "what runs the policy: auto (llama.cpp on a CPU when llama-cpp-python is installed and "
                      "the model has a GGUF or can be converted to one; transformers otherwise), transformers "
                      "(HF generate), llama.cpp (llama-cpp-python on a GGUF of the policy, a round's LoRA as a GGUF LoRA)")
    gguf_type: str = opt(POLICY_GGUF_TYPE, "llama.cpp engine: the type of the policy's GGUF it samples from: f32 (the weights "
                         "as trained), f16 or q8_0 (half or a quarter of the file; on CPUs with AVX-512 q8_0 decodes "
                         "~2.4x faster than f32, on AVX2-only CPUs f32 evaluates prompts fastest: "
                         "benchmarks/gguf_types.py). The DPO reference and the held-out pairs stay f32")


@dataclass
class FilterConfig:
    max_pairs: int = opt(3, "k: (positive, negative) pairs per pair and order from the repeated samples")
    unknown_pair: bool = opt(True, "add one (positive, malformed) pair when both exist")
    hint_pair: bool = opt(True, "add one (true-hint positive, reversed-hint negative) pair")
    rationale: bool = opt(True, "keep the rationale in training targets; false: verdict-only judgments (ablation)")
    well_formed_chosen: bool = opt(True, "use only judgments read from a whole JSON object as chosen targets "
                                   "(a verdict recovered from broken text still counts in the statistics)")
    max_rationale_chars: int = opt(2000, "cap over-long rationales to this many characters")
    seed: int = opt(0, "seed for choosing among candidates")


OBJECTIVES = ("dpo+sft", "dpo", "sft")
SAMPLING_FORMATS = ("frame", "free")
DATA_TASKS = ("preference", "relevance")
SAMPLING_ENGINES = ("auto", "transformers", "llama.cpp")
SAMPLING_GGUF_TYPES = ("f32", "f16", "q8_0")


@dataclass
class TrainConfig:
    objective: str = opt("dpo+sft", "dpo+sft (Con-J: DPO + alpha*SFT), dpo (no SFT term), "
                         "sft (no DPO: SFT on the chosen judgments only)")
    alpha: float = opt(1.0, "weight of the SFT term on positive judgments (loss = DPO + alpha*SFT)")
    beta: float = opt(0.1, "DPO beta")
    learning_rate: float = opt(5e-5, "learning rate")
    epochs: float = opt(1.0, "passes over the pairs")
    max_steps: int = opt(-1, "stop after this many steps (-1: use epochs)")
    batch_size: int = opt(1, "pairs per device step")
    grad_accum: int = opt(8, "gradient accumulation steps")
    orders_together: bool = opt(True, "each optimizer step holds both answer orders of its pairs (a seeded order "
                                "of pairs, taken in sequence); false: shuffled rows")
    lora_r: int = opt(16, "LoRA rank")
    lora_alpha: int = opt(32, "LoRA alpha")
    lora_dropout: float = opt(0.05, "LoRA dropout")
    use_rslora: bool = opt(False, "rank-stabilized LoRA: the adapter scaled by lora_alpha/sqrt(lora_r) instead of "
                           "lora_alpha/lora_r (4x at r=16)")
    target_modules: list = opt(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], "modules that get LoRA"
    )
    lora_layers: int | None = opt(None, "LoRA only in the top N decoder layers (none: every layer); the backward "
                                  "pass then stops at the lowest of them")
    loraplus_ratio: float = opt(1.0, "LoRA+: the learning rate of the B matrices (zero at the start) is this many "
                                "times training.learning_rate (1: plain LoRA; the LoRA+ paper suggests 16). At 16 with lr 5e-4 the "
                                "demo stayed on its plateau (docs/benchmarks.md, \"LoRA+\")")
    gradient_checkpointing: bool | None = opt(None, "default: on with CUDA")
    optim: str = opt("auto", "auto: paged_adamw_8bit with 4-bit on CUDA, adamw_torch otherwise")
    warmup_ratio: float = opt(0.1, "learning-rate warm-up")
    adam_beta2: float = opt(0.999, "AdamW's second-moment decay (0.999: TrainingArguments' default); 0.95 forgets "
                            "the first steps' large gradients in ~20 steps. On the demo's plateau it changed "
                            "nothing (docs/benchmarks.md, \"The constant rate\")")
    max_grad_norm: float = opt(1.0, "clip each step's gradient to this norm (1.0: TrainingArguments' default)")
    keep: str = opt("last", "the adapter training hands on: last (after its last step), or best (DPO objectives: "
                    "after the step that ends the keep_window steps whose batches, judged before each step trained "
                    "on them, had the highest pair accuracy; the last such step on ties)")
    keep_window: int = opt(8, "training.keep: best: logged steps in the window")
    keep_level: float = opt(0.05, "training.keep: best hands on the best window only when a judge that guesses "
                            "(each example right with probability 1/2) reaches its pair accuracy over as many examples "
                            "with at most this probability; otherwise the last step's adapter. 1: the best window "
                            "whatever its accuracy")
    lr_scheduler: str = opt("cosine", "the learning rate after the warm-up: cosine (down to 0 at the last step), "
                            "linear, or constant")
    logging_steps: int = opt(1, "log every N steps")
    save_steps: int = opt(50, "checkpoint every N steps (resumable)")
    precompute_ref: bool = opt(False, "compute the reference log-probabilities of every pair once before training, "
                               "in batches of ref_batch_size (TRL precompute_ref_log_probs), not at every step")
    shared_prompt: bool | None = opt(None, "DPO objectives: each pair as one row, its prompt computed once and "
                                     "logits only where a judgment token is predicted (conj_lite/shared_prompt.py); "
                                     "default: on without CUDA, off with unsloth")
    pad_to_multiple_of: int | None = opt(None, "pad each batch's length up to a multiple of this; default: 64 "
                                         "without CUDA, where recurring shapes keep the CPU's matmul primitives "
                                         "and freed buffers reused (a 2.9 GB training peak becomes 2.4 GB), none "
                                         "with CUDA")
    base_dtype: str = opt("auto", "dtype of the frozen base weights while training: auto (fp32, or the compute "
                          "dtype for a 4-bit base), compute (= model.dtype), bf16, fp16 or fp32. On bf16 weights "
                          "a young LoRA's change is lost in the rounding and SmolLM2 did not learn; autocast "
                          "still computes in model.dtype (docs/benchmarks.md)")
    ref_batch_size: int = opt(16, "pairs per batch when precomputing the reference log-probabilities")
    ref_engine: str = opt("auto", "what computes the DPO reference's log-probabilities: transformers (TRL: a forward "
                          "pass in every step, or precompute_ref) or llama.cpp (once, before training, on an f32 "
                          "GGUF of the reference: conj_lite/reference.py); auto: llama.cpp with the shared-prompt "
                          "step on a CPU when llama-cpp-python is installed and the model has a GGUF or can be "
                          "converted to one")
    eval_pairs: int = opt(64, "training pairs (a seeded sample) measured before and after training: loss, "
                          "reward margin, pair accuracy (0: none)")
    seed: int = opt(0, "training seed")


WARMUP_SOURCES = ("none", "positives")


@dataclass
class WarmupConfig:
    """RISE stage 1: SFT on correct judgments before the DPO stage (off by default)."""

    source: str = opt("none", "none; positives (the base model's own correct judgments, sampled and filtered "
                      "first); or a JSONL file of judgments: question, answer_a, answer_b, judgment "
                      "(or prompt + completion rows)")
    swap_positions: bool = opt(True, "add every warm-up judgment in the swapped answer order too "
                               "(verdict and answer numbers in the rationale swapped)")
    epochs: float = opt(1.0, "passes over the warm-up judgments")
    max_steps: int = opt(-1, "stop after this many steps (-1: use epochs)")
    learning_rate: float | None = opt(None, "default: training.learning_rate")
    max_examples: int | None = opt(None, "use at most N warm-up judgments")

    @property
    def enabled(self) -> bool:
        return self.source != "none"


@dataclass
class ExportConfig:
    enabled: bool = opt(True, "export to GGUF at the end of `conj-lite run`")
    outtype: str = opt("f16", "converter output type: f16, bf16, f32 or q8_0")
    quant_types: list = opt(["q8_0", "q4_k_m"], "quantized files made from the converted one")
    llama_cpp_dir: str | None = opt(None, "a llama.cpp checkout to take the converter from")
    verify: int = opt(0, "judge N pairs with the HF model and each GGUF and compare")
    ollama_modelfile: bool = opt(False, "also write an Ollama Modelfile")


@dataclass
class Recipe:
    name: str = opt("recipe", "a short name")
    description: str = opt("", "what this recipe is for")
    rounds: int = opt(1, "Con-J rounds: 0 = the untrained judge (nothing sampled or trained); N > 1 = iterative: "
                      "each round samples from, and trains on, the previous round's adapter")
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "base model"})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "preference data"})
    prompts: PromptConfig = field(default_factory=PromptConfig, metadata={"help": "judge prompt"})
    sampling: SamplingConfig = field(default_factory=SamplingConfig, metadata={"help": "stage S1"})
    filtering: FilterConfig = field(default_factory=FilterConfig, metadata={"help": "stage S2"})
    warmup: WarmupConfig = field(default_factory=WarmupConfig, metadata={"help": "RISE SFT warm-up before S1"})
    training: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "stage S3"})
    export: ExportConfig = field(default_factory=ExportConfig, metadata={"help": "stage S4"})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _coerce(value, annotation, where: str):
    """Check (and gently convert) a YAML value against a field's annotation."""
    hint = annotation
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        for arg in args[1:]:  # an exact match of a later member wins (str | bool given True)
            if type(value) is arg:
                return value
        hint = args[0]
    if dataclasses.is_dataclass(hint):
        if value is None:  # an empty section: all defaults
            value = {}
        if not isinstance(value, dict):
            raise InputError(f"{where}: expected a mapping, got {value!r}")
        return _build(hint, value, where)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise InputError(f"{where}: expected true/false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise InputError(f"{where}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 5e-5 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise InputError(f"{where}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise InputError(f"{where}: expected a string, got {value!r}")
    if hint is list or typing.get_origin(hint) is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise InputError(f"{where}: expected a list, got {value!r}")
        return value
    if hint is dict:
        if not isinstance(value, dict):
            raise InputError(f"{where}: expected a mapping, got {value!r}")
        return value
    return value


def _build(cls, raw: dict, where: str):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise InputError(f"{where or 'top level'}: unknown key(s) {unknown}; known: {sorted(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in raw.items()}
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], object]:
    """`sampling.n_repeats=4` -> (['sampling', 'n_repeats'], 4). Values are YAML."""
    if "=" not in text:
        raise InputError(f"override {text!r}: expected section.key=value")
    key, value = text.split("=", 1)
    if not value.strip():
        return key.strip().split("."), ""
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        if value.lstrip()[:1] in "[{":
            raise InputError(f"override {text!r}: the value is not valid YAML") from None
        parsed = value  # a plain string YAML can't read, e.g. @file or a: b
    return key.strip().split("."), parsed


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for item in overrides:
        path, value = parse_override(item)
        node = raw
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise InputError(f"override {item!r}: {part} is not a section")
        node[path[-1]] = value
    return raw


KEEP = ("last", "best")  # training.keep
BASE_DTYPES = ("auto", "compute", "bf16", "fp16", "fp32")  # training.base_dtype
REF_ENGINES = ("auto", "transformers", "llama.cpp")  # training.ref_engine, data.heldout_engine
LR_SCHEDULERS = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}  # -> transformers'


def check_recipe(recipe: Recipe) -> None:
    """Values the types alone do not pin down."""
    if recipe.rounds < 0:
        raise InputError(f"rounds: expected 0 or more, got {recipe.rounds}")
    if recipe.training.objective not in OBJECTIVES:
        raise InputError(f"training.objective: expected one of {list(OBJECTIVES)}, got {recipe.training.objective!r}")
    if recipe.training.base_dtype not in BASE_DTYPES:
        allowed = ", ".join(BASE_DTYPES[:-1]) + f" or {BASE_DTYPES[-1]}"
        raise InputError(f"training.base_dtype must be {allowed}, got {recipe.training.base_dtype!r}")
    if recipe.training.lr_scheduler not in LR_SCHEDULERS:
        raise InputError(f"training.lr_scheduler: expected one of {list(LR_SCHEDULERS)}, "
                         f"got {recipe.training.lr_scheduler!r}")
    if recipe.data.heldout_engine not in REF_ENGINES:
        raise InputError(f"data.heldout_engine: expected one of {list(REF_ENGINES)}, "
                         f"got {recipe.data.heldout_engine!r}")
    if recipe.training.ref_engine not in REF_ENGINES:
        raise InputError(f"training.ref_engine: expected one of {list(REF_ENGINES)}, "
                         f"got {recipe.training.ref_engine!r}")
    if recipe.training.lora_layers is not None and recipe.training.lora_layers < 1:
        raise InputError(f"training.lora_layers: expected 1 or more (the top N layers), or null for every layer, "
                         f"got {recipe.training.lora_layers}")
    if recipe.training.loraplus_ratio < 1:
        raise InputError(f"training.loraplus_ratio: expected 1 (plain LoRA) or more, got {recipe.training.loraplus_ratio}")
    if not recipe.training.max_grad_norm > 0:
        raise InputError(f"training.max_grad_norm: expected a norm above 0, got {recipe.training.max_grad_norm}")
    if recipe.training.keep not in KEEP:
        raise InputError(f"training.keep: expected one of {list(KEEP)}, got {recipe.training.keep!r}")
    if recipe.training.keep == "best" and recipe.training.objective == "sft":
        raise InputError("training.keep: best reads the DPO pair accuracy, which the sft objective does not have; "
                         "use training.keep: last")
    if recipe.training.keep_window < 1:
        raise InputError(f"training.keep_window: expected 1 or more steps, got {recipe.training.keep_window}")
    if not 0 < recipe.training.keep_level <= 1:
        raise InputError(f"training.keep_level: expected a probability in (0, 1], got {recipe.training.keep_level}")
    if not 0 <= recipe.training.adam_beta2 < 1:
        raise InputError(f"training.adam_beta2: expected 0 <= beta2 < 1, got {recipe.training.adam_beta2}")
    source = recipe.warmup.source
    if source not in WARMUP_SOURCES and not source.endswith((".jsonl", ".json")):
        raise InputError(f"warmup.source: expected none, positives or a .jsonl file of judgments, got {source!r}")
    if recipe.warmup.max_examples is not None and recipe.warmup.max_examples < 1:
        raise InputError(f"warmup.max_examples: expected 1 or more, got {recipe.warmup.max_examples}")
    sampling = recipe.sampling
    if sampling.temperature < 0:
        raise InputError(f"sampling.temperature: expected 0 or more, got {sampling.temperature}")
    if sampling.temperature == 0 and (sampling.n_repeats > 1 or sampling.hint_samples > 1):
        raise InputError(
            f"sampling.temperature: 0 means greedy decoding, which gives the same judgment every time, "
            f"so n_repeats={sampling.n_repeats} / hint_samples={sampling.hint_samples} repeats cannot differ "
            "(and transformers refuses several return sequences without sampling). Use a temperature "
            "above 0 (the paper: 1.2), or n_repeats=1 and hint_samples=1"
        )
    if recipe.data.heldout < 0:
        raise InputError(f"data.heldout: expected 0 or more, got {recipe.data.heldout}")
    if recipe.data.task not in DATA_TASKS:
        raise InputError(f"data.task: expected one of {list(DATA_TASKS)}, got {recipe.data.task!r}")
    if sampling.format not in SAMPLING_FORMATS:
        raise InputError(f"sampling.format: expected one of {list(SAMPLING_FORMATS)}, got {sampling.format!r}")
    if sampling.engine not in SAMPLING_ENGINES:
        raise InputError(f"sampling.engine: expected one of {list(SAMPLING_ENGINES)}, got {sampling.engine!r}")
    if sampling.gguf_type not in SAMPLING_GGUF_TYPES:
        raise InputError(f"sampling.gguf_type: expected one of {list(SAMPLING_GGUF_TYPES)}, got {sampling.gguf_type!r}")
    if sampling.top_k < 0:
        raise InputError(f"sampling.top_k: expected 0 (off) or more, got {sampling.top_k}")
    if not str(recipe.prompts.date_string).strip():
        raise InputError("prompts.date_string: empty; give a fixed date such as '26 Jul 2024'")


def recipe_from_dict(raw: dict, source: str = "recipe", overrides: list[str] = ()) -> Recipe:
    raw = apply_overrides(dict(raw or {}), list(overrides))
    try:
        recipe = _build(Recipe, raw, "")
        check_recipe(recipe)
        return recipe
    except InputError as exc:
        raise InputError(f"{source}: {exc}") from None


def load_recipe(path: str | Path | None = None, overrides: list[str] = ()) -> Recipe:
    """Read a recipe YAML (None: all defaults) and apply overrides."""
    if path is None:
        return recipe_from_dict({}, "defaults", overrides)
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: recipe file not found")
    try:
        raw = yaml.safe_load(path.read_text("utf-8")) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise InputError(f"{path}{line}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(raw, dict):
        raise InputError(f"{path}: a recipe is a mapping of sections")
    return recipe_from_dict(raw, str(path), overrides)


def save_recipe(recipe: Recipe, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False, allow_unicode=True), "utf-8")


# ---------------------------------------------------------------- shipped recipes

RECIPES_DIR = Path(__file__).resolve().parent / "recipes"  # package data: conj_lite/recipes/*.yaml


def shipped_recipes() -> list[Path]:
    """The recipes that ship inside the package (what `conj-lite recipes` lists)."""
    return sorted(RECIPES_DIR.glob("*.yaml")) if RECIPES_DIR.is_dir() else []


def find_recipe(value: str | Path | None) -> Path | None:
    """A recipe file from a path, or from a shipped recipe's name: "tiny-cpu",
    "tiny-cpu.yaml" and the pre-0.2 "recipes/tiny-cpu.yaml" all find
    conj_lite/recipes/tiny-cpu.yaml unless a file of that name exists. Anything else
    is returned as a path (load_recipe reports it missing)."""
    if value is None:
        return None
    path = Path(value)
    if path.exists() or path.parent.name not in ("", "recipes") or len(path.parts) > 2:
        return path
    shipped = RECIPES_DIR / (path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml")
    return shipped if shipped.is_file() else path
