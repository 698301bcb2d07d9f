"""Judge prompts: templates as data, both answer orders, and the hint prefix.

A pair is judged twice, once in each order:
  order "ab": answer 1 = answer_a, answer 2 = answer_b
  order "ba": answer 1 = answer_b, answer 2 = answer_a

Hint-driven sampling prefills the start of the assistant turn with
"answer k is better, I explain why", so the model's judgment continues from it.
(In the reference release the hint was lost to a chat-template mismatch; putting it
in the assistant prefix makes that impossible, and `render_prompt` tests it.)

Real chat templates differ in how they treat a system message, so `check_chat_template`
renders the judge prompt once at load time and decides (a `ChatFormat`) whether the
system text must be folded into the user turn; it also pins the date that templates
such as Llama 3.x print ("Today Date: ..."). The decision is remembered on the
tokenizer, so `render_prompt` and `chat_messages` apply it for every caller.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

import yaml

from .errors import InputError
from .parsing import format_judgment

ORDERS = ("ab", "ba")
PLACEHOLDER = re.compile(r"\{(question|answer_1|answer_2|k)\}")


@dataclass(frozen=True)
class JudgeTemplate:
    """The wording of the judge prompt. `user` has {question} {answer_1} {answer_2};
    `hint` (the assistant prefix of hint-driven samples) has {k}."""

    name: str
    user: str
    hint: str
    system: str | None = None
    rationale_key: str = "rationale"
    verdict_key: str = "better_answer"
    # The judgment format the judge was trained to write: a rationale, then the verdict
    # (`{"rationale": "...", "better_answer": k}`), or the verdict alone
    # (`{"better_answer": k}`, filtering.rationale=false). Recorded with the adapter, the
    # merged model and the GGUF, so a judge is read in the format it learned.
    rationale: bool = True

    def to_dict(self) -> dict:
        out = asdict(self)
        if out["rationale"]:  # the default format is not written: records made before it existed stay equal
            del out["rationale"]
        return out


def fill(text: str, **values: object) -> str:
    """Substitute {question}/{answer_1}/{answer_2}/{k} in one pass.

    One pass means text inserted for a placeholder is never scanned again, and the
    literal JSON braces in the template need no escaping (unlike str.format)."""
    return PLACEHOLDER.sub(lambda m: str(values[m.group(1)]) if m.group(1) in values else m.group(0), text)


BUILTIN_TEMPLATES = ("en", "en-brief", "zh")


def load_template(name_or_path: str = "en") -> JudgeTemplate:
    """A built-in template by name ("en", "zh") or a user's YAML/JSON file."""
    if name_or_path in BUILTIN_TEMPLATES:
        text = resources.files("conj_lite.templates").joinpath(f"{name_or_path}.yaml").read_text("utf-8")
        source = f"built-in template {name_or_path!r}"
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise ValueError(
                f"prompt template {name_or_path!r} is neither a built-in ({', '.join(BUILTIN_TEMPLATES)}) nor a file"
            )
        text, source = path.read_text("utf-8"), str(path)
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"{source}: not valid YAML/JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{source}: a template is a mapping with keys user, hint (and system, rationale_key, verdict_key)")
    known = set(JudgeTemplate.__dataclass_fields__)
    unknown = set(raw) - known
    if unknown:
        raise ValueError(f"{source}: unknown template keys {sorted(unknown)}; known: {sorted(known)}")
    for key in ("user", "hint"):
        if not isinstance(raw.get(key), str) or not raw[key].strip():
            raise ValueError(f"{source}: template key {key!r} is missing or empty")
    for slot in ("{question}", "{answer_1}", "{answer_2}"):
        if slot not in raw["user"]:
            raise ValueError(f"{source}: the user prompt must contain {slot}")
    if "{k}" not in raw["hint"]:
        raise ValueError(f"{source}: the hint must contain {{k}}")
    raw.setdefault("name", Path(name_or_path).stem)
    return JudgeTemplate(**raw)


def ordered_answers(answer_a: str, answer_b: str, order: str) -> tuple[str, str]:
    """(answer 1, answer 2) as shown to the judge for `order`."""
    if order == "ab":
        return answer_a, answer_b
    if order == "ba":
        return answer_b, answer_a
    raise ValueError(f"order must be one of {ORDERS}, got {order!r}")


def true_slot(label: str, order: str) -> int | None:
    """The answer number (1 or 2) that holds the human-preferred answer in `order`.

    label "A" means answer_a is better. Ties have no true slot."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    if label not in ("A", "B"):
        return None
    first = "A" if order == "ab" else "B"
    return 1 if label == first else 2


def slot_to_label(slot: int | None, order: str) -> str | None:
    """Map a verdict slot (1/2) back to the record's labels (A/B)."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    if slot not in (1, 2):
        return None
    if order == "ab":
        return "A" if slot == 1 else "B"
    return "B" if slot == 1 else "A"


