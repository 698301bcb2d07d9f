"""A synthetic pairwise task with a decidable right answer, and the learnability check
that proves one Con-J round teaches a judge something it did not know.

The task. Each question states a fact and asks whether it is true; the right answer
confirms it, the wrong one contradicts it, in the same words otherwise:

    question  "Mira has 7 lamps. Is that true?"
    right     "Yes, Mira has 7 lamps."
    wrong     "No, Mira does not have 7 lamps."     (wrong="negation", the default)

or, harder, asks the fact back and the wrong answer states another value:

    question  "Mira has 7 lamps. How many lamps does Mira have?"
    right     "Mira has 7 lamps."
    wrong     "Mira has 4 lamps."                   (wrong="value")

Position and length say nothing about the label (the right answer is in slot A for
exactly half of the pairs). The "value" variant needs the judge to compare two tokens
across the prompt, which the 2.6M-parameter tiny model does not learn at CPU scale
(300 steps of full fine-tuning stay at 50%); the contradiction it learns in about a
hundred LoRA steps.

The check (`learnability_check`):
  1. base judge: the default tiny model, warmed up further on the task's prompts so
     that it writes the judgment format, follows hints, and on plain prompts always
     picks answer 1: a confident, position-biased judge at chance (50%), like many
     small instruct models. Its repeated samples rarely disagree, so the contrastive
     pairs have to come from hint-driven sampling, as Con-J intends.
  2. one Con-J round through the real pipeline (`ConjRun`: sample -> filter -> train)
     on a synthetic training set;
  3. `conj_lite.judging.evaluate` before and after on held-out pairs (no held-out
     question occurs in training).
Two controls prove the check can fail: "swapped" trains with chosen and rejected
swapped, "hint_lost" loses the hint (the reference release's chat-template bug: the
hint never reaches the model). Every named variant of `conj_lite.variants` (RISE,
iterative rounds, the Con-J ablations) runs through the same check for
benchmarks/variants.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from . import sampling
from .data import PreferencePair, write_pairs_jsonl
from .errors import InputError
from .export import merge_adapter
from .jsonio import read_jsonl, staged_dir, write_jsonl
from .judging import evaluate, open_judge
from .pipeline import ConjRun
from .prompts import JudgeTemplate, build_messages, hint_prefix, judge_verdict_json, ordered_answers
from .tiny import TinyModelSpec, cache_root, tiny_model_path, warm_up
from .variants import VARIANTS as NAMED_VARIANTS
from .variants import variant_overrides

NAMES = ("Mira", "Tom", "Ana", "Leo", "Sara", "Ivan", "Nia", "Omar", "Kai", "Eva", "Ben", "Lin", "Raj", "Zoe",
         "Max", "Ida", "Yuki", "Paul", "Rosa", "Amir", "Lena", "Hugo", "Tara", "Finn")
THINGS = ("lamps", "books", "cats", "coins", "boats", "keys")
COUNTS = tuple(str(n) for n in range(2, 10))
OBJECTS = ("door", "car", "kite", "cup", "hat", "bag", "ball", "box", "bike", "lamp", "shoe", "coat", "sofa",
           "vase", "pen", "flag", "tent", "ring", "drum", "bowl", "desk", "fence", "boat", "mug")
COLORS = ("red", "blue", "green", "black", "white", "pink", "gray", "brown", "yellow", "purple")
CITIES = ("Rome", "Oslo", "Lima", "Cairo", "Seoul", "Dublin", "Quito", "Perth", "Lagos", "Paris", "Delhi", "Tokyo")
WRONG_KINDS = ("negation", "value")


@dataclass(frozen=True)
class FactFamily:
    """One kind of fact: how to state it, ask it back, answer it, and contradict it."""

    name: str
    values: tuple[str, ...]
    fact: str  # "{name} has {value} {things}."
    ask: str
    answer: str
    negated: str

    def subject(self, rng: random.Random) -> dict:
        if self.name == "count":
            return {"name": rng.choice(NAMES), "things": rng.choice(THINGS)}
        if self.name == "color":
            return {"object": rng.choice(OBJECTS)}
        return {"name": rng.choice(NAMES)}

    def render(self, rng: random.Random, wrong: str = "negation") -> tuple[str, str, str]:
        """(question, right answer, wrong answer)."""
        subject = self.subject(rng)
        value, other = rng.sample(self.values, 2)
        fact = self.fact.format(value=value, **subject)
        right = self.answer.format(value=value, **subject)
        if wrong == "negation":
            negated = self.negated.format(value=value, **subject)
            return f"{fact} Is that true?", f"Yes, {_lower_first(right)}", f"No, {_lower_first(negated)}"
        return f"{fact} {self.ask.format(**subject)}", right, self.answer.format(value=other, **subject)


def _lower_first(text: str) -> str:
    """"The cup is red." -> "the cup is red."; names keep their capital."""
    return "t" + text[1:] if text.startswith("The ") else text


FAMILIES = (
    FactFamily("count", COUNTS, "{name} has {value} {things}.", "How many {things} does {name} have?",
               "{name} has {value} {things}.", "{name} does not have {value} {things}."),
    FactFamily("color", COLORS, "The {object} is {value}.", "What color is the {object}?",
               "The {object} is {value}.", "The {object} is not {value}."),
    FactFamily("city", CITIES, "{name} lives in {value}.", "Where does {name} live?",
               "{name} lives in {value}.", "{name} does not live in {value}."),
)


def synthetic_pairs(n: int, seed: int = 0, *, families: tuple[str, ...] | None = None, wrong: str = "negation",
                    exclude_questions=frozenset(), prefix: str = "syn") -> list[PreferencePair]:
    """`n` labelled pairs, the right answer in slot A for half of them (at random).

    The subset of each pair is its fact family (count, color, city), in turn. Questions
    in `exclude_questions` are skipped (for held-out sets)."""
    chosen = [f for f in FAMILIES if families is None or f.name in families]
    if not chosen:
        raise ValueError(f"no fact family among {families!r}; known: {[f.name for f in FAMILIES]}")
    if wrong not in WRONG_KINDS:
        raise ValueError(f"wrong must be one of {WRONG_KINDS}, got {wrong!r}")
    rng = random.Random(f"conj-lite-synthetic:{seed}:{wrong}")
    labels = ["A", "B"] * (n // 2 + 1)
    rng.shuffle(labels)
    pairs, seen, attempts = [], set(), 0
    while len(pairs) < n:
        attempts += 1
        if attempts > 100 * n + 1000:
            raise ValueError(f"cannot draw {n} distinct synthetic questions (too many excluded)")
        family = chosen[len(pairs) % len(chosen)]
        question, right, bad = family.render(rng, wrong)
        if question in exclude_questions or (question, right, bad) in seen:
            continue
        seen.add((question, right, bad))
        label = labels[len(pairs)]
        a, b = (right, bad) if label == "A" else (bad, right)
        pairs.append(PreferencePair(f"{prefix}-{seed}-{len(pairs)}", question, a, b, label, source="synthetic",
                                    subset=family.name))
    return pairs


def split_pairs(n_train: int, n_test: int, seed: int = 0, **kwargs) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """Disjoint training and held-out sets: no held-out question occurs in training."""
    train = synthetic_pairs(n_train, seed, prefix="train", **kwargs)
    test = synthetic_pairs(n_test, seed + 1, exclude_questions={p.question for p in train}, prefix="test", **kwargs)
    return train, test


def right_and_wrong(pair: PreferencePair) -> tuple[str, str, str]:
    """(question, right answer, wrong answer) of a labelled pair."""
    if pair.label == "A":
        return pair.question, pair.answer_a, pair.answer_b
    if pair.label == "B":
        return pair.question, pair.answer_b, pair.answer_a
    raise ValueError(f"pair {pair.id} is a tie; it has no right answer")


# ---------------------------------------------------------------- the judge prompt

# A short judge prompt: the tiny model reads ~80 tokens instead of ~250 with the
# built-in "en" template, so sampling, training and judging run several times faster.
TEMPLATE = {
    "name": "synthetic",
    "user": "Question: {question}\nAnswer 1: {answer_1}\nAnswer 2: {answer_2}\n"
            "Which answer is right? Reply with JSON.",
    "hint": "(Hint: answer {k} is better.)\n",
    "rationale_key": "rationale",
    "verdict_key": "better_answer",
}
RATIONALES = (
    "Answer {k} agrees with the question.",
    "Answer {k} is right and answer {j} is wrong.",
    "Answer {k} is correct.",
)


def write_template(path: str | Path) -> Path:
    """The task's judge template as a YAML file (a recipe's prompts.template)."""
    import yaml

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(TEMPLATE, sort_keys=False, allow_unicode=True), "utf-8")
    return path


def template():
    return JudgeTemplate(**TEMPLATE)


# ---------------------------------------------------------------- the base judge


@dataclass(frozen=True)
class BaseJudgeSpec:
    """How the base judge of the check is warmed up from the default tiny model."""

    items: int = 300  # synthetic pairs the warm-up draws from (seed 99, never evaluated)
    steps: int = 150
    batch_size: int = 16
    lr: float = 2e-3
    hint_share: float = 0.5  # share of warm-up prompts with a hint (the hinted answer wins)
    plain: str = "first"  # plain prompts: "first" (always answer 1) or "random"
    seed: int = 0


def warmup_examples(spec: BaseJudgeSpec, judge_template, wrong: str = "negation"):
    """(messages, assistant prefix, target) triples: hint prompts get the hinted verdict,
    plain prompts answer 1 (or a random verdict)."""
    rng = random.Random(spec.seed)
    items = synthetic_pairs(spec.items, 99, wrong=wrong, prefix="warm")
    examples = []
    for _ in range(max(4 * spec.items, spec.steps * spec.batch_size // 2)):
        question, good, bad = right_and_wrong(rng.choice(items))
        a1, a2 = ordered_answers(good, bad, rng.choice(("ab", "ba")))
        if rng.random() < spec.hint_share:
            k = rng.choice((1, 2))
            prefix = hint_prefix(judge_template, k)
        else:
            k = 1 if spec.plain == "first" else rng.choice((1, 2))
            prefix = ""
        rationale = rng.choice(RATIONALES).format(k=k, j=3 - k)
        examples.append((build_messages(judge_template, question, a1, a2), prefix,
                         judge_verdict_json(judge_template, rationale, k)))
    return examples


def base_judge(spec: BaseJudgeSpec = BaseJudgeSpec(), *, wrong: str = "negation", cache_dir: str | Path | None = None,
               tiny_dir: str | Path | None = None) -> Path:
    """The warmed-up base judge (a transformers model directory), built once and cached."""
    tiny_dir = Path(tiny_dir or tiny_model_path())
    key = hashlib.sha256(json.dumps({"spec": asdict(spec), "wrong": wrong, "template": TEMPLATE,
                                     "rationales": RATIONALES, "tiny": tiny_dir.name, "v": 2},
                                    sort_keys=True).encode()).hexdigest()[:16]
    out = Path(cache_dir or cache_root() / "learnability") / key
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(spec.seed)
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    losses = warm_up(model, tokenizer, warmup_examples(spec, template(), wrong),
                     TinyModelSpec(warmup_steps=spec.steps, warmup_batch_size=spec.batch_size, warmup_lr=spec.lr,
                                   seed=spec.seed))
    with staged_dir(out) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if (tiny_dir / "tokenizer.model").is_file():  # llama.cpp's converter reads it (GGUF export)
            shutil.copy(tiny_dir / "tokenizer.model", staging / "tokenizer.model")
        meta = {"spec": asdict(spec), "wrong": wrong, "tiny": str(tiny_dir), "loss_first": losses[:1],
                "loss_last": losses[-5:]}
        (staging / "conj_lite_learnability.json").write_text(json.dumps(meta, indent=2))
    return out


# ---------------------------------------------------------------- the check

CONTROLS = ("swapped", "hint_lost")
VARIANTS = (*NAMED_VARIANTS, *CONTROLS)
# What the check must show (tests/test_learnability.py): the issue's +15 points, and an
# accuracy after training that neither ablation reaches (they end near 50% or below).
GAIN_MIN = 0.15
AFTER_MIN = 0.70

# One Con-J round sized for two CPU cores (a few minutes); see benchmarks/learnability.py.
RECIPE_OVERRIDES = (
    # Free-form sampling, as in the paper: the check (and its "hint_lost" control) is
    # about whether hints reach a judge that follows them. Held to the frame, a hint's
    # verdict is the hinted one whether the hint arrives or not.
    "sampling.format=free",
    "model.max_seq_length=256",
    "sampling.n_repeats=2",
    "sampling.hint_samples=1",
    "sampling.temperature=1.0",
    "sampling.top_p=1.0",
    "sampling.repetition_penalty=1.0",
    "sampling.max_new_tokens=32",
    "sampling.batch_size=64",
    "training.learning_rate=2.0e-3",  # 5e-3 stalled on 1 seed in 3 (the judge still picked answer 1); docs/benchmarks.md
    "training.epochs=3",
    "training.batch_size=8",
    "training.grad_accum=1",
    "training.lora_r=16",
    "training.lora_alpha=32",
    "training.lora_dropout=0.0",
    "training.save_steps=1000",
    "export.enabled=false",
)


@contextlib.contextmanager
def hint_lost():
    """Sampling as in the reference release's bug: the hint never reaches the model
    (the hint-driven samples are plain samples)."""
    original = sampling.hint_prefix
    sampling.hint_prefix = lambda template, k: ""
    try:
        yield
    finally:
        sampling.hint_prefix = original


def swap_pairs_file(path: str | Path) -> int:
    """Swap chosen and rejected in a pairs.jsonl (the "swapped" ablation)."""
    path = Path(path)
    rows = read_jsonl(path)
    for row in rows:
        row["chosen"], row["rejected"] = row["rejected"], row["chosen"]
    write_jsonl(path, rows)
    return len(rows)


def learnability_check(out_dir: str | Path, *, variant: str = "conj", n_train: int = 160, n_test: int = 60,
                       seed: int = 0, wrong: str = "negation", base_spec: BaseJudgeSpec = BaseJudgeSpec(),
                       overrides=(), bootstrap: int = 1000, max_new_tokens: int = 40, console=None,
                       before=None) -> dict:
    """Run the check in `out_dir` and return its figures:

        {"variant", "before": metrics, "after": metrics, "gain", "stats": filtering stats,
         "train": training summary, "seconds": {...}, ...}

    `before` (an EvalReport) skips re-evaluating the base judge, e.g. across variants."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seconds = {}
    start = time.perf_counter()
    base = base_judge(base_spec, wrong=wrong)
    seconds["base_judge"] = time.perf_counter() - start
    train, test = split_pairs(n_train, n_test, seed, wrong=wrong)
    write_pairs_jsonl(train, out / "train.jsonl")
    write_pairs_jsonl(test, out / "test.jsonl")
    template_file = write_template(out / "template.yaml")

    def judge_report(spec, name):
        judge = open_judge(str(spec), mode="rationale", max_new_tokens=max_new_tokens, template=str(template_file),
                           warn=None)
        try:
            return evaluate(judge, test, mode="rationale", bootstrap=bootstrap, seed=seed, name=name, console=console)
        finally:
            judge.close()

    start = time.perf_counter()
    if before is None:
        before = judge_report(base, "before")
    seconds["eval_before"] = time.perf_counter() - start

    named = "conj" if variant in CONTROLS else variant
    run = ConjRun.from_recipe(None, out / "run", [
        f"model.name_or_path={base}", f"data.path={out / 'train.jsonl'}", f"prompts.template={template_file}",
        f"training.seed={seed}", f"sampling.seed={seed}", *RECIPE_OVERRIDES, *variant_overrides(named), *overrides,
    ], console=console)
    start = time.perf_counter()
    try:
        with hint_lost() if variant == "hint_lost" else contextlib.nullcontext():
            if variant == "swapped":
                run.sample()
                run.filter()
                swap_pairs_file(out / "run" / "pairs.jsonl")
                run.train()
            else:
                run.run_all(export=False)
    except InputError as exc:  # nothing to train on: the judge stays as it was
        if "no DPO pairs" not in str(exc) and "no judgments to fine-tune" not in str(exc):
            raise
    seconds["run"] = time.perf_counter() - start
    stages = run.round_summaries()
    trained_stages = [st for st in stages if st.get("train")]
    seconds["train"] = sum(st["train"]["seconds"] for st in trained_stages)
    last_stats = next((st["stats"] for st in reversed(stages) if st.get("stats")), {})
    start = time.perf_counter()
    trained = bool(trained_stages)
    if trained:
        # The merged model judges like the adapter on its base, several times faster.
        adapter = Path(trained_stages[-1]["dir"]) / "adapter"
        merged = merge_adapter(adapter, out / "run" / "merged", dtype="float32", template=str(template_file)).merged_dir
        after = judge_report(merged, "after")
    else:
        after = before
    seconds["eval_after"] = time.perf_counter() - start
    result = {
        "variant": variant,
        "wrong": wrong,
        "n_train": n_train,
        "n_test": n_test,
        "seed": seed,
        "base_judge": str(base),
        "base_spec": asdict(base_spec),
        "trained": trained,
        "before": before.metrics,
        "after": after.metrics,
        "gain": after.metrics["accuracy"] - before.metrics["accuracy"],
        "stats": last_stats,
        "stages": stages,
        "train": trained_stages[-1]["train"] if trained else None,
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "overrides": [*RECIPE_OVERRIDES, *variant_overrides(named), *overrides],
    }
    (out / "learnability.json").write_text(json.dumps(result, indent=2) + "\n")
    result["before_report"], result["after_report"] = before, after
    return result
