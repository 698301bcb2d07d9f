"""Judge prompts: templates as data, both answer orders, and the hint prefix that must
reach the model (the reference release lost it to a chat-template mismatch)."""

import json

import pytest

from conj_lite.parsing import parse_verdict
from conj_lite.prompts import (
    ORDERS,
    JudgeTemplate,
    build_messages,
    fill,
    hint_prefix,
    judge_verdict_json,
    load_template,
    ordered_answers,
    render_prompt,
    slot_to_label,
    true_slot,
)

GOOD_USER = "Q: {question}\n1: {answer_1}\n2: {answer_2}\nReply {\"why\": \"...\", \"pick\": 1 or 2}"


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, "utf-8")
    return path


# ---------------------------------------------------------------- loading templates


@pytest.mark.parametrize("name", ["en", "en-brief", "zh"])
def test_builtin_templates_load_with_all_placeholders(name):
    template = load_template(name)
    assert template.name == name
    for slot in ("{question}", "{answer_1}", "{answer_2}"):
        assert template.user.count(slot) == 1
    assert "{k}" in template.hint
    assert template.system  # both built-ins ship a system prompt
    # The prompt's JSON example uses the template's own keys, so a judgment in them parses.
    assert f'"{template.rationale_key}"' in template.user
    assert f'"{template.verdict_key}"' in template.user


def test_builtin_zh_uses_the_chinese_keys():
    template = load_template("zh")
    assert (template.rationale_key, template.verdict_key) == ("原因", "更好的回答")
    assert "回答" in hint_prefix(template, 1)


def test_default_template_is_english():
    assert load_template() == load_template("en")


def test_user_yaml_template_loads(tmp_path):
    path = write(
        tmp_path,
        "strict_judge.yaml",
        "system: Be strict.\n"
        f"user: {json.dumps(GOOD_USER)}\n"
        "hint: 'Answer {k} wins because '\n"
        "rationale_key: why\n"
        "verdict_key: pick\n",
    )
    template = load_template(str(path))
    assert template == JudgeTemplate(
        name="strict_judge", user=GOOD_USER, hint="Answer {k} wins because ", system="Be strict.",
        rationale_key="why", verdict_key="pick",
    )
    assert hint_prefix(template, 2) == "Answer 2 wins because "


def test_user_json_template_keeps_its_name_and_defaults(tmp_path):
    path = write(tmp_path, "t.json", json.dumps({"name": "mine", "user": GOOD_USER, "hint": "({k})"}))
    template = load_template(str(path))
    assert template.name == "mine"
    assert template.system is None
    assert (template.rationale_key, template.verdict_key) == ("rationale", "better_answer")


@pytest.mark.parametrize(
    "text, needle",
    [
        ("user: 'Q {question} 1 {answer_1}'\nhint: 'answer {k}'\n", "{answer_2}"),
        ("user: 'Q {answer_1} {answer_2}'\nhint: 'answer {k}'\n", "{question}"),
        (f"user: {json.dumps(GOOD_USER)}\nhint: 'answer one is better'\n", "{k}"),
        (f"user: {json.dumps(GOOD_USER)}\nhint: 'answer {{k}}'\nsytem: typo\n", "sytem"),
        ("- user\n- hint\n", "mapping"),
        (f"user: {json.dumps(GOOD_USER)}\n", "hint"),
        ("user: ''\nhint: 'answer {k}'\n", "user"),
        ("user: [unclosed\n", "YAML"),
    ],
    ids=["no-answer_2", "no-question", "hint-without-k", "unknown-key", "not-a-mapping", "no-hint", "empty-user", "bad-yaml"],
)
def test_bad_template_raises_naming_the_file(tmp_path, text, needle):
    path = write(tmp_path, "bad.yaml", text)
    with pytest.raises(ValueError) as info:
        load_template(str(path))
    message = str(info.value)
    assert str(path) in message
    assert needle in message


def test_missing_template_file_names_it_and_the_builtins(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ValueError) as info:
        load_template(str(missing))
    assert str(missing) in str(info.value)
    assert "en" in str(info.value) and "zh" in str(info.value)


# ---------------------------------------------------------------- fill


