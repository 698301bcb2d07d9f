"""The recipe schema: defaults, every shipped recipe, overrides, and clear errors."""

import json
import dataclasses
from pathlib import Path

import pytest
import yaml

from conj_lite.config import (
    FilterConfig,
    Recipe,
    load_recipe,
    parse_override,
    recipe_from_dict,
    save_recipe,
)
from conj_lite.errors import InputError

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "conj_lite" / "recipes").glob("*.yaml"))


def write(tmp_path, text, name="r.yaml"):
    path = tmp_path / name
    path.write_text(text, "utf-8")
    return path


# ---------------------------------------------------------------- defaults and shipped recipes


def test_defaults_load_with_the_paper_settings():
    recipe = load_recipe()
    assert recipe == Recipe()
    s = recipe.sampling
    assert (s.n_repeats, s.hint_samples, s.temperature, s.top_p, s.repetition_penalty, s.max_new_tokens) == (
        8, 1, 1.2, 0.95, 1.2, 512,
    )
    assert s.both_orders is True and s.hints is True
    assert recipe.filtering.max_pairs == 3
    assert recipe.model.name_or_path == "tiny"
    assert recipe.prompts.template == "en"


def test_every_field_has_help():
    import typing

    seen = []

    def walk(cls):
        seen.append(cls.__name__)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help"
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name])

    walk(Recipe)
    assert {"ModelConfig", "TinyConfig", "SamplingConfig", "FilterConfig", "TrainConfig"} <= set(seen)


def test_list_defaults_are_not_shared():
    one, two = Recipe(), Recipe()
    one.training.target_modules.append("lm_head")
    assert "lm_head" not in two.training.target_modules


def test_there_are_shipped_recipes():
    assert any(p.name == "tiny-cpu.yaml" for p in RECIPES)


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_shipped_recipe_loads(path):
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe)
    raw = yaml.safe_load(path.read_text("utf-8"))

    def check(written, loaded, where):  # every value written in the file is the one loaded
        for key, value in written.items():
            if isinstance(value, dict):
                check(value, loaded[key], f"{where}{key}.")
            else:
                assert loaded[key] == value, f"{where}{key}"

    check(raw, recipe.to_dict(), "")
    # the header says how to run it
    header = path.read_text("utf-8").split("\n\n")[0]
    assert "conj-lite" in header


def test_tiny_cpu_recipe_values():
    recipe = load_recipe(REPO / "conj_lite" / "recipes" / "tiny-cpu.yaml")
    assert recipe.model.load_in_4bit is False
    assert recipe.sampling.n_repeats == 4
    assert recipe.training.learning_rate == pytest.approx(2.0e-3)
    assert isinstance(recipe.training.epochs, float) and recipe.training.epochs == 3.0  # int -> float
    assert recipe.export.quant_types == ["q8_0", "q4_k_m"]
    # untouched sections keep their defaults
    assert recipe.filtering.max_rationale_chars == FilterConfig().max_rationale_chars


# ---------------------------------------------------------------- overrides


def test_overrides_with_dotted_keys_and_yaml_values(tmp_path):
    path = write(tmp_path, "sampling:\n  n_repeats: 4\n")
    recipe = load_recipe(
        path,
        [
            "sampling.n_repeats=2",
            "sampling.temperature=0.7",
            "sampling.hints=false",
            "model.tiny.hidden_size=512",
            "data.limit=10",
            "data.label_map={'0': A, '1': B}",
            "export.quant_types=[q8_0]",
            "model.load_in_4bit=null",
            "name = spaced",
        ],
    )
    assert recipe.sampling.n_repeats == 2
    assert recipe.sampling.temperature == 0.7
    assert recipe.sampling.hints is False
    assert recipe.model.tiny.hidden_size == 512
    assert recipe.data.limit == 10
    assert recipe.data.label_map == {"0": "A", "1": "B"}
    assert recipe.export.quant_types == ["q8_0"]
    assert recipe.model.load_in_4bit is None
    assert recipe.name == "spaced"


def test_override_lists_from_comma_strings():
    recipe = load_recipe(None, ["training.target_modules=q_proj, v_proj,", "export.quant_types=q4_k_m"])
    assert recipe.training.target_modules == ["q_proj", "v_proj"]
    assert recipe.export.quant_types == ["q4_k_m"]


def test_override_value_with_equals_sign_and_empty_value():
    recipe = load_recipe(None, ["description=a=b", "data.path="])
    assert recipe.description == "a=b"
    assert recipe.data.path == ""


def test_override_int_into_float_and_number_into_string():
    recipe = load_recipe(None, ["training.epochs=2", "model.name_or_path=7"])
    assert recipe.training.epochs == 2.0 and isinstance(recipe.training.epochs, float)
    assert recipe.model.name_or_path == "7"


