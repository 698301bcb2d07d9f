"""Real chat templates at load time (issue 11, items 1, 2, 6): saved copies of the
templates of Qwen2.5, Llama 3.1/3.2, Mistral 7B Instruct v0.3, Gemma 2/3, Phi-3.5 and
SmolLM2 (tests/fixtures/chat_templates/, sources in its README) on a small in-memory
tokenizer, so nothing is downloaded and no model is built."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from conj_lite.errors import InputError
from conj_lite.prompts import (
    DEFAULT_CHAT_DATE,
    ChatFormat,
    build_messages,
    chat_messages,
    check_chat_template,
    hint_prefix,
    load_template,
    render_prompt,
)

FIXTURES = Path(__file__).parent / "fixtures" / "chat_templates"

# (template file, bos, eos, whether the system text has to be folded into the user turn)
TEMPLATES = {
    "qwen2.5": ("qwen2.5.jinja", None, "<|im_end|>", False),
    "llama-3.1": ("llama-3.1.jinja", "<|begin_of_text|>", "<|eot_id|>", False),
    "llama-3.2": ("llama-3.2.jinja", "<|begin_of_text|>", "<|eot_id|>", False),
    "mistral-7b-instruct-v0.3": ("mistral-7b-instruct-v0.3.jinja", "<s>", "</s>", True),  # system only in a last user turn
    "gemma-2": ("gemma-2.jinja", "<bos>", "<eos>", True),  # "System role not supported"
    "gemma-3": ("gemma-3.jinja", "<bos>", "<eos>", False),  # folds the system text itself
    "phi-3.5": ("phi-3.5.jinja", "<s>", "<|endoftext|>", False),
    "smollm2": ("smollm2.jinja", "<|im_start|>", "<|im_end|>", False),
}


def make_tokenizer(name: str):
    """A word-level tokenizer with the model's chat template and special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    file, bos, eos, _ = TEMPLATES[name]
    core = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", eos_token=eos,
                                        **({"bos_token": bos} if bos else {}))
    tokenizer.chat_template = (FIXTURES / file).read_text("utf-8")
    tokenizer.name_or_path = name
    return tokenizer


def judgment(template) -> dict:
    return {"role": "assistant", "content": '{"rationale": "Paris is right.", "better_answer": 1}'}


@pytest.mark.parametrize("name", list(TEMPLATES))
@pytest.mark.parametrize("template_name", ["en", "en-brief", "zh"])
def test_rendered_prompt_is_a_prefix_of_prompt_plus_judgment(name, template_name):
    """What sampling renders must be where training's prompt + judgment starts, and the
    system text must be in it once (TRL's DPOTrainer starts the completion where the two
    renderings part: on Mistral v0.3 that was the whole user turn)."""
    tokenizer = make_tokenizer(name)
    template = load_template(template_name)
    chat = check_chat_template(tokenizer, template)
    assert chat.fold_system is TEMPLATES[name][3]
    messages = chat_messages(tokenizer, template, "What is the capital of France?", "Paris.", "Lyon.")
    prompt = render_prompt(tokenizer, build_messages(template, "What is the capital of France?", "Paris.", "Lyon."))
    assert render_prompt(tokenizer, messages) == prompt  # folding twice changes nothing
    full = tokenizer.apply_chat_template([*messages, judgment(template)], tokenize=False,
                                         **chat.template_kwargs())
    assert full.startswith(prompt)
    assert prompt.count(template.system.strip()) == 1
    assert "Paris." in prompt and "Lyon." in prompt
    # the hint prefix still ends the model input
    assert render_prompt(tokenizer, messages, hint_prefix(template, 2)).endswith(hint_prefix(template, 2))


@pytest.mark.parametrize("name", ["mistral-7b-instruct-v0.3", "gemma-2"])
def test_training_rows_are_folded_for_trl(name):
    tokenizer = make_tokenizer(name)
    template = load_template("en")
    chat = check_chat_template(tokenizer, template)
    row = {"prompt": build_messages(template, "Q?", "a", "b"), "chosen": [judgment(template)],
           "rejected": [{"role": "assistant", "content": '{"rationale": "x", "better_answer": 2}'}]}
    folded = chat.training_row(row)
    assert [m["role"] for m in folded["prompt"]] == ["user"]
    assert folded["prompt"][0]["content"].startswith(template.system + "\n\n")
    assert folded["chat_template_kwargs"] == {"date_string": DEFAULT_CHAT_DATE}
    assert row["prompt"][0]["role"] == "system"  # the input row is left as it was
    kwargs = folded["chat_template_kwargs"]
    # as TRL 1.14's DPOTrainer renders them (tokenize_fn): prompt alone, prompt + chosen
    alone = tokenizer.apply_chat_template(folded["prompt"], tokenize=False, add_generation_prompt=True, **kwargs)
    for key in ("chosen", "rejected"):
        both = tokenizer.apply_chat_template(folded["prompt"] + folded[key], tokenize=False, **kwargs)
        assert both.startswith(alone)


