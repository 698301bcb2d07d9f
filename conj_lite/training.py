"""Stage S3: DPO on the contrastive pairs plus alpha * SFT on the positive judgments.

The loss is TRL's own: `loss_type=["sigmoid", "sft"]`, `loss_weights=[1, alpha]`.
LoRA comes from peft; with an adapter the reference model is the same network with
the adapter disabled, so no second model sits in memory.

`training.objective` switches the loss for the ablations and the RISE warm-up:
  dpo+sft   Con-J (the default)
  dpo       DPO alone (`loss_type=["sigmoid"]`)
  sft       prompt -> judgment rows, no DPO term: the shared-prompt step with TRL's
            sft loss alone where that step is used (the CPU), else TRL's SFTTrainer
`init_adapter` continues from a trained adapter (RISE stage 2, iterative rounds); TRL
then keeps a frozen copy of it as the DPO reference, so each round is regularised
towards the previous one, not towards the base model.

Paths, chosen once from the recipe and the machine (`models.resolve_runtime`):
  CUDA + unsloth installed   unsloth FastLanguageModel, 4-bit, its gradient checkpointing
  CUDA                       transformers + bitsandbytes NF4 + peft (QLoRA), 8-bit paged AdamW
  CPU                        full-precision LoRA (tiny models)
On cards without bf16 (T4, P100) training runs in fp16, elsewhere in bf16; either way
the trainable LoRA weights are kept in fp32 (`keep_trainable_fp32`): TRL 1.x casts them
to bf16 for quantized models, which fp16 loss scaling cannot handle and where small
updates are rounded away.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from .artifacts import TRAIN_META
from .config import LR_SCHEDULERS, Recipe, save_recipe
from .errors import InputError
from .frame import frame_head, verdict_only_head
from .jsonio import iter_jsonl_objects, staged_dir
from .models import Runtime, import_unsloth_first, load_causal_lm, load_tokenizer, resolve_runtime
from .progress import stage_progress
from .system import trim_heap
from .prompts import JudgeTemplate, check_chat_template, load_template, render_prompt


PAIR_FIELDS = ("prompt", "chosen", "rejected")
SFT_FIELDS = ("prompt", "completion")


def read_pairs_file(path: str | Path, required: tuple[str, ...] = PAIR_FIELDS) -> list[dict]:
    """Training rows from a JSONL file, each with the `required` fields."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: training file not found; run `conj-lite filter` first")
    rows = []
    for where, row in iter_jsonl_objects(path):
        missing = [k for k in required if k not in row]
        if missing:
            raise InputError(f"{where}: missing {missing}")
        rows.append(row)
    return rows


def judgment_head(template: JudgeTemplate) -> str:
    """The start of every judgment in the frame, which the grammar writes, not the model:
    `{"rationale": "`, or `{"better_answer": ` verdict-only."""
    return frame_head(template) if template.rationale else verdict_only_head(template)


def turn_end(tokenizer) -> str:
    """What the chat template writes after an assistant reply, up to its EOS token
    (ChatML: `<|im_end|>`); TRL adds the EOS itself when the text lacks it."""
    sentinel = "\u2063conj-lite\u2063"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "q"}, {"role": "assistant", "content": sentinel}],
                                         tokenize=False)
    end = text[text.index(sentinel) + len(sentinel):]
    eos = tokenizer.eos_token or ""
    return end[: end.index(eos) + len(eos)] if eos and eos in end else end.rstrip()


def frame_rows(rows: list[dict], tokenizer, template: JudgeTemplate, fields: tuple[str, ...]) -> list[dict] | None:
    """TRL text rows whose prompt ends with the judgment's fixed head, so that training
    spends itself on what the model chooses (the rationale and the verdict), never on the
    frame the grammar writes at sampling and judging time. Verdict-only, chosen and
    rejected are then the verdict token and the turn's end: the DPO term and the SFT
    term act on the verdict alone, and the prompt is exactly what the verdict-mode judge
    reads P(1) vs P(2) after. None for judgments with a rationale, and when some judgment
    does not start with the head (free-form samples): those train as chat rows, the whole
    judgment as the completion, as the rationale-mode judge writes it. (Measured on the
    synthetic learnability check, seed 0: the rationale judge reached 69% held-out with the
    head in the prompt, 97.5% with chat rows.)"""
    if template.rationale:
        return None
    head = judgment_head(template)
    if not all(str(row[k]).startswith(head) for row in rows for k in fields):
        return None
    end = turn_end(tokenizer)
    bos = tokenizer.bos_token
    strip_bos = bool(bos) and tokenizer("x").input_ids[:1] == [tokenizer.bos_token_id]  # TRL tokenizes with it
    out = []
    for row in rows:
        prompt = render_prompt(tokenizer, row["prompt"], head)
        if strip_bos and prompt.startswith(bos):
            prompt = prompt[len(bos):]
        out.append({"prompt": prompt, **{k: row[k][len(head):] + end for k in fields}})
    return out