# Text that chat templates and tokenizers read as control tokens: ChatML / Llama-3 / Phi-3
# `<|...|>`, Gemma's turn markers, `<s>` `</s>` `<bos>` `<eos>`, Mistral's `[INST]`.
CONTROL_TEXT = re.compile(
    r"<\|[A-Za-z0-9_\-]{1,40}\|>|<(?:start_of_turn|end_of_turn|bos|eos|pad|unk)>|</?s>|\[/?(?:INST|SYSTEM_PROMPT|TOOL_CALLS)\]"
)
WORD_JOINER = "\u2060"


def _joined(match: re.Match) -> str:
    return match.group(0)[0] + WORD_JOINER + match.group(0)[1:]


@lru_cache(maxsize=16)
def _texts_pattern(texts: tuple[str, ...]) -> re.Pattern:
    return re.compile("|".join(re.escape(t) for t in sorted(texts, key=len, reverse=True)))


def plain_text(text: str, special: tuple[str, ...] = ()) -> str:
    """User content as plain text: an answer that contains `<|im_end|>` would otherwise be
    tokenized (llama.cpp with special=True, transformers, TRL) as the control token and
    close the user turn. A word joiner after the first character keeps the text readable
    and makes it impossible to match, the same way for training and for every backend.
    `special`: a tokenizer's own special-token texts (`special_texts`), guarded as well."""
    text = CONTROL_TEXT.sub(_joined, text)
    return _texts_pattern(special).sub(_joined, text) if special else text


def special_texts(tokenizer) -> tuple[str, ...]:
    """The texts a tokenizer reads as its special tokens: a Hugging Face tokenizer's
    special added tokens (SmolLM2 has `<file_sep>`, `<jupyter_code>`, ... besides ChatML),
    or the control tokens of a GGUF vocabulary (`GGUFChatTemplate.special_texts`). Texts
    of one character or of whitespace are left out: guarding them would change ordinary
    text."""
    texts = getattr(tokenizer, "special_texts", None)
    if texts is None:
        decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
        texts = [t.content for t in decoder.values() if getattr(t, "special", False)]
        texts += list(getattr(tokenizer, "all_special_tokens", None) or [])
    return tuple(sorted({t for t in texts if isinstance(t, str) and len(t.strip()) > 1}))


def build_messages(template: JudgeTemplate, question: str, answer_1: str, answer_2: str) -> list[dict]:
    """The chat messages of the plain judge prompt (no hint); the question and answers
    are inserted as plain text (see `plain_text`)."""
    messages = []
    if template.system:
        messages.append({"role": "system", "content": template.system})
    user = fill(template.user, question=plain_text(question), answer_1=plain_text(answer_1), answer_2=plain_text(answer_2))
    messages.append({"role": "user", "content": user})
    return messages


# The date given to chat templates that print one (Llama 3.x: "Today Date: ..."). Without
# it transformers passes today's date (strftime_now), so the judge's prompt would change
# every day and differ from the one it was trained with. This is the Llama 3.1 template's
# own fallback, so a pinned prompt equals what the template writes when no date is given.
DEFAULT_CHAT_DATE = "26 Jul 2024"
CHAT_FORMAT_ATTR = "_conj_lite_chat_format"


@dataclass(frozen=True)
class ChatFormat:
    """How the judge's messages go through one tokenizer's chat template.

    fold_system: the system text goes into the user turn ("system\n\nuser"), for
    templates that reject a system role (Gemma 2) or render it only when the user turn
    is the last message (Mistral 7B Instruct v0.3), which makes the prompt alone differ
    from the prompt followed by a reply.
    date_string: passed to apply_chat_template as `date_string`."""

    fold_system: bool = False
    date_string: str = DEFAULT_CHAT_DATE
    special: tuple[str, ...] = ()  # the tokenizer's special-token texts, kept out of user text

    def messages(self, messages: list[dict]) -> list[dict]:
        """`messages` as this template takes them: the tokenizer's own special-token texts
        in user turns made plain (`plain_text`), the system text folded when needed."""
        messages = [{**m, "content": plain_text(m["content"], self.special)}
                    if self.special and m.get("role") == "user" and isinstance(m.get("content"), str) else m
                    for m in messages]
        if not self.fold_system or not messages or messages[0].get("role") != "system":
            return list(messages)
        system, rest = messages[0], list(messages[1:])
        if rest and rest[0].get("role") == "user":
            rest[0] = {**rest[0], "content": f"{system['content']}\n\n{rest[0]['content']}"}
        else:
            rest.insert(0, {"role": "user", "content": system["content"]})
        return rest

    def template_kwargs(self) -> dict:
        """Extra keyword arguments for apply_chat_template (TRL: a dataset's
        `chat_template_kwargs` column)."""
        return {"date_string": self.date_string}

    def training_row(self, row: dict) -> dict:
        """A prompt/chosen/rejected (or prompt/completion) row for TRL with the prompt
        folded as needed and the pinned date in `chat_template_kwargs`."""
        return {**row, "prompt": self.messages(row["prompt"]), "chat_template_kwargs": self.template_kwargs()}

    def to_dict(self) -> dict:
        """The decision (fold, date); the special texts are the tokenizer's own, read again."""
        out = asdict(self)
        del out["special"]
        return out


