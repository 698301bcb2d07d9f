"""What conj-lite writes into its artifacts, and how it reads them back.

    adapter/  conj_lite_train.json   (TRAIN_META: base model, template, 4-bit, ...)  by conj_lite.training
    merged/   conj_lite_merge.json   (MERGE_META: written last, marks a complete merge) by conj_lite.export
    *.gguf    conj_lite.judge_template, conj_lite.chat_date, conj_lite.version
                                             (GGUF metadata keys)                        by conj_lite.export

`describe_source` tells what a training output directory is (adapter or model, its
base and judge template); `resolve_template` turns what was recorded back into a
`JudgeTemplate`; `has_gguf_magic` / `is_gguf_path` / `read_gguf_metadata` recognise and
check GGUF files. Readers (the judge, export) and writers (training, export) share
these names, so a key is spelled once.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .errors import InputError
from .jsonio import read_json
from .prompts import JudgeTemplate, load_template

TRAIN_META = "conj_lite_train.json"  # written by conj_lite.training next to the adapter
MERGE_META = "conj_lite_merge.json"  # written last into merged/: its presence marks completion
GGUF_TEMPLATE_KEY = "conj_lite.judge_template"
GGUF_VERSION_KEY = "conj_lite.version"
# The date training gave chat templates that print one (prompts.date_string; Llama 3.x):
# the judge renders its prompts with the same date.
GGUF_CHAT_DATE_KEY = "conj_lite.chat_date"
GGUF_MAGIC = b"GGUF"


# ---------------------------------------------------------------- training outputs


def describe_source(path: str | Path) -> dict:
    """What a training output is: {"kind": "adapter"|"model", "base": ..., "template": ...,
    "chat_date": ..., "load_in_4bit": ...} (chat_date: the date training gave the chat
    template, None when not recorded). InputError for a directory that is neither."""
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
        return {"kind": "adapter", "base": base, "template": meta.get("template"), "chat_date": meta.get("chat_date"),
                "load_in_4bit": bool(meta.get("load_in_4bit", False))}
    if (path / "config.json").is_file():
        merge_meta = read_json(path / MERGE_META) if (path / MERGE_META).is_file() else {}
        return {"kind": "model", "base": str(path), "template": merge_meta.get("template") or meta.get("template"),
                "chat_date": merge_meta.get("chat_date") or meta.get("chat_date"), "load_in_4bit": False}
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
    """Check that `path` is a complete GGUF file and return its metadata (scalars, strings
    and arrays, less the tokenizer's vocabulary arrays).

    Everything that would make llama.cpp fail (or worse) on a bad file is checked here
    first, in Python: the magic, the header, the tensor table, and that every tensor's
    data lies inside the file. The header is walked directly (`walk_gguf_header`), not
    with gguf.GGUFReader, which builds an array for each of the ~100k vocabulary
    strings and merges (1.5-2 s for SmolLM2 at every judge start)."""
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
        meta, tensors = walk_gguf_header(path, gguf.GGML_QUANT_SIZES)
    except Exception as exc:  # struct errors, bad types, sizes past the end... on broken files
        raise InputError(f"{path}: corrupt or truncated GGUF file ({type(exc).__name__}: {exc})") from None
    for name, end in tensors:
        if end > size:
            raise InputError(f"{path}: truncated GGUF file: tensor {name} ends at byte {end}, the file has {size}")
    if not tensors:
        raise InputError(f"{path}: the GGUF file holds no tensors (a vocabulary-only file?)")
    if "general.architecture" not in meta:
        raise InputError(f"{path}: the GGUF file has no general.architecture; it is not a model")
    return meta


# GGUF value types (gguf.GGUFValueType): struct format of each fixed-size one; 8 string, 9 array
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9
_VOCAB_ARRAYS = ("tokens", "scores", "token_type", "merges")


def walk_gguf_header(path: str | Path, quant_sizes: dict) -> tuple[dict, list[tuple[str, int]]]:
    """(metadata, [(tensor name, byte where its data ends)]) of a GGUF file, read from its
    header (version 2 or 3, either byte order). The tokenizer's vocabulary arrays are
    stepped over, not read. `quant_sizes`: ggml type -> (block size, bytes per block)."""
    import math
    import mmap
    import struct

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        order = "<"
        (version,) = struct.unpack_from("<I", buf, 4)
        if version > 0xFFFF:
            order, (version,) = ">", struct.unpack_from(">I", buf, 4)
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} (2 and 3 are read)")
        n_tensors, n_kv = struct.unpack_from(order + "QQ", buf, 8)
        pos = 24

        def take(fmt: str):
            nonlocal pos
            values = struct.unpack_from(order + fmt, buf, pos)
            pos += struct.calcsize(order + fmt)
            return values[0] if len(values) == 1 else values

        def string(keep: bool = True):
            nonlocal pos
            n = take("Q")
            if pos + n > len(buf):
                raise ValueError(f"a string of {n} bytes runs past the end of the file")
            pos += n
            return bytes(buf[pos - n:pos]).decode("utf-8", errors="replace") if keep else None

        def value(kind: int, keep: bool = True):
            nonlocal pos
            if kind in _GGUF_SCALARS:
                return take(_GGUF_SCALARS[kind])
            if kind == _GGUF_STRING:
                return string(keep)
            if kind != _GGUF_ARRAY:
                raise ValueError(f"unknown GGUF value type {kind}")
            item, count = take("I"), take("Q")
            if item in _GGUF_SCALARS and not keep:
                pos += count * struct.calcsize(order + _GGUF_SCALARS[item])
                if pos > len(buf):
                    raise ValueError("an array runs past the end of the file")
                return None
            return [value(item, keep) for _ in range(count)]

        meta = {"GGUF.version": version, "GGUF.tensor_count": n_tensors, "GGUF.kv_count": n_kv}  # as GGUFReader
        for _ in range(n_kv):
            key = string()
            kind = take("I")
            keep = not (key.startswith("tokenizer.ggml.") and key.rsplit(".", 1)[-1] in _VOCAB_ARRAYS)
            got = value(kind, keep)
            if keep:
                meta[key] = got
        infos = []
        for _ in range(n_tensors):
            name = string()
            dims = take("I")
            shape = [take("Q") for _ in range(dims)]
            ggml_type, offset = take("I"), take("Q")
            block, block_bytes = quant_sizes[ggml_type]
            infos.append((name, offset, math.prod(shape) // block * block_bytes))
        alignment = int(meta.get("general.alignment", 32))
        start = (pos + alignment - 1) // alignment * alignment
    return meta, [(name, start + offset + n_bytes) for name, offset, n_bytes in infos]


# ---------------------------------------------------------------- identities (provenance)

# What made a stored result: every stored judgment file, calibration cache and pipeline
# stage records the identity of its inputs (`path_identity`) and a few settings, and a
# resumed run compares them (`identity_changes`) before it reuses anything.
HEAD_BYTES = 4 << 20  # hashed whole: a GGUF header + tensor index, configs, safetensors headers
SPOT_BYTES = 64 << 10  # and this much at SPOTS evenly spaced places of a larger file (its weights)
SPOTS = 16
FULL_HASH_BYTES = 32 << 20  # files up to this size are hashed whole


def file_digest(path: str | Path) -> str:
    """A sha256 of a file: the whole file up to FULL_HASH_BYTES, else its first HEAD_BYTES
    (a GGUF's metadata and tensor index; a safetensors header), SPOTS slices of its
    weights and its last SPOT_BYTES. Fast on a multi-GB file, and a retrained model of
    the same shape (same header, other weights) still gets another digest."""
    path = Path(path)
    size = path.stat().st_size
    digest = hashlib.sha256(f"{size}:".encode())
    with open(path, "rb") as handle:
        if size <= FULL_HASH_BYTES:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
            return digest.hexdigest()[:16]
        digest.update(handle.read(HEAD_BYTES))
        for k in range(SPOTS + 1):
            handle.seek(HEAD_BYTES + (size - HEAD_BYTES - SPOT_BYTES) * k // SPOTS)
            digest.update(handle.read(SPOT_BYTES))
    return "s" + digest.hexdigest()[:15]  # "s": sampled


def _skipped(rel: Path) -> bool:
    return any(part.startswith(".") or part.startswith("checkpoint") or part.endswith(".partial")
               for part in rel.parts)


def path_identity(path) -> dict | None:
    """What a model file, a model/adapter directory or a data file is, for provenance:

        file:      {"kind": "file", "path", "size", "mtime", "digest"}
        directory: {"kind": "dir", "path", "files": {name: [size, digest]}, "digest"}
        else:      {"kind": "name", "name"}   (a hub id, "tiny" before it is resolved)

    `digest` is what `identity_changes` compares; path and mtime are kept to say where
    a result came from (a copied or touched file with the same bytes is the same judge)."""
    if path is None:
        return None
    p = Path(path)
    if p.is_file():
        stat = p.stat()
        return {"kind": "file", "path": str(p.resolve()), "size": stat.st_size, "mtime": int(stat.st_mtime),
                "digest": file_digest(p)}
    if p.is_dir():
        files = {}
        for item in sorted(p.rglob("*")):
            rel = item.relative_to(p)
            if item.is_file() and not _skipped(rel):
                files[rel.as_posix()] = [item.stat().st_size, file_digest(item)]
        digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16]
        return {"kind": "dir", "path": str(p.resolve()), "files": files, "digest": digest}
    return {"kind": "name", "name": str(path)}


def identity_key(identity) -> object:
    """The part of an identity (or of any recorded value) that decides sameness."""
    if isinstance(identity, dict):
        if identity.get("kind") in ("file", "dir"):
            return identity.get("digest")
        return {k: identity_key(v) for k, v in identity.items()}
    if isinstance(identity, (list, tuple)):
        return [identity_key(v) for v in identity]
    return identity


def fingerprint_id(record: dict) -> str:
    """A short id of a provenance record (12 hex digits) that changes when any
    compared field does."""
    blob = json.dumps(identity_key(record), sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:12]


def _shown(value) -> str:
    if isinstance(value, dict) and value.get("kind") == "file":
        return f"{value.get('path')} ({value.get('size')} bytes, digest {value.get('digest')})"
    if isinstance(value, dict) and value.get("kind") == "dir":
        return f"{value.get('path')} ({len(value.get('files', {}))} files, digest {value.get('digest')})"
    if isinstance(value, dict) and value.get("kind") == "name":
        return repr(value.get("name"))
    text = json.dumps(value, ensure_ascii=False, default=str, sort_keys=True)
    return text if len(text) <= 120 else text[:117] + "..."


def identity_changes(before: dict, now: dict, prefix: str = "") -> list[str]:
    """The fields whose compared values differ, each as "field: was X, now Y" (dotted
    names for nested settings); [] when the two records describe the same inputs."""
    out = []
    for key in sorted(set(before) | set(now), key=str):
        a, b = before.get(key), now.get(key)
        name = f"{prefix}{key}"
        if identity_key(a) == identity_key(b):
            continue
        if (isinstance(a, dict) and isinstance(b, dict) and a.get("kind") is None and b.get("kind") is None):
            out += identity_changes(a, b, name + ".")
        else:
            out.append(f"{name}: was {_shown(a)}, now {_shown(b)}")
    return out