def test_parse_override():
    assert parse_override("sampling.n_repeats=4") == (["sampling", "n_repeats"], 4)
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])
    with pytest.raises(InputError, match="section.key=value"):
        parse_override("sampling.n_repeats")


def test_override_with_broken_yaml_list_is_an_input_error():
    with pytest.raises(InputError, match="override"):
        load_recipe(None, ["training.target_modules=[q_proj"])


def test_override_value_yaml_cannot_read_is_kept_as_text():
    assert load_recipe(None, ["data.path=@data.jsonl"]).data.path == "@data.jsonl"


def test_float_in_exponent_notation_is_accepted(tmp_path):
    recipe = load_recipe(write(tmp_path, "training:\n  learning_rate: 5e-5\n"), ["training.beta=1e-1"])
    assert recipe.training.learning_rate == pytest.approx(5e-5)
    assert recipe.training.beta == pytest.approx(0.1)


def test_use_unsloth_yes_no_as_documented(tmp_path):
    """YAML 1.1 reads yes/no as booleans; both spellings mean the same to the runtime."""
    import torch

    from conj_lite.models import resolve_runtime

    no = load_recipe(write(tmp_path, "model:\n  use_unsloth: no\n  load_in_4bit: false\n"))
    assert resolve_runtime(no.model).use_unsloth is False
    yes = load_recipe(None, ["model.use_unsloth=yes", "model.load_in_4bit=false"])
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="unsloth"):
            resolve_runtime(yes.model)
    with pytest.raises(InputError, match="auto, yes or no"):
        resolve_runtime(load_recipe(None, ["model.use_unsloth=maybe"]).model)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "text, needles",
    [
        ("samplng:\n  n_repeats: 2\n", ["samplng", "sampling"]),  # unknown section, known ones listed
        ("sampling:\n  n_repeat: 2\n", ["sampling", "n_repeat", "n_repeats"]),
        ("model:\n  tiny:\n    hiden_size: 8\n", ["model.tiny", "hiden_size"]),
        ("sampling:\n  hints: 'yes please'\n", ["sampling.hints", "true/false"]),
        ("sampling:\n  both_orders: 'true'\n", ["sampling.both_orders", "true/false"]),
        ("sampling:\n  n_repeats: 2.5\n", ["sampling.n_repeats", "integer"]),
        ("sampling:\n  n_repeats: true\n", ["sampling.n_repeats", "integer"]),
        ("sampling:\n  n_repeats: '4'\n", ["sampling.n_repeats", "integer"]),
        ("sampling:\n  temperature: hot\n", ["sampling.temperature", "number"]),
        ("sampling:\n  temperature: false\n", ["sampling.temperature", "number"]),
        ("model:\n  name_or_path: [a, b]\n", ["model.name_or_path", "string"]),
        ("model:\n  name_or_path: true\n", ["model.name_or_path", "string"]),
        ("training:\n  target_modules: 3\n", ["training.target_modules", "list"]),
        ("data:\n  fields: [a]\n", ["data.fields", "mapping"]),
        ("sampling: 3\n", ["sampling", "mapping"]),
        ("- a\n- b\n", ["mapping"]),
    ],
    ids=[
        "unknown-section", "unknown-key", "unknown-nested-key", "bool-given-string", "bool-given-quoted-true",
        "int-given-float", "int-given-bool", "int-given-string", "float-given-string", "float-given-bool",
        "str-given-list", "str-given-bool", "list-given-int", "dict-given-list", "section-given-int",
        "recipe-not-a-mapping",
    ],
)
def test_bad_recipe_is_an_input_error_naming_file_and_key(tmp_path, text, needles):
    path = write(tmp_path, text)
    with pytest.raises(InputError) as info:
        load_recipe(path)
    message = str(info.value)
    assert message.startswith(f"{path}:")
    for needle in needles:
        assert needle in message


def test_bad_override_type_names_the_key():
    with pytest.raises(InputError) as info:
        load_recipe(None, ["sampling.n_repeats=many"])
    assert "sampling.n_repeats" in str(info.value) and "integer" in str(info.value)
    with pytest.raises(InputError, match="name is not a section"):
        load_recipe(REPO / "conj_lite" / "recipes" / "tiny-cpu.yaml", ["name.sub=1"])
    with pytest.raises(InputError, match="name: expected a string"):
        load_recipe(None, ["name.sub=1"])
    with pytest.raises(InputError, match="unknown key"):
        load_recipe(None, ["sampling.n_repeatz=1"])


def test_input_error_is_a_value_error():
    assert issubclass(InputError, ValueError)