def test_mistral_v03_unfolded_prompt_is_not_a_prefix():
    """The bug itself, on the real template: the system text is only in a last user turn."""
    tokenizer = make_tokenizer("mistral-7b-instruct-v0.3")
    messages = build_messages(load_template("en"), "Q?", "a", "b")
    alone = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    both = tokenizer.apply_chat_template([*messages, judgment(None)], tokenize=False)
    assert not both.startswith(alone)
    assert load_template("en").system in alone and load_template("en").system not in both


def test_gemma2_with_a_system_message_raises_unchecked():
    tokenizer = make_tokenizer("gemma-2")
    with pytest.raises(Exception, match="System role not supported"):
        tokenizer.apply_chat_template(build_messages(load_template("en"), "Q?", "a", "b"), tokenize=False)
    # ... and render_prompt folds it without being asked (the check runs on first use)
    fresh = make_tokenizer("gemma-2")
    rendered = render_prompt(fresh, build_messages(load_template("en"), "Q?", "a", "b"))
    assert rendered.startswith("<bos><start_of_turn>user\n" + load_template("en").system.strip())


def test_a_template_no_folding_can_fix_is_an_input_error():
    tokenizer = make_tokenizer("qwen2.5")
    # the generation prompt opens a turn the reply never continues
    tokenizer.chat_template = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}</{{ m.role }}>{% endfor %}"
                               "{% if add_generation_prompt %}<bot>{% endif %}")
    with pytest.raises(InputError) as info:
        check_chat_template(tokenizer, load_template("en"))
    message = str(info.value)
    assert message.startswith("qwen2.5: its chat template cannot hold the judge prompt")
    assert "not a prefix" in message and "folded into the user turn" in message


@pytest.mark.parametrize("name", ["llama-3.2", "llama-3.1"])
def test_the_date_in_the_prompt_is_pinned(name):
    """Llama 3.2's template prints today's date (transformers passes strftime_now) unless
    a date_string is given: the prompt would change by the day."""
    tokenizer = make_tokenizer(name)
    messages = build_messages(load_template("en"), "Q?", "a", "b")
    today = time.strftime("%d %b %Y")
    if name == "llama-3.2":
        unpinned = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert f"Today Date: {today}" in unpinned  # what the bug looks like
    assert f"Today Date: {DEFAULT_CHAT_DATE}\n" in render_prompt(tokenizer, messages)
    check_chat_template(tokenizer, load_template("en"), date_string="01 Jan 2025")
    assert "Today Date: 01 Jan 2025\n" in render_prompt(tokenizer, messages)


def test_chat_format_messages_and_record():
    chat = ChatFormat(fold_system=True, date_string="02 Feb 2025")
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    assert chat.messages(messages) == [{"role": "user", "content": "S\n\nU"}]
    assert chat.messages(chat.messages(messages)) == chat.messages(messages)
    assert ChatFormat().messages(messages) == messages
    assert chat.to_dict() == {"fold_system": True, "date_string": "02 Feb 2025"}


def test_recipe_date_default_is_the_prompts_default():
    from conj_lite.config import load_recipe

    assert load_recipe(None).prompts.date_string == DEFAULT_CHAT_DATE


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_the_gguf_judge_renders_the_prompt_training_rendered(name):
    """The GGUF judge renders with the chat template stored in the file (llama-cpp-python's
    Jinja formatter): it must fold the system text and pin the date as training did on the
    model's tokenizer, or the judge is asked in words it was not trained on (Gemma 2 would
    raise; Llama 3.x would print today's date)."""
    from conj_lite.judging.backends import GGUFChatTemplate

    file, bos, eos, fold = TEMPLATES[name]
    tokenizer = make_tokenizer(name)
    gguf = GGUFChatTemplate((FIXTURES / file).read_text("utf-8"), bos_token=bos or "", eos_token=eos)
    template = load_template("en")
    assert check_chat_template(gguf, template).fold_system is fold
    check_chat_template(tokenizer, template)
    messages = build_messages(template, "What is the capital of France?", "Paris.", "Lyon.")
    prompt = render_prompt(gguf, messages)
    assert prompt == render_prompt(tokenizer, messages)
    if name.startswith("llama-3"):
        assert time.strftime("%d %b %Y") not in prompt
