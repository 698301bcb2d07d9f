"""Command-line options, each declared once.

Options that are recipe fields come from the config dataclasses (`conj_lite.config`):
`add_config_args` makes one flag per field with the field's default and help text, as
TRL's `HfArgumentParser` does, and `config_from_args` builds the dataclass back from
the parsed flags. So `conj-lite eval --label-map`, `conj-lite judge --label-map` and
`data.label_map` in a recipe are one field, and `conj-lite export` defaults are
ExportConfig's. Options that are no recipe field (how a judge runs, selective
judging) are written here once and shared by the commands that take them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing

from ..config import DataConfig
from ..errors import InputError
from ..judging.calibration import DEFAULT_DELTA
from ..judging.verdicts import DEFAULT_MAX_NEW_TOKENS, MODES

# DataConfig fields a command that reads a data file takes (--data is `path`).
DATA_FIELDS = ("path", "preset", "fields", "label_map", "split", "limit", "skip_invalid")


# ---------------------------------------------------------------- values


def parse_fields(text: str | None) -> dict | None:
    """--fields "question=q,a=x,b=y,label=winner" (label=annotator1+annotator2 for a
    majority vote) or a JSON object."""
    if not text:
        return None
    text = text.strip()
    if text.startswith("{"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"--fields: not valid JSON ({exc.msg})") from None
        if not isinstance(value, dict):
            raise InputError("--fields: expected a JSON object")
        return value
    fields = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        role, sep, column = item.partition("=")
        if not sep or not role.strip() or not column.strip():
            raise InputError(f"--fields: expected role=column pairs such as question=q,a=x,b=y,label=winner; "
                             f"got {item!r}")
        column = column.strip()
        fields[role.strip()] = column.split("+") if "+" in column else column
    return fields


def _comma_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _flag_type(annotation):
    """(argparse type, is_bool) for a field annotation. A union with str keeps the text
    (the field takes text, e.g. label_map "0=A,1=B"); dicts read as role=value pairs or
    JSON, lists as comma-separated items."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        if str in members:
            return str, False
        annotation = members[0]
    if annotation is bool:
        return None, True
    if annotation in (int, float, str):
        return annotation, False
    if annotation is dict:
        return parse_fields, False
    if annotation is list or typing.get_origin(annotation) is list:
        return _comma_list, False
    return str, False


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _shown(value) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value)) or "none"
    if isinstance(value, dict):
        return json.dumps(value) if value else "none"
    return str(value)


# ---------------------------------------------------------------- generated flags


def add_config_args(parser, cls, names=None, *, prefix: str = "", flags: dict | None = None,
                    defaults: dict | None = None, required=(), choices: dict | None = None,
                    metavars: dict | None = None) -> None:
    """One flag per field of the dataclass `cls` (or of the fields in `names`): its name
    with dashes (`--label-map`), its default and its help text.

    flags: field -> flag names that replace the generated one (the first is shown,
    e.g. {"path": ["--data"]}); defaults: field -> a default for this command instead
    of the field's; required: fields the command needs; choices/metavars: per field.
    The parsed value lands in `prefix + field name`; `config_from_args` reads it back."""
    flags, defaults, choices, metavars = flags or {}, defaults or {}, choices or {}, metavars or {}
    hints = typing.get_type_hints(cls)
    by_name = {f.name: f for f in dataclasses.fields(cls)}
    for name in names or by_name:
        f = by_name[name]
        kind, is_bool = _flag_type(hints[name])
        default = defaults[name] if name in defaults else _default(f)
        help_text = f.metadata.get("help", "")
        options = flags.get(name) or [f"--{name.replace('_', '-')}"]
        kwargs = {"dest": prefix + name, "default": default}
        if is_bool:
            kwargs["action"] = argparse.BooleanOptionalAction if default else "store_true"
        else:
            kwargs["type"] = kind
            if name in choices:
                kwargs["choices"] = choices[name]
            if name in metavars:
                kwargs["metavar"] = metavars[name]
            if name in required:
                kwargs["required"] = True
            elif default not in (None, "", [], {}):
                help_text += f" (default {_shown(default)})"
        parser.add_argument(*options, help=help_text, **kwargs)