def test_bad_yaml_error_has_file_and_line(tmp_path):
    path = write(tmp_path, "name: x\nsampling:\n  n_repeats: [1, 2\n  top_p: 0.9\nfiltering: {\n")
    with pytest.raises(InputError) as info:
        load_recipe(path)
    message = str(info.value)
    assert message.startswith(f"{path}:")
    line = message[len(str(path)) + 1 :].split(":", 1)[0]
    assert line.isdigit() and 3 <= int(line) <= 6
    assert "YAML" in message


def test_tab_indented_yaml_error_points_at_the_line(tmp_path):
    path = write(tmp_path, "name: x\nsampling:\n\tn_repeats: 2\n")
    with pytest.raises(InputError) as info:
        load_recipe(path)
    assert str(info.value).startswith(f"{path}:3:")


def test_missing_recipe_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(InputError) as info:
        load_recipe(missing)
    assert str(missing) in str(info.value) and "not found" in str(info.value)


def test_empty_recipe_file_is_all_defaults(tmp_path):
    assert load_recipe(write(tmp_path, "# nothing yet\n")) == Recipe()


def test_recipe_from_dict_names_its_source():
    with pytest.raises(InputError, match=r"^notebook: sampling\.top_p"):
        recipe_from_dict({"sampling": {"top_p": "high"}}, "notebook")


# ---------------------------------------------------------------- round trip


def test_save_and_load_round_trip(tmp_path):
    recipe = load_recipe(
        REPO / "conj_lite" / "recipes" / "tiny-cpu.yaml",
        [
            "data.fields={question: q, a: x, b: y, label: l}",
            "data.label_map={'0': A, '1': B}",
            "data.limit=5",
            "training.learning_rate=0.00005",
            "export.llama_cpp_dir=/opt/llama.cpp",
            "description=Ünïcode 判断",
        ],
    )
    path = tmp_path / "saved.yaml"
    save_recipe(recipe, path)
    again = load_recipe(path)
    assert again == recipe
    assert again.to_dict() == recipe.to_dict()


def test_defaults_round_trip(tmp_path):
    path = tmp_path / "defaults.yaml"
    save_recipe(Recipe(), path)
    assert load_recipe(path) == Recipe()
    saved = yaml.safe_load(path.read_text("utf-8"))
    assert list(saved) == [f.name for f in dataclasses.fields(Recipe)]


def test_label_map_is_a_mapping_text_or_a_named_map(tmp_path, sample_data):
    from conj_lite.pipeline import ConjRun

    assert load_recipe(None, ["data.label_map=autoj"]).data.label_map == "autoj"
    assert load_recipe(None, ["data.label_map=0=A,1=B"]).data.label_map == "0=A,1=B"
    with pytest.raises(InputError, match="data.label_map"):
        load_recipe(None, ["data.label_map=[1, 2]"])
    # A named map reaches the loader: Auto-J style 0/1/2 labels.
    rows = [{"question": "q", "answer_a": "x", "answer_b": "y", "label": str(i % 3)} for i in range(6)]
    path = tmp_path / "autoj.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = ConjRun.from_recipe(None, tmp_path / "run", [f"data.path={path}", "data.label_map=autoj"])
    assert [p.label for p in run.data().pairs] == ["A", "B", "tie"] * 2


# ---------------------------------------------------------------- values checked at load (issue 11)


@pytest.mark.parametrize("overrides", [["sampling.temperature=0"], ["sampling.temperature=0.0", "sampling.n_repeats=2"],
                                       ["sampling.temperature=0", "sampling.n_repeats=1", "sampling.hint_samples=2"]])
def test_greedy_sampling_with_repeats_is_refused_at_load(overrides):
    with pytest.raises(InputError) as info:
        load_recipe(None, overrides)
    message = str(info.value)
    assert message.startswith("defaults: sampling.temperature: 0 means greedy decoding")
    assert "n_repeats=1 and hint_samples=1" in message


def test_greedy_sampling_with_one_sample_each_is_fine():
    recipe = load_recipe(None, ["sampling.temperature=0", "sampling.n_repeats=1", "sampling.hint_samples=1"])
    assert recipe.sampling.temperature == 0


def test_negative_temperature_is_refused():
    with pytest.raises(InputError, match="sampling.temperature: expected 0 or more"):
        load_recipe(None, ["sampling.temperature=-1"])


def test_chat_date_is_a_pinned_recipe_field(tmp_path):
    recipe = load_recipe(None, ["prompts.date_string=01 Jan 2025"])
    assert recipe.prompts.date_string == "01 Jan 2025"
    save_recipe(recipe, tmp_path / "r.yaml")  # recorded with the run
    assert load_recipe(tmp_path / "r.yaml").prompts.date_string == "01 Jan 2025"
    with pytest.raises(InputError, match="prompts.date_string: empty"):
        load_recipe(None, ["prompts.date_string= "])