def _render(tokenizer, messages: list[dict], date_string: str, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                         date_string=date_string)


def _prefix_problem(tokenizer, messages: list[dict], date_string: str) -> str | None:
    """None when the prompt alone renders as a prefix of the prompt + a reply, else why not."""
    reply = {"role": "assistant", "content": '{"rationale": "check", "better_answer": 1}'}
    try:
        prompt = _render(tokenizer, messages, date_string, True)
        full = _render(tokenizer, [*messages, reply], date_string, False)
    except Exception as exc:  # Jinja's raise_exception: "System role not supported", ...
        return f"the chat template raised {type(exc).__name__}: {exc}"
    if full.startswith(prompt):
        return None
    at = next((i for i, (x, y) in enumerate(zip(prompt, full)) if x != y), min(len(prompt), len(full)))
    return (f"the prompt alone is not a prefix of the prompt + reply; they part at character {at}: "
            f"{prompt[max(0, at - 30):at + 30]!r} vs {full[max(0, at - 30):at + 30]!r}")


def check_chat_template(tokenizer, template: JudgeTemplate | None = None,
                        date_string: str = DEFAULT_CHAT_DATE) -> ChatFormat:
    """Decide, once per tokenizer, how judge prompts go through its chat template.

    Renders [system, user] + generation prompt and [system, user, assistant reply]; when
    the template raises or the first is not a prefix of the second (TRL's DPOTrainer
    would then start the completion where they part, training on the user turn), the
    system text is folded into the user turn and checked again. Still not a prefix:
    InputError. The result is remembered on the tokenizer (render_prompt and
    chat_messages use it) and returned; record `to_dict()` with the run."""
    system = (template.system if template is not None else None) or "You are a fair judge."
    user = fill(template.user, question="Q?", answer_1="One.", answer_2="Two.") if template is not None else "Q?"
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    special = special_texts(tokenizer)
    chat = ChatFormat(False, date_string, special)
    problem = _prefix_problem(tokenizer, messages, date_string)
    if problem is not None:
        chat = ChatFormat(True, date_string, special)
        folded = _prefix_problem(tokenizer, chat.messages(messages), date_string)
        if folded is not None:
            name = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
            raise InputError(
                f"{name}: its chat template cannot hold the judge prompt: with a system message {problem}; "
                f"with the system text folded into the user turn {folded}. Use a chat model whose template "
                "renders a prompt that the reply continues, or set a chat_template on the tokenizer"
            )
    setattr(tokenizer, CHAT_FORMAT_ATTR, chat)
    return chat


def chat_format(tokenizer) -> ChatFormat:
    """The tokenizer's ChatFormat; checked now (with the default date) if it never was."""
    chat = getattr(tokenizer, CHAT_FORMAT_ATTR, None)
    return chat if chat is not None else check_chat_template(tokenizer)


def chat_messages(tokenizer, template: JudgeTemplate, question: str, answer_1: str, answer_2: str) -> list[dict]:
    """build_messages as this tokenizer's chat template takes them (system folded when needed)."""
    return chat_format(tokenizer).messages(build_messages(template, question, answer_1, answer_2))


def hint_prefix(template: JudgeTemplate, k: int) -> str:
    """The assistant prefix that tells the model answer k is better."""
    if k not in (1, 2):
        raise ValueError(f"hint slot must be 1 or 2, got {k!r}")
    return fill(template.hint, k=k)


def render_prompt(tokenizer, messages: list[dict], assistant_prefix: str = "") -> str:
    """The exact model input: the chat template with the generation prompt, then the
    prefilled start of the assistant turn (empty for plain judgments). The system text
    is folded and the date pinned as `check_chat_template` decided for this tokenizer."""
    chat = chat_format(tokenizer)
    return _render(tokenizer, chat.messages(messages), chat.date_string, True) + assistant_prefix


def judge_verdict_json(template: JudgeTemplate, rationale: str, verdict: int) -> str:
    """A well-formed judgment in the template's own keys (for targets and tests):
    `parsing.format_judgment` with this template's keys."""
    return format_judgment(rationale, verdict, rationale_key=template.rationale_key, verdict_key=template.verdict_key)