def config_from_args(cls, args, names=None, *, prefix: str = "", base=None):
    """The dataclass `cls` (`base` or its defaults) with the fields in `names` set from
    the flags `add_config_args` made."""
    base = base if base is not None else cls()
    values = {name: getattr(args, prefix + name) for name in names or [f.name for f in dataclasses.fields(cls)]
              if hasattr(args, prefix + name)}
    return dataclasses.replace(base, **values)


def add_data_args(parser, *, required: bool) -> None:
    """--data, --preset, --fields, --label-map, --split, --limit: `data.*` of a recipe."""
    add_config_args(parser, DataConfig, DATA_FIELDS, flags={"path": ["--data"]}, defaults={"path": None},
                    required=("path",) if required else (), metavars={"path": "PATH"})


def data_options(args) -> dict:
    """load_pairs keyword arguments (beyond the path) from add_data_args' flags."""
    data = config_from_args(DataConfig, args, DATA_FIELDS)
    fields = data.fields or None
    return {"preset": "auto" if fields else data.preset, "fields": fields, "label_map": data.label_map or None,
            "split": data.split, "limit": data.limit, "skip_invalid": data.skip_invalid}


def describe_loaded(loaded, source) -> str:
    """One line on how a data file was read: layout and columns, label mapping, and the
    rows converted to text, kept empty or rejected (for eval and judge to print)."""
    line = f"{source}: {loaded.describe()}"
    if loaded.n_rejected:
        line += f"; {loaded.n_rejected} broken rows skipped, listed in {loaded.rejects_path}"
    return line


# ---------------------------------------------------------------- judging options


def add_runtime_args(p) -> None:
    """How a judge runs: --mode, --threads, --ctx, --max-new-tokens, --template,
    --extra-bufts (shared by `conj-lite judge` and `conj-lite eval`)."""
    p.add_argument("--mode", default="rationale", choices=MODES,
                   help="rationale: write a rationale then the verdict; verdict: read the verdict probabilities "
                   "right after the prompt (fast, no rationale)")
    p.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    p.add_argument("--ctx", type=int, help="context size in tokens (default: min(4096, the model's))")
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                   help=f"longest rationale + verdict in tokens (default {DEFAULT_MAX_NEW_TOKENS})")
    p.add_argument("--template", help="judge template (default: the one stored with the model, else en)")
    p.add_argument("--extra-bufts", action="store_true",
                   help="gguf: let llama.cpp repack weights into its extra CPU buffers (faster on some CPUs, "
                   "segfaults with quantized files on AMX CPUs)")


def runtime_options(args) -> dict:
    """open_judge keyword arguments from add_runtime_args' flags."""
    return {"mode": args.mode, "n_threads": args.threads, "n_ctx": args.ctx, "max_new_tokens": args.max_new_tokens,
            "template": args.template, "use_extra_bufts": args.extra_bufts}


def add_risk_args(parser) -> None:
    """--risk, --calibration, --delta, --calibration-preset on a command's parser."""
    group = parser.add_argument_group(
        "selective judging",
        "abstain below a confidence threshold that keeps the error rate among accepted judgments "
        "at most --risk (with probability >= 1 - --delta), calibrated on labelled pairs",
    )
    group.add_argument("--risk", type=float, metavar="ALPHA",
                       help="largest acceptable error rate among answered pairs, e.g. 0.1 (needs --calibration)")
    group.add_argument("--calibration", metavar="FILE",
                       help="labelled pairs to calibrate the threshold on (any data format), or a judgments "
                       "JSONL with p_a and label per pair (from `conj-lite judge --output` or `conj-lite eval`)")
    group.add_argument("--delta", type=float, default=DEFAULT_DELTA,
                       help=f"allowed chance that the calibration split is unluckily optimistic (default {DEFAULT_DELTA})")
    group.add_argument("--calibration-preset", default="auto", help="column layout of --calibration (see conj_lite.data)")
