"""Judge prompts: templates as data, both answer orders, and the hint prefix.

A pair is judged twice, once in each order:
  order "ab": answer 1 = answer_a, answer 2 = answer_b
  order "ba": answer 1 = answer_b, answer 2 = answer_a

Hint-driven sampling prefills the start of the assistant turn with
"answer k is better, I explain why", so the model's judgment continues from it.
(In the reference release the hint was lost to a chat-template mismatch; putting it
in the assistant prefix makes that impossible, and `render_prompt` tests it.)
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import yaml

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

    def to_dict(self) -> dict:
        return asdict(self)


def fill(text: str, **values: object) -> str:
    """Substitute {question}/{answer_1}/{answer_2}/{k} in one pass.

    One pass means text inserted for a placeholder is never scanned again, and the
    literal JSON braces in the template need no escaping (unlike str.format)."""
    return PLACEHOLDER.sub(lambda m: str(values[m.group(1)]) if m.group(1) in values else m.group(0), text)


BUILTIN_TEMPLATES = ("en", "zh")


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


def build_messages(template: JudgeTemplate, question: str, answer_1: str, answer_2: str) -> list[dict]:
    """The chat messages of the plain judge prompt (no hint)."""
    messages = []
    if template.system:
        messages.append({"role": "system", "content": template.system})
    messages.append({"role": "user", "content": fill(template.user, question=question, answer_1=answer_1, answer_2=answer_2)})
    return messages


def hint_prefix(template: JudgeTemplate, k: int) -> str:
    """The assistant prefix that tells the model answer k is better."""
    if k not in (1, 2):
        raise ValueError(f"hint slot must be 1 or 2, got {k!r}")
    return fill(template.hint, k=k)


def render_prompt(tokenizer, messages: list[dict], assistant_prefix: str = "") -> str:
    """The exact model input: the chat template with the generation prompt, then the
    prefilled start of the assistant turn (empty for plain judgments)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text + assistant_prefix


def judge_verdict_json(template: JudgeTemplate, rationale: str, verdict: int) -> str:
    """A well-formed judgment in the template's own keys (for targets and tests)."""
    import json

    return json.dumps({template.rationale_key: rationale, template.verdict_key: verdict}, ensure_ascii=False)
