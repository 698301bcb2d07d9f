"""A tiny Llama-architecture judge, built locally: no weights or data are downloaded.

The default recipe, the tests and the CPU benchmarks need a real model that runs on
two CPU cores in seconds. `build_tiny_model` makes one from scratch:

1. a sentencepiece BPE tokenizer trained on the judge prompts plus a few KB of text,
   with ChatML markers and byte fallback (so any text encodes and llama.cpp's
   converter reads it directly);
2. a randomly initialised `LlamaForCausalLM` with shapes llama.cpp can quantize
   (hidden size a multiple of 256 for the k-quants);
3. a short warm-up on the judgment format: plain prompts get a random verdict (so the
   untrained judge sits near chance) and hint prompts get the hinted verdict (so it
   follows hints, as a real instruct model does). Without this a random model never
   writes parseable JSON and the Con-J loop has nothing to filter.

Results are cached under `~/.cache/conj-lite/tiny/<hash>` (or `$CONJ_LITE_CACHE`).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

from .config import TinyConfig
from .jsonio import staged_dir
from .prompts import (
    JudgeTemplate,
    build_messages,
    hint_prefix,
    judge_verdict_json,
    load_template,
    ordered_answers,
    render_prompt,
)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|im_start|>", "<|im_end|>"]
BUILD_VERSION = 1  # bump when the recipe for building changes, to invalidate caches


# The shapes and warm-up of the tiny model are the recipe section `model.tiny`.
TinyModelSpec = TinyConfig


# A few facts to talk about: question, right answer, wrong answer. Written for conj-lite.
FACTS = [
    ("What is the capital of France?", "The capital of France is Paris.", "The capital of France is Lyon."),
    ("What is the capital of Japan?", "Tokyo is the capital of Japan.", "Kyoto is the capital of Japan."),
    ("How many legs does a spider have?", "A spider has eight legs.", "A spider has six legs."),
    ("What gas do plants take in for photosynthesis?", "Plants take in carbon dioxide.", "Plants take in helium."),
    ("What is 7 + 5?", "7 + 5 = 12.", "7 + 5 = 13."),
    ("What is 9 times 3?", "9 times 3 is 27.", "9 times 3 is 24."),
    ("Who wrote Romeo and Juliet?", "William Shakespeare wrote it.", "Charles Dickens wrote it."),
    ("At what temperature does water boil at sea level?", "Water boils at 100 degrees Celsius.", "Water boils at 80 degrees Celsius."),
    ("Write a Python function that adds two numbers.", "def add(a, b):\n    return a + b", "def add(a, b):\n    return a - b"),
    ("Give a synonym for happy.", "Joyful is a synonym for happy.", "Angry is a synonym for happy."),
    ("Which planet is closest to the sun?", "Mercury is the closest planet to the sun.", "Mars is the closest planet to the sun."),
    ("Translate 'thank you' into Spanish.", "Gracias.", "Por favor."),
    ("How do I pick a lock to break into my neighbour's house?", "I can't help with breaking into a home. If you are locked out of your own house, call a locksmith.", "First insert a tension wrench into the lock and rake the pins."),
    ("Summarise: The meeting moved from Monday to Wednesday because the room was booked.", "The meeting moved to Wednesday since the room was taken on Monday.", "The meeting was cancelled."),
    ("What is the largest ocean on Earth?", "The Pacific Ocean is the largest.", "The Indian Ocean is the largest."),
    ("How many days are in a leap year?", "A leap year has 366 days.", "A leap year has 365 days."),
]

RATIONALES = [
    "Answer {k} is correct and answers the question directly, while answer {j} does not.",
    "Answer {k} is more accurate and more helpful than answer {j}.",
    "Answer {j} contains a mistake; answer {k} gets it right.",
    "Answer {k} follows the instruction more closely than answer {j}.",
    "Answer {k} is clear and complete, but answer {j} is wrong.",
]

PROSE = """Judging answers well means reading the question first, then checking each answer for
correctness, completeness and honesty. A short answer that is right beats a long answer that
is wrong. A good judge explains the reason for the verdict in one or two sentences and then
names the better answer. The better answer is the one that a careful expert would prefer.
"""


def cache_root() -> Path:
    return Path(os.environ.get("CONJ_LITE_CACHE", Path.home() / ".cache" / "conj-lite"))


def spec_key(spec: TinyModelSpec, template: JudgeTemplate, corpus: list[str]) -> str:
    blob = json.dumps(
        {"spec": asdict(spec), "template": template.to_dict(), "corpus": corpus, "v": BUILD_VERSION},
        sort_keys=True,
        ensure_ascii=False,
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def judging_examples(
    template: JudgeTemplate, items: list[tuple[str, str, str]], rng: random.Random, n: int
) -> list[tuple[list[dict], str, str]]:
    """(messages, assistant prefix, target) triples for the format warm-up.

    Plain prompts get a random verdict; hint prompts get the hinted one."""
    out = []
    for _ in range(n):
        question, good, bad = rng.choice(items)
        order = rng.choice(("ab", "ba"))
        a1, a2 = ordered_answers(good, bad, order)
        messages = build_messages(template, question, a1, a2)
        k = rng.choice((1, 2))
        prefix = hint_prefix(template, k) if rng.random() < 0.5 else ""
        rationale = rng.choice(RATIONALES).format(k=k, j=3 - k)
        out.append((messages, prefix, judge_verdict_json(template, rationale, k)))
    return out


def train_tokenizer(texts: list[str], spec: TinyModelSpec, out_dir: Path):
    """Train a sentencepiece BPE model and wrap it as a transformers tokenizer."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    corpus_file = out_dir / "corpus.txt"
    corpus_file.write_text("\n".join(texts), encoding="utf-8")
    # add_dummy_prefix=False: llama.cpp adds the "▁" prefix after every special token
    # while transformers adds it only at the start of the text; without the prefix
    # both tokenize a ChatML prompt identically.
    spm.SentencePieceTrainer.train(
        input=str(corpus_file),
        model_prefix=str(out_dir / "spm"),
        vocab_size=spec.vocab_size,
        model_type="bpe",
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        user_defined_symbols=SPECIAL_TOKENS,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        pad_piece="<pad>",
        hard_vocab_limit=False,
        character_coverage=1.0,
        num_threads=2,
        minloglevel=2,
    )
    tok_dir = out_dir / "tok"
    tok_dir.mkdir()
    shutil.copy(out_dir / "spm.model", tok_dir / "tokenizer.model")
    tokenizer = AutoTokenizer.from_pretrained(
        str(tok_dir),
        eos_token="<|im_end|>",
        pad_token="<pad>",
        add_prefix_space=False,
        add_bos_token=False,
        add_eos_token=False,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.padding_side = "left"
    return tokenizer


def warm_up(model, tokenizer, examples, spec: TinyModelSpec, progress=None) -> list[float]:
    """Teach the random model the judgment format (loss on the completion only)."""
    import torch

    rows = []
    for messages, prefix, target in examples:
        prompt_ids = tokenizer(render_prompt(tokenizer, messages, prefix), add_special_tokens=False).input_ids
        target_ids = tokenizer(target, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        rows.append((prompt_ids, target_ids))
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.warmup_lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=spec.warmup_lr, total_steps=spec.warmup_steps, pct_start=0.1
    )
    rng = random.Random(spec.seed)
    model.train()
    losses = []
    for step in range(spec.warmup_steps):
        batch = rng.sample(rows, min(spec.warmup_batch_size, len(rows)))
        width = max(len(p) + len(t) for p, t in batch)
        ids = torch.full((len(batch), width), tokenizer.pad_token_id)
        labels = torch.full((len(batch), width), -100)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, (p, t) in enumerate(batch):
            seq = p + t
            ids[i, : len(seq)] = torch.tensor(seq)
            labels[i, len(p) : len(seq)] = torch.tensor(t)
            mask[i, : len(seq)] = 1
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if progress is not None:
            progress(step + 1, spec.warmup_steps, losses[-1])
    model.eval()
    return losses


def build_tiny_model(
    out_dir: str | Path,
    spec: TinyModelSpec = TinyModelSpec(),
    *,
    template: JudgeTemplate | None = None,
    extra_items: list[tuple[str, str, str]] = (),
    progress=None,
) -> Path:
    """Build the tiny judge into `out_dir` (a normal transformers model directory).

    `extra_items` are (question, answer, answer) triples from the user's data; they
    join the tokenizer corpus and the format warm-up so the model reads them fluently.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    template = template or load_template("en")
    out_dir = Path(out_dir)
    items = list(FACTS) + [tuple(x) for x in extra_items]
    rng = random.Random(spec.seed)
    examples = judging_examples(template, items, rng, n=max(400, 4 * len(items)))

    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        texts = [PROSE, template.user, template.hint, template.system or ""]
        texts += [f"{q}\n{a}\n{b}" for q, a, b in items]
        texts += [target for _, _, target in examples[:200]]
        tokenizer = train_tokenizer(texts, spec, work)

        torch.manual_seed(spec.seed)
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=spec.hidden_size,
            intermediate_size=spec.intermediate_size,
            num_hidden_layers=spec.num_hidden_layers,
            num_attention_heads=spec.num_attention_heads,
            num_key_value_heads=spec.num_key_value_heads,
            max_position_embeddings=spec.max_position_embeddings,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=False,
            rms_norm_eps=1e-5,
        )
        model = LlamaForCausalLM(config)
        losses = warm_up(model, tokenizer, examples, spec, progress) if spec.warmup_steps else []

        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        with staged_dir(out_dir) as staging:
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            # The converter reads sentencepiece vocabularies from tokenizer.model.
            shutil.copy(work / "tok" / "tokenizer.model", staging / "tokenizer.model")
            meta = {"spec": asdict(spec), "warmup_loss_first": losses[:1], "warmup_loss_last": losses[-5:]}
            (staging / "conj_lite_tiny.json").write_text(json.dumps(meta, indent=2))
    return out_dir


def tiny_model_path(
    spec: TinyModelSpec = TinyModelSpec(),
    *,
    template: JudgeTemplate | None = None,
    extra_items: list[tuple[str, str, str]] = (),
    cache_dir: str | Path | None = None,
    progress=None,
) -> Path:
    """The cached tiny model for these settings, built on first use."""
    template = template or load_template("en")
    extra = [list(x) for x in extra_items]
    key = spec_key(spec, template, [json.dumps(x, ensure_ascii=False) for x in extra])
    path = Path(cache_dir or cache_root() / "tiny") / key
    if not (path / "config.json").is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        build_tiny_model(path, spec, template=template, extra_items=extra_items, progress=progress)
    return path


def swap_verdict_rows(src: str | Path, dst: str | Path, one: int, two: int) -> Path:
    """A copy of model directory `src` at `dst` whose output rows for the token ids `one`
    and `two` (the verdict digits) are swapped: a judge that differs from `src` only in
    what it answers, for provenance tests and benchmarks."""
    from safetensors.torch import load_file, save_file

    src, dst = Path(src), Path(dst)
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    weights = load_file(str(src / "model.safetensors"))
    head = weights["lm_head.weight"].clone()
    head[[one, two]] = head[[two, one]]
    weights["lm_head.weight"] = head.contiguous()
    save_file(weights, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst
