"""What conj-lite writes into its artifacts, and how it reads them back.

    adapter/  conj_lite_train.json   (TRAIN_META: base model, template, 4-bit, ...)  by conj_lite.training
    merged/   conj_lite_merge.json   (MERGE_META: written last, marks a complete merge) by conj_lite.export
    *.gguf    conj_lite.judge_template, conj_lite.version   (GGUF metadata keys)     by conj_lite.export

`describe_source` tells what a training output directory is (adapter or model, its
base and judge template); `resolve_template` turns what was recorded back into a
`JudgeTemplate`; `has_gguf_magic` / `is_gguf_path` / `read_gguf_metadata` recognise and
check GGUF files. Readers (the judge, export) and writers (training, export) share
these names, so a key is spelled once.
"""

from __future__ import annotations

from pathlib import Path

from .errors import InputError
from .jsonio import read_json
from .prompts import JudgeTemplate, load_template

TRAIN_META = "conj_lite_train.json"  # written by conj_lite.training next to the adapter
MERGE_META = "conj_lite_merge.json"  # written last into merged/: its presence marks completion
GGUF_TEMPLATE_KEY = "conj_lite.judge_template"
GGUF_VERSION_KEY = "conj_lite.version"
GGUF_MAGIC = b"GGUF"


# ---------------------------------------------------------------- training outputs


def describe_source(path: str | Path) -> dict:
    """What a training output is: {"kind": "adapter"|"model", "base": ..., "template": ...,
    "load_in_4bit": ...}. InputError for a directory that is neither."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such adapter or model directory")
    if not path.is_dir():
        raise InputError(f"{path}: expected a directory (a LoRA adapter or a transformers model), got a file")
    meta = read_json(path / TRAIN_META) if (path / TRAIN_META).is_file() else {}
    if (path / "adapter_config.json").is_file():
        adapter_cfg = read_json(path / "adapter_config.json")
        base = meta.get("base_model") or adapter_cfg.get("base_model_name_or_path")
        if not base:
            raise InputError(f"{path}: the adapter does not name its base model; pass --base")
        return {"kind": "adapter", "base": base, "template": meta.get("template"),
                "load_in_4bit": bool(meta.get("load_in_4bit", False))}
    if (path / "config.json").is_file():
        merge_meta = read_json(path / MERGE_META) if (path / MERGE_META).is_file() else {}
        return {"kind": "model", "base": str(path), "template": merge_meta.get("template") or meta.get("template"),
                "load_in_4bit": False}
    raise InputError(
        f"{path}: not a model directory: no adapter_config.json (a LoRA adapter) and no config.json (a transformers model)"
    )


def resolve_template(value) -> JudgeTemplate:
    """A JudgeTemplate from a name, a file path, a dict (as embedded in GGUF/merge
    metadata) or None (the default "en")."""
    if isinstance(value, JudgeTemplate):
        return value
    if isinstance(value, dict):
        try:
            return JudgeTemplate(**value)
        except TypeError as exc:
            raise InputError(f"judge template metadata is not a template: {exc}") from None
    try:
        return load_template(value or "en")
    except ValueError as exc:
        raise InputError(f"{exc}; pass --template with a built-in name or an existing file") from None


# ---------------------------------------------------------------- GGUF files


def has_gguf_magic(path: str | Path) -> bool:
    """Whether the file starts with the GGUF magic (a quick header check)."""
    try:
        with open(path, "rb") as handle:
            return handle.read(4) == GGUF_MAGIC
    except OSError:
        return False


def is_gguf_path(path: str | Path) -> bool:
    """Whether a path names a GGUF file: by its .gguf suffix or, for a file named
    otherwise, by its magic."""
    return Path(path).suffix.lower() == ".gguf" or has_gguf_magic(path)


def read_gguf_metadata(path: str | Path) -> dict:
    """Check that `path` is a complete GGUF file and return its scalar/string metadata.

    Everything that would make llama.cpp fail (or worse) on a bad file is checked here
    first, in Python: the magic, the header, the tensor table, and that every tensor's
    data lies inside the file."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such GGUF file")
    if path.is_dir():
        raise InputError(f"{path}: is a directory; pass a .gguf file (or use --backend hf for a transformers model)")
    size = path.stat().st_size
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise InputError(f"{path}: not a GGUF file (it starts with {magic!r}, not {GGUF_MAGIC!r})")
    try:
        import gguf
    except ImportError:
        raise InputError('reading GGUF files needs the gguf package: pip install "conj-lite[export]"') from None
    try:
        reader = gguf.GGUFReader(str(path), "r")
    except Exception as exc:  # gguf raises ValueError, IndexError, struct errors... on broken files
        raise InputError(f"{path}: corrupt or truncated GGUF file ({type(exc).__name__}: {exc})") from None
    for tensor in reader.tensors:
        end = int(tensor.data_offset) + int(tensor.n_bytes)
        if end > size:
            raise InputError(f"{path}: truncated GGUF file: tensor {tensor.name} ends at byte {end}, the file has {size}")
    if not reader.tensors:
        raise InputError(f"{path}: the GGUF file holds no tensors (a vocabulary-only file?)")
    meta = {}
    for key, fld in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and key.rsplit(".", 1)[-1] in ("tokens", "scores", "token_type", "merges"):
            continue
        try:
            meta[key] = fld.contents()
        except Exception:
            continue
    if "general.architecture" not in meta:
        raise InputError(f"{path}: the GGUF file has no general.architecture; it is not a model")
    return meta