def test_fill_substitutes_in_one_pass():
    text = "Q: {question} | 1: {answer_1} | 2: {answer_2}"
    out = fill(text, question="say {answer_1} and {k}", answer_1="one {answer_2}", answer_2="two")
    # Inserted text is never rescanned: the placeholders inside values stay literal.
    assert out == "Q: say {answer_1} and {k} | 1: one {answer_2} | 2: two"


def test_fill_keeps_json_braces_and_unknown_placeholders():
    text = '{"rationale": "<why>", "better_answer": <1 or 2>} {other} {k}'
    assert fill(text, k=2) == '{"rationale": "<why>", "better_answer": <1 or 2>} {other} 2'
    assert fill("{question}", answer_1="x") == "{question}"  # a missing value leaves it alone


def test_build_messages_user_prompt_keeps_template_json_example():
    template = load_template("en")
    user = build_messages(template, "Q {answer_2}?", "first", "second")[-1]["content"]
    assert '{"rationale": "<why one answer is better>", "better_answer": <1 or 2>}' in user
    assert "Q {answer_2}?" in user
    assert user.index("first") < user.index("second")


# ---------------------------------------------------------------- orders and labels


def test_orders_are_ab_and_ba():
    assert ORDERS == ("ab", "ba")


@pytest.mark.parametrize("order, expected", [("ab", ("a", "b")), ("ba", ("b", "a"))])
def test_ordered_answers(order, expected):
    assert ordered_answers("a", "b", order) == expected


def test_ordered_answers_rejects_unknown_order():
    with pytest.raises(ValueError, match="order"):
        ordered_answers("a", "b", "xy")


@pytest.mark.parametrize(
    "label, order, slot",
    [("A", "ab", 1), ("B", "ab", 2), ("A", "ba", 2), ("B", "ba", 1), ("tie", "ab", None), ("tie", "ba", None)],
)
def test_true_slot(label, order, slot):
    assert true_slot(label, order) == slot


@pytest.mark.parametrize(
    "slot, order, label",
    [(1, "ab", "A"), (2, "ab", "B"), (1, "ba", "B"), (2, "ba", "A"), (None, "ab", None), (None, "ba", None), (3, "ab", None)],
)
def test_slot_to_label(slot, order, label):
    assert slot_to_label(slot, order) == label


@pytest.mark.parametrize("label", ["A", "B"])
@pytest.mark.parametrize("order", ["ab", "ba"])
def test_true_slot_and_slot_to_label_are_inverse(label, order):
    slot = true_slot(label, order)
    assert slot_to_label(slot, order) == label
    # and the slot really holds the answer the label points at
    answers = {"A": "answer_a", "B": "answer_b"}
    assert ordered_answers("answer_a", "answer_b", order)[slot - 1] == answers[label]


# ---------------------------------------------------------------- messages and hint


def test_build_messages_with_system():
    template = load_template("en")
    messages = build_messages(template, "What is 2+2?", "4", "5")
    assert [m["role"] for m in messages] == ["system", "user"]
    assert messages[0]["content"] == template.system
    assert messages[1]["content"] == fill(template.user, question="What is 2+2?", answer_1="4", answer_2="5")


def test_build_messages_without_system():
    template = JudgeTemplate(name="t", user=GOOD_USER, hint="({k})")
    messages = build_messages(template, "q", "x", "y")
    assert messages == [{"role": "user", "content": 'Q: q\n1: x\n2: y\nReply {"why": "...", "pick": 1 or 2}'}]


@pytest.mark.parametrize("k", [1, 2])
def test_hint_prefix(k):
    template = load_template("en")
    assert hint_prefix(template, k) == f"(Hint: answer {k} is better. I explain why.)\n"
    assert hint_prefix(load_template("zh"), k) == f"（提示：回答{k}更好。下面解释原因。）\n"


@pytest.mark.parametrize("k", [0, 3, None, "1"])
def test_hint_prefix_rejects_invalid_slot(k):
    with pytest.raises(ValueError, match="1 or 2"):
        hint_prefix(load_template("en"), k)


@pytest.mark.parametrize("name", ["en", "en-brief", "zh"])
def test_judge_verdict_json_parses_back(name):
    template = load_template(name)
    text = judge_verdict_json(template, "Answer 2 is correct.", 2)
    assert json.loads(text) == {template.rationale_key: "Answer 2 is correct.", template.verdict_key: 2}
    verdict = parse_verdict(text)
    assert (verdict.slot, verdict.rationale) == (2, "Answer 2 is correct.")