def to_preference_rows(pairs: list[dict]) -> list[dict]:
    """TRL's conversational preference format: the chat template renders prompt and
    judgment exactly as the sampler and the judge do."""
    return [
        {
            "prompt": p["prompt"],
            "chosen": [{"role": "assistant", "content": p["chosen"]}],
            "rejected": [{"role": "assistant", "content": p["rejected"]}],
        }
        for p in pairs
    ]


def to_sft_rows(rows: list[dict]) -> list[dict]:
    """TRL's conversational prompt-completion format (the loss is on the completion)."""
    return [{"prompt": r["prompt"], "completion": [{"role": "assistant", "content": r["completion"]}]} for r in rows]


def training_order(rows: list[dict], seed: int, passes: int = 1) -> list[int]:
    """Row indices in the order training visits them: the rows of one pair side by side,
    its answer orders alternating, the pairs in a seeded order drawn anew for each pass.
    Taken in sequence, a step of an even number of rows holds both orders of its pairs,
    so the step's push on "answer 1 vs answer 2" cancels unless the answers earn it. (A
    shuffled step of 4 rows is often mostly one order: training then mostly moves the
    model's position prior, which is what SmolLM2 runs did.)"""
    groups: dict[str, dict[str, list[int]]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(str(row.get("id", i)), {}).setdefault(str(row.get("order", "")), []).append(i)
    out = []
    for n in range(passes):
        ids = sorted(groups)
        random.Random(f"{seed}|{n}").shuffle(ids)
        for pair_id in ids:
            by_order = [groups[pair_id][order] for order in sorted(groups[pair_id])]
            for k in range(max(map(len, by_order))):
                out += [rows_of_order[k] for rows_of_order in by_order if k < len(rows_of_order)]
    return out


def passes_needed(n_rows: int, recipe: Recipe) -> int:
    """Whole passes over the rows that the recipe's epochs or max_steps take."""
    t = recipe.training
    if t.max_steps > 0:
        return max(1, math.ceil(t.max_steps * t.batch_size * t.grad_accum / max(1, n_rows)))
    return max(1, math.ceil(t.epochs))


def keep_trainable_fp32(model) -> int:
    """Undo TRL's bf16 cast of the trainable (LoRA) parameters of a quantized model.

    fp16 loss scaling cannot handle bf16 weights, and in bf16 many updates at lr 5e-5
    fall below half an ulp of the weight and are lost; fp32 weights keep them (autocast
    still computes in 16 bits). Returns how many parameters were cast."""
    import torch

    count = 0
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
            count += 1
    return count


def lora_layers(recipe: Recipe, num_layers: int) -> list[int] | None:
    """The decoder layers that get LoRA (training.lora_layers: the top N), None for all."""
    n = recipe.training.lora_layers  # 1 or more: check_recipe
    return None if n is None or n >= num_layers else list(range(num_layers - n, num_layers))


def lora_config(recipe: Recipe, num_layers: int):
    from peft import LoraConfig

    t = recipe.training
    return LoraConfig(
        r=t.lora_r,
        lora_alpha=t.lora_alpha,
        lora_dropout=t.lora_dropout,
        target_modules=list(t.target_modules),
        layers_to_transform=lora_layers(recipe, num_layers),
        use_rslora=t.use_rslora,
        bias="none",
        task_type="CAUSAL_LM",
    )


def load_for_training(base: str, recipe: Recipe, runtime: Runtime, init_adapter: str | Path | None = None):
    """(model, tokenizer, peft_config, gradient_checkpointing): peft_config is None when
    the model already has its LoRA (unsloth, or a trained adapter to continue from)."""
    t = recipe.training
    gradient_checkpointing = runtime.device == "cuda" if t.gradient_checkpointing is None else t.gradient_checkpointing
    if runtime.use_unsloth:
        from unsloth import FastLanguageModel

        model, tokenizer = FastLanguageModel.from_pretrained(
            model_name=str(init_adapter or base),  # an adapter dir loads its base with the adapter trainable
            max_seq_length=recipe.model.max_seq_length,
            dtype=runtime.torch_dtype,
            load_in_4bit=runtime.load_in_4bit,
        )
        if init_adapter is not None:
            FastLanguageModel.for_training(model)
            tokenizer.padding_side = "left"
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
            return model, tokenizer, None, False
        model = FastLanguageModel.get_peft_model(
            model,
            r=t.lora_r,
            lora_alpha=t.lora_alpha,
            lora_dropout=t.lora_dropout,
            target_modules=list(t.target_modules),
            layers_to_transform=lora_layers(recipe, model.config.num_hidden_layers),
            use_rslora=t.use_rslora,
            use_gradient_checkpointing="unsloth" if gradient_checkpointing else False,
            random_state=t.seed,
        )
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return model, tokenizer, None, False  # unsloth handles checkpointing itself
    tokenizer = load_tokenizer(base, recipe.model.trust_remote_code)
    model = load_causal_lm(base, recipe.model, runtime, weights=base_dtype(recipe, runtime))
    # Only the LoRA weights train; the base stays as loaded. Not peft's
    # prepare_model_for_kbit_training: it casts every 16-bit weight that is not 4-bit
    # (embeddings, an untied LM head, norms) to fp32, +2 GiB on Qwen2.5-7B, more than a T4
    # has to spare. Gradient checkpointing (use_reentrant=False, transformers' default) and
    # the input gradients it needs are enabled by the trainer (`gradient_checkpointing`).
    model.requires_grad_(False)
    if init_adapter is not None:
        from peft import PeftModel

        check_adapter_dir(init_adapter)
        model = PeftModel.from_pretrained(model, str(init_adapter), is_trainable=True)
        return model, tokenizer, None, gradient_checkpointing
    return model, tokenizer, lora_config(recipe, model.config.num_hidden_layers), gradient_checkpointing


def base_dtype(recipe: Recipe, runtime: Runtime) -> str:
    """The dtype of the frozen base weights while training (training.base_dtype).

    auto: fp32 unless the base is loaded in 4-bit. With 16-bit weights every layer's
    output and the residual stream are rounded to 8 (bf16) or 11 (fp16) bits of
    mantissa: on SmolLM2-135M (relevance, 1,024 examples) training on bf16 weights never
    left the plateau in 3 seeds, where fp32 weights learned (docs/benchmarks.md, "bf16
    kept the judge on its plateau"). Autocast still computes the matmuls in the compute dtype (model.dtype), as
    fast as bf16 weights on the CPU; the fp32 copy costs 2 bytes a parameter more
    (`compute` keeps the 16-bit weights, e.g. for a large unquantized model on a GPU).
    A 4-bit base computes in the compute dtype whatever this says."""
    choice = recipe.training.base_dtype
    if choice == "compute":
        return runtime.dtype
    if choice == "auto":
        return runtime.dtype if runtime.load_in_4bit else "fp32"
    return choice  # bf16, fp16 or fp32: config.check_recipe refuses anything else


def check_adapter_dir(path: str | Path) -> None:
    if not (Path(path) / "adapter_config.json").is_file():
        raise InputError(f"{path}: not a LoRA adapter directory (no adapter_config.json) to continue training from")


def loss_terms(objective: str, alpha: float) -> tuple[list[str], list[float]]:
    """TRL's DPO `loss_type` and `loss_weights` for an objective."""
    if objective == "dpo+sft":
        return ["sigmoid", "sft"], [1.0, alpha]
    if objective == "dpo":
        return ["sigmoid"], [1.0]
    if objective == "sft":  # the shared-prompt step only; elsewhere SFTTrainer trains it
        return ["sft"], [1.0]
    raise ValueError(f"objective {objective!r} is not trained with DPOTrainer")


def uses_shared_prompt(recipe: Recipe, runtime: Runtime) -> bool:
    """Whether each pair trains as one row with its prompt once (conj_lite/shared_prompt.py):
    training.shared_prompt, by default on without CUDA; never with unsloth, whose patched
    attention takes no block mask. With objective sft the row is prompt | judgment and
    logits are made only where the judgment's tokens are predicted (SFTTrainer makes the
    whole vocabulary's at every prompt position)."""
    if runtime.use_unsloth:
        return False
    choice = recipe.training.shared_prompt
    return runtime.device != "cuda" if choice is None else bool(choice)


def resolve_ref_engine(recipe: Recipe, runtime: Runtime, base: str) -> str | None:
    """What computes the DPO reference's log-probabilities (training.ref_engine): None
    for the SFT objective, which has no reference; auto takes llama.cpp
    (conj_lite/reference.py) with the shared-prompt step on a CPU when llama-cpp-python
    is installed and the model has a GGUF or a directory to convert, TRL otherwise."""
    if recipe.training.objective == "sft":
        return None
    choice = recipe.training.ref_engine
    if choice == "llama.cpp" and not uses_shared_prompt(recipe, runtime):
        raise InputError("training.ref_engine=llama.cpp hands its log-probabilities to the shared-prompt step; set "
                         "training.shared_prompt=true (not with unsloth), or training.ref_engine=transformers")
    if choice == "auto" and not uses_shared_prompt(recipe, runtime):
        return "transformers"
    from .engines import gguf_engine

    return gguf_engine(choice, base)


REFERENCE_LOGPS = "reference_logps-{name}.json"  # in a training's directory: the llama.cpp reference, kept


def llama_cpp_reference(base: str, init_adapter, recipe: Recipe, console=None, out_dir: Path | None = None):
    """(reference_logps(dataset, max_length), what it reads): the reference on llama.cpp,
    the policy as training finds it (the base, and the adapter training continues from),
    as GGUFs made once and cached (engines.policy_gguf). With `out_dir`, the results are
    kept there for a resumed training."""
    from .engines import policy_gguf
    from .reference import cached_logps, llama_cpp_reference_logps, rows_key

    gguf, lora, files = policy_gguf(base, Path(init_adapter) if init_adapter else None, recipe, console,
                                    setting="training.ref_engine", instead="compute the reference with TRL")

    reads = {"engine": "llama.cpp", "gguf": str(gguf), "lora": str(lora) if lora else None, **files}

    def reference_logps(dataset, max_length, name="train"):
        def compute():
            return llama_cpp_reference_logps(gguf, lora, dataset, max_length, console)

        if out_dir is None:
            return compute()
        path = out_dir / REFERENCE_LOGPS.format(name=name)  # the training rows, the measured ones apart
        return cached_logps(path, rows_key(dataset, max_length, files), compute)

    return reference_logps, reads


def visited_rows(n_rows: int, recipe: Recipe) -> int:
    """How many rows of a sequentially visited training set max_steps reaches (all of
    them without max_steps): rows past it are never trained on, so nothing is computed
    for them (the reference's log-probabilities, above all)."""
    t = recipe.training
    if t.max_steps <= 0:
        return n_rows
    return min(n_rows, t.max_steps * t.batch_size * t.grad_accum)


CPU_PAD_MULTIPLE = 64


def pad_multiple(recipe: Recipe, runtime: Runtime) -> int | None:
    """training.pad_to_multiple_of, by default 64 without CUDA. A CPU step allocates its
    tensors at each batch's length: with every length new, oneDNN builds and caches new
    matmul primitives and glibc keeps the freed buffers of each size resident, so a run's
    memory climbs with every new length (SmolLM2, 24 demo steps: 2.9 GB and rising; padded
    to 64, flat at 2.3 GB at about the same speed, docs/benchmarks.md)."""
    choice = recipe.training.pad_to_multiple_of
    if choice is not None:
        return choice if choice > 1 else None
    return None if runtime.device == "cuda" else CPU_PAD_MULTIPLE


def trainer_config(recipe: Recipe, runtime: Runtime, out_dir: Path, gradient_checkpointing: bool):
    """DPOConfig for the DPO objectives, SFTConfig for `sft`; the same schedule for both."""
    t = recipe.training
    optim = t.optim
    if optim == "auto":
        optim = "paged_adamw_8bit" if runtime.load_in_4bit else "adamw_torch"
    if t.objective == "sft" and not uses_shared_prompt(recipe, runtime):
        from trl import SFTConfig

        specific = dict(completion_only_loss=True, packing=False)
        config_class = SFTConfig
    else:
        from trl import DPOConfig

        loss_type, loss_weights = loss_terms(t.objective, t.alpha)
        specific = dict(loss_type=loss_type, loss_weights=loss_weights, beta=t.beta,
                        precompute_ref_log_probs=t.precompute_ref and "sigmoid" in loss_type,  # sft: no reference
                        precompute_ref_batch_size=t.ref_batch_size)
        config_class = DPOConfig
    return config_class(
        output_dir=str(out_dir / "checkpoints"),
        **specific,
        learning_rate=t.learning_rate,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=max(1, t.batch_size),
        gradient_accumulation_steps=t.grad_accum,
        gradient_checkpointing=gradient_checkpointing,
        optim=optim,
        warmup_steps=t.warmup_ratio,
        adam_beta2=t.adam_beta2,
        max_grad_norm=t.max_grad_norm,
        lr_scheduler_type=LR_SCHEDULERS[t.lr_scheduler],
        bf16=runtime.dtype == "bf16",
        fp16=runtime.dtype == "fp16",
        use_cpu=runtime.device == "cpu",
        max_length=recipe.model.max_seq_length,
        pad_to_multiple_of=pad_multiple(recipe, runtime),
        logging_steps=t.logging_steps,
        save_steps=t.save_steps,
        save_total_limit=2,
        seed=t.seed,
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
    )


TRIM_EVERY = 8  # training steps between handing the CPU heap's free pages back (system.trim_heap)


def rich_callback(console=None):
    """A TrainerCallback that shows a rich progress bar and keeps the log history."""
    from transformers import TrainerCallback

    class RichProgress(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self._ctx = stage_progress("training", console, unit="steps")
            self.progress = self._ctx.__enter__()
            self.task = self.progress.add_task(
                "steps", total=state.max_steps, completed=state.global_step, resumed=state.global_step
            )

        def on_step_end(self, args, state, control, **kwargs):
            self.progress.update(self.task, completed=state.global_step)
            if args.use_cpu and state.global_step % TRIM_EVERY == 0:
                trim_heap()  # batches of new lengths grow the heap; every step would cost ~15% time

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                margin = logs.get("rewards/margins")
                text = f"loss {logs['loss']:.4f}"
                if margin is not None:
                    text += f" margin {margin:.3f} acc {logs.get('rewards/accuracies', 0):.2f}"
                self.progress.update(self.task, status=text)

        def on_train_end(self, args, state, control, **kwargs):
            self._ctx.__exit__(None, None, None)

    return RichProgress()


def best_window(accuracies: list[float], window: int) -> tuple[int, float] | None:
    """(end, mean) of the `window` consecutive logged steps with the highest mean pair
    accuracy, `end` the position of its last step (the latest window on ties); None while
    fewer steps are logged. Each step's accuracy is of pairs judged before that step trained
    on them: on the demo's plateau a judge that only prefers one answer position scores
    exactly 0.5 (one order of each pair right), and more once the answers count."""
    best = None
    for end in range(window - 1, len(accuracies)):
        mean = sum(accuracies[end - window + 1:end + 1]) / window
        if best is None or mean >= best[1]:
            best = (end, mean)
    return best


def chance_bar(n: int, level: float) -> float:
    """The lowest pair accuracy over `n` examples that a judge who guesses (each example right
    with probability 1/2, one-sided binomial) reaches with probability at most `level`; above
    1 when `n` examples are too few to show a judge beyond chance, 0 for level 1. Over the
    demo's windows (8 steps of 4 examples) it is 22 of 32, 0.6875: on HH, whose runs stayed on
    their plateau, the best windows were 0.5625-0.625, noise that picked steps 22 and 62 of 160."""
    if level >= 1:
        return 0.0
    tail = 0.0
    for k in range(n, -1, -1):
        tail += math.comb(n, k) / 2 ** n
        if tail > level:
            return (k + 1) / n
    return 0.0


def examples_per_log(args) -> int:
    """The training examples behind one logged step's pair accuracy."""
    return args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size * args.logging_steps


KEEP_METRIC = "rewards/accuracies"


def logged_accuracies(log_history: list[dict]) -> list[tuple[int, float]]:
    """(step, pair accuracy) of each logged training step."""
    return [(entry["step"], entry[KEEP_METRIC]) for entry in log_history if "loss" in entry and KEEP_METRIC in entry]


def kept_step(directory: Path) -> int | None:
    """The step whose adapter keep_best_callback saved in `directory` (kept.json), None if none."""
    try:
        return json.loads((directory / "kept.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return None


def keep_best_callback(directory: Path, window: int):
    """A TrainerCallback that saves the adapter to `directory` after each step that ends the best
    window so far (best_window), with kept.json saying which step it is."""
    import shutil

    from transformers import TrainerCallback

    class KeepBest(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            step = kept_step(directory)
            if step is not None and step > state.global_step:  # saved past the checkpoint resumed from
                shutil.rmtree(directory, ignore_errors=True)

        def on_log(self, args, state, control, logs=None, model=None, **kwargs):
            if not (state.is_world_process_zero and logs and KEEP_METRIC in logs and "loss" in logs):
                return
            logged = logged_accuracies(state.log_history)
            best = best_window([acc for _, acc in logged], window)
            if best is None or best[0] != len(logged) - 1:
                return
            with staged_dir(directory) as staging:
                model.save_pretrained(str(staging), selected_adapters=["default"])
                (staging / "kept.json").write_text(json.dumps({"step": state.global_step, "window": window,
                                                               "window_accuracy": best[1]}))

    return KeepBest()


def restore_best(trainer, directory: Path, window: int, level: float) -> dict:
    """Load the kept adapter (keep_best_callback) into the trainer's model when it is the best
    window's of this training's log and that window's pair accuracy is beyond chance
    (chance_bar at `level`); what was kept, for the summary."""
    logged = logged_accuracies(trainer.state.log_history)
    best = best_window([acc for _, acc in logged], window)
    last = {"rule": "last", "step": trainer.state.global_step}
    if best is None:
        return {**last, "why": f"fewer than {window} steps logged"}
    step, accuracy = logged[best[0]][0], round(best[1], 4)
    final = round(sum(acc for _, acc in logged[-window:]) / window, 4)
    if step == logged[-1][0] or kept_step(directory) != step:
        return {**last, "window_accuracy": final, "best_step": step, "best_window_accuracy": accuracy}
    n = window * examples_per_log(trainer.args)
    bar = chance_bar(n, level)
    if best[1] < bar - 1e-9:
        return {**last, "window_accuracy": final, "best_step": step, "best_window_accuracy": accuracy,
                "why": f"no window beat chance: the best, {accuracy:.3f} after step {step}, is under the "
                       f"{bar:.3f} a judge that guesses reaches over {n} examples with probability {level:g}"}
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(trainer.model, load_file(directory / "adapter_model.safetensors"))
    return {"rule": "best", "step": step, "window_accuracy": accuracy, "last_step": logged[-1][0],
            "last_window_accuracy": final}


def kept_text(kept: dict | None) -> str:
    """What training.keep handed on, for the stage's line ("" when it kept the last step as asked)."""
    if not kept:
        return ""
    if kept["rule"] == "best":
        return (f"; kept the adapter after step {kept['step']} of {kept['last_step']} (pair accuracy "
                f"{kept['window_accuracy']:.3f} over its window, the last window's {kept['last_window_accuracy']:.3f})")
    if "why" in kept:
        return f"; kept the last step's adapter ({kept['why']})"
    return f"; kept the last step's adapter (its window's pair accuracy {kept['window_accuracy']:.3f} was the best)"


@dataclass
class TrainSummary:
    adapter_dir: Path
    steps: int
    seconds: float
    before: dict
    after: dict
    path: str  # "unsloth", "qlora", "lora"
    objective: str = "dpo+sft"
    init_adapter: str | None = None
    last_steps: dict = field(default_factory=dict)  # the mean of the last logged steps' measures
    reference: dict | None = None  # what computed the DPO reference's log-probabilities (None: no reference)
    kept: dict | None = None  # training.keep: which step's adapter was handed on, and why

    def to_dict(self) -> dict:
        return {
            "adapter_dir": str(self.adapter_dir),
            "steps": self.steps,
            "seconds": round(self.seconds, 2),
            "path": self.path,
            "objective": self.objective,
            "init_adapter": self.init_adapter,
            "before": self.before,
            "after": self.after,
            "last_steps": self.last_steps,
            "reference": self.reference,
            "kept": self.kept,
        }


METRIC_NAMES = {
    "dpo": (("loss", "loss"), ("margin", "rewards/margins"), ("accuracy", "rewards/accuracies")),
    "sft": (("loss", "loss"), ("token_accuracy", "mean_token_accuracy")),
}


def pair_metrics(trainer, dataset, objective: str = "dpo+sft") -> dict:
    """On `dataset`, with the current adapter: DPO loss, reward margin and pair accuracy
    (DPO objectives), or SFT loss and token accuracy (`sft`)."""
    metrics = trainer.evaluate(eval_dataset=dataset, metric_key_prefix="pairs")
    out = {}
    for name, suffix in METRIC_NAMES["sft" if objective == "sft" else "dpo"]:
        # TRL logs its own metrics as eval_*, transformers' loss under the prefix.
        for key in (f"pairs_{suffix}", f"eval_{suffix}"):
            if key in metrics:
                out[name] = round(float(metrics[key]), 5)
                break
    return out


def eval_subset(dataset, n: int, seed: int):
    """A seeded sample of at most n training rows, measured before and after training
    (None for n <= 0). Every row evaluated costs a forward pass of policy and reference."""
    n = min(len(dataset), max(0, n))
    return dataset.shuffle(seed=seed).select(range(n)) if n else None


def train_adapter(recipe: Recipe, base: str, pairs_path: str | Path, out_dir: str | Path, console=None, *,
                  init_adapter: str | Path | None = None) -> TrainSummary:
    """Train the LoRA judge adapter into `out_dir/adapter`, resuming from checkpoints.

    `pairs_path` holds DPO pairs (prompt, chosen, rejected), or for `objective: sft`
    prompt -> completion rows. `init_adapter` continues from a trained adapter."""
    out_dir = Path(out_dir)
    objective = recipe.training.objective
    runtime = resolve_runtime(recipe.model)
    import_unsloth_first(runtime)  # before trl
    import datasets
    from datasets import Dataset
    from transformers.trainer_utils import get_last_checkpoint

    datasets.disable_progress_bars()
    sft = objective == "sft"
    pairs = read_pairs_file(pairs_path, SFT_FIELDS if sft else PAIR_FIELDS)
    if not pairs:
        if sft:
            raise InputError(f"{pairs_path}: no judgments to fine-tune on (no positive judgments were found)")
        raise InputError(
            f"{pairs_path}: no DPO pairs to train on. The base model never produced both a right and a wrong "
            "judgment for the same example; sample more (sampling.n_repeats), use more data, or check stats.json"
        )
    model, tokenizer, peft_config, gradient_checkpointing = load_for_training(base, recipe, runtime, init_adapter)
    # The chat template must render the prompt alone as a prefix of prompt + judgment, or
    # TRL starts the completion where they part (Mistral v0.3, Gemma 2): fold the system
    # text when needed, and pin the date templates print (Llama 3.x).
    chat = check_chat_template(tokenizer, load_template(recipe.prompts.template), recipe.prompts.date_string)
    template = replace(load_template(recipe.prompts.template), rationale=recipe.filtering.rationale)
    rows = frame_rows(pairs, tokenizer, template, SFT_FIELDS[1:] if sft else PAIR_FIELDS[1:])
    if rows is None:
        rows = [chat.training_row(row) for row in (to_sft_rows(pairs) if sft else to_preference_rows(pairs))]
    shared = uses_shared_prompt(recipe, runtime)
    if sft and shared:  # TRL's preference rows; the SFT term alone never reads `rejected`
        rows = [{**{k: v for k, v in row.items() if k != "completion"}, "chosen": row["completion"],
                 "rejected": row["completion"]} for row in rows]
    dataset = Dataset.from_list(rows)
    args = trainer_config(recipe, runtime, out_dir, gradient_checkpointing)
    train_set = dataset
    if recipe.training.orders_together:
        passes = passes_needed(len(pairs), recipe)
        order = training_order(pairs, recipe.training.seed, passes)
        train_set = dataset.select(order[:visited_rows(len(order), recipe)])
        args.train_sampling_strategy = "sequential"
        args.num_train_epochs = recipe.training.epochs / passes  # the passes are in train_set
    extra, engine = {}, resolve_ref_engine(recipe, runtime, base)
    reference = None if engine is None else {"engine": engine}  # the SFT objective has no reference
    if engine == "llama.cpp":
        extra["reference_logps"], reference = llama_cpp_reference(base, init_adapter, recipe, console, out_dir)
        args.precompute_ref_log_probs = True  # the trainer reads the rows' ref_*_logps
    if shared:
        from conj_lite.shared_prompt import make_trainer_class

        trainer_class = make_trainer_class()
    elif sft:
        from trl import SFTTrainer as trainer_class
    else:
        from trl import DPOTrainer as trainer_class
    best_dir = Path(args.output_dir) / "best"
    keeping = [keep_best_callback(best_dir, recipe.training.keep_window)] if recipe.training.keep == "best" else []
    # TRL builds the LoRA from peft_config before Trainer.__init__ seeds torch: seed it here, or the
    # adapter's initial A comes from whatever the process drew before (two runs of a seed differed).
    from transformers import set_seed

    set_seed(recipe.training.seed)
    trainer = trainer_class(
        model=model,
        args=args,
        train_dataset=train_set,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[rich_callback(console)] + keeping,
        **extra,
    )
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # the rich bar reports instead
    if recipe.training.loraplus_ratio != 1:
        trainer.optimizer = loraplus_optimizer(trainer, recipe.training.loraplus_ratio)
    if runtime.dtype in ("fp16", "bf16"):
        keep_trainable_fp32(trainer.model)

    eval_set = eval_subset(dataset, recipe.training.eval_pairs, recipe.training.seed)
    checkpoint = get_last_checkpoint(args.output_dir) if Path(args.output_dir).is_dir() else None
    before = pair_metrics(trainer, eval_set, objective) if checkpoint is None and eval_set else {}
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=checkpoint)
    seconds = time.perf_counter() - start
    kept = restore_best(trainer, best_dir, recipe.training.keep_window, recipe.training.keep_level) if keeping else None
    after = pair_metrics(trainer, eval_set, objective) if eval_set else {}

    adapter_dir = out_dir / "adapter"
    path = "unsloth" if runtime.use_unsloth else ("qlora" if runtime.load_in_4bit else "lora")
    summary = TrainSummary(adapter_dir, result.global_step, seconds, before, after, path, objective,
                           None if init_adapter is None else str(init_adapter),
                           last_steps_mean(trainer.state.log_history, objective), reference, kept)
    # Under `accelerate launch` every process gets here; only the main one writes.
    trainer.accelerator.wait_for_everyone()
    if trainer.accelerator.is_main_process:
        write_adapter(trainer, tokenizer, recipe, runtime, base, pairs, summary, out_dir)
    trainer.accelerator.wait_for_everyone()
    return summary


def loraplus_optimizer(trainer, ratio: float):
    """The optimizer the trainer would make (its class and settings), with LoRA+'s
    parameter groups (peft's create_loraplus_optimizer): the B matrices, which start at
    zero, at `ratio` x the learning rate. The trainer keeps an optimizer it is given, and
    its schedule scales every group alike."""
    from peft.optimizers import create_loraplus_optimizer

    optimizer_cls, kwargs = trainer.get_optimizer_cls_and_kwargs(trainer.args, trainer.model)
    lr = kwargs.pop("lr", trainer.args.learning_rate)
    return create_loraplus_optimizer(trainer.model, optimizer_cls, lr=lr, loraplus_lr_ratio=ratio,
                                     loraplus_weight_decay=trainer.args.weight_decay, **kwargs)


def last_steps_mean(log_history: list[dict], objective: str, n: int = 8) -> dict:
    """The mean of the training measures (METRIC_NAMES: loss, and reward margin and pair
    accuracy or token accuracy) over the last `n` logged steps: what the batches said
    at the end when no evaluation pairs are set aside (training.eval_pairs: 0)."""
    names = METRIC_NAMES["sft" if objective == "sft" else "dpo"]
    logged = [entry for entry in log_history if "loss" in entry][-n:]
    out = {}
    for name, key in names:
        values = [entry[key] for entry in logged if isinstance(entry.get(key), (int, float))]
        if values:
            out[name] = sum(values) / len(values)
    return out


def write_adapter(trainer, tokenizer, recipe, runtime, base, pairs, summary, out_dir: Path) -> None:
    """adapter/ with weights, tokenizer, training meta and recipe, written atomically."""
    history = [
        {k: v for k, v in entry.items()
         if k in ("step", "loss", "rewards/margins", "rewards/accuracies", "mean_token_accuracy", "learning_rate")}
        for entry in trainer.state.log_history
        if "loss" in entry
    ]
    meta = {
        "base_model": base,
        "load_in_4bit": runtime.load_in_4bit,
        "dtype": runtime.dtype,
        "base_dtype": None if runtime.load_in_4bit or runtime.use_unsloth else base_dtype(recipe, runtime),
        "template": recorded_template(recipe),
        "chat_date": recipe.prompts.date_string,
        "objective": recipe.training.objective,
        "shared_prompt": uses_shared_prompt(recipe, runtime),
        "pad_to_multiple_of": pad_multiple(recipe, runtime),
        "init_adapter": summary.init_adapter,
        "pairs": len(pairs),
        "summary": summary.to_dict(),
        "history": history,
    }
    with staged_dir(out_dir / "adapter") as staging:
        # Only the trained adapter: TRL's frozen "ref" copy (when continuing) is not the judge.
        trainer.model.save_pretrained(str(staging), selected_adapters=["default"])
        tokenizer.save_pretrained(str(staging))
        (staging / TRAIN_META).write_text(json.dumps(meta, indent=2))
        save_recipe(recipe, staging / "recipe.yaml")


def recorded_template(recipe: Recipe) -> dict:
    """The judge template as recorded with an adapter: the wording and the judgment format
    this training taught (verdict-only when filtering.rationale is off)."""
    return {**load_template(recipe.prompts.template).to_dict(), "rationale": bool(recipe.filtering.rationale)}