# ---------------------------------------------------------------- rendering on the real tokenizer
# slow: the tiny_model_dir fixture builds the tiny model (and its tokenizer) on first use.


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from conj_lite.models import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


def _contains(seq, sub):
    return any(seq[i : i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))


@pytest.mark.slow
def test_render_prompt_plain_ends_with_the_generation_prompt(tokenizer):
    template = load_template("en")
    messages = build_messages(template, "What is the capital of France?", "Paris.", "Lyon.")
    rendered = render_prompt(tokenizer, messages)
    without = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert rendered.startswith(without)
    generation_prompt = rendered[len(without) :]
    assert "assistant" in generation_prompt
    assert "Paris." in rendered and "Lyon." in rendered
    assert "Hint" not in rendered


@pytest.mark.slow
@pytest.mark.parametrize("order", ["ab", "ba"])
@pytest.mark.parametrize("k", [1, 2])
def test_render_prompt_hint_reaches_the_model(tokenizer, order, k):
    template = load_template("en")
    answer_1, answer_2 = ordered_answers("Canberra.", "Sydney.", order)
    messages = build_messages(template, "What is the capital of Australia?", answer_1, answer_2)
    hint = hint_prefix(template, k)
    rendered = render_prompt(tokenizer, messages, hint)

    # The hint is in the model input, as its very end, right after the assistant
    # generation prompt: the judgment continues from it.
    with_gen = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    without_gen = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    generation_prompt = with_gen[len(without_gen) :]
    assert generation_prompt.strip()
    assert hint in rendered
    assert rendered.endswith(generation_prompt + hint)
    assert rendered.count(f"answer {k} is better") == 1

    # ...and it survives tokenization: its token ids are the tail of the prompt's ids
    # (tokenized exactly as sampling does it).
    prompt_ids = tokenizer(rendered, add_special_tokens=False).input_ids
    hint_ids = tokenizer(hint, add_special_tokens=False).input_ids
    assert hint_ids and _contains(prompt_ids, hint_ids)
    assert prompt_ids[-len(hint_ids) :] == hint_ids
    decoded = tokenizer.decode(prompt_ids, skip_special_tokens=False)
    assert f"answer {k} is better" in decoded


@pytest.mark.slow
def test_render_prompt_hint_differs_between_true_and_reversed(tokenizer):
    template = load_template("en")
    messages = build_messages(template, "q", "x", "y")
    one = tokenizer(render_prompt(tokenizer, messages, hint_prefix(template, 1)), add_special_tokens=False).input_ids
    two = tokenizer(render_prompt(tokenizer, messages, hint_prefix(template, 2)), add_special_tokens=False).input_ids
    plain = tokenizer(render_prompt(tokenizer, messages), add_special_tokens=False).input_ids
    assert one != two
    assert one[: len(plain)] == plain and two[: len(plain)] == plain


def test_a_tokenizers_own_special_tokens_are_kept_out_of_user_text():
    from conj_lite.prompts import ChatFormat, WORD_JOINER, plain_text, special_texts

    class Tok:  # the two attributes of a Hugging Face tokenizer that special_texts reads
        class Added:
            def __init__(self, content, special):
                self.content, self.special = content, special

        added_tokens_decoder = {0: Added("<file_sep>", True), 1: Added("<jupyter_code>", True),
                                2: Added("<tool>", False), 3: Added("\n\n", True), 4: Added("x", True)}
        all_special_tokens = ["<|im_end|>"]

    special = special_texts(Tok())
    assert special == ("<file_sep>", "<jupyter_code>", "<|im_end|>")  # not one-character or whitespace texts
    text = "a <file_sep> b <jupyter_code><tool>"
    assert plain_text(text, special) == f"a <{WORD_JOINER}file_sep> b <{WORD_JOINER}jupyter_code><tool>"
    assert plain_text(plain_text(text, special), special) == plain_text(text, special)  # idempotent
    chat = ChatFormat(special=special)
    out = chat.messages([{"role": "system", "content": "<file_sep>"}, {"role": "user", "content": text}])
    assert out[0]["content"] == "<file_sep>" and "<file_sep>" not in out[1]["content"]
