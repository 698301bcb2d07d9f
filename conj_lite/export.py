"""Stage S4: ship the trained judge as GGUF files that run on a CPU.

    adapter/ ──merge (peft)──▶ merged/ ──llama.cpp converter──▶ gguf/judge-f16.gguf
                                                 └─llama_model_quantize─▶ gguf/judge-q8_0.gguf, judge-q4_k_m.gguf, …

1. Merge: the LoRA adapter is merged into 16-bit weights with peft and saved as
   safetensors with the tokenizer. A 4-bit (QLoRA) base is reloaded in 16 bits for the
   merge. The tokenizer is made explicit for llama.cpp: whether it adds BOS/EOS is
   written down (llama.cpp would otherwise guess), and the judge's system prompt becomes
   the chat template's default, so plain llama.cpp / Ollama chat prompts the judge the
   way it was trained.
2. Convert: llama.cpp's own `convert_hf_to_gguf.py`, never a home-made writer. It ships
   only in the llama-cpp-python source release (`vendor/llama.cpp`), at the commit of the
   runtime the user has installed, so that exact release is fetched with pip into the
   conj-lite cache (or taken from `$CONJ_LITE_LLAMA_SDIST`, or from a llama.cpp checkout
   the user names). The judge template is added to the GGUF metadata
   (`conj_lite.judge_template`) with gguf-py's own copy tool, so a .gguf file alone is a
   complete judge.
3. Quantize in-process with `llama_cpp.llama_model_quantize`. Tensors whose rows do not
   fit a type's blocks fall back to another type, as llama.cpp decides; the tensor types
   of every output are read back and the fallbacks reported.

Every output is written under a temporary name and renamed when complete; a manifest
(`gguf/export.json`) records what each file was made from, so a re-run skips finished
work and redoes stale work.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from . import __version__
from .artifacts import (
    GGUF_CHAT_DATE_KEY,
    GGUF_TEMPLATE_KEY,
    GGUF_VERSION_KEY,
    MERGE_META,
    TRAIN_META,  # noqa: F401  (re-exported: conj_lite.export.TRAIN_META)
    describe_source,
    has_gguf_magic,
    resolve_template,
)
from .errors import InputError
from .judging.verify import VerifyReport, print_verify, verify_export
from .jsonio import read_json, staged_dir, write_json
from .progress import get_console
from .prompts import DEFAULT_CHAT_DATE, JudgeTemplate
from .system import exclusive
from .tiny import cache_root

MANIFEST = "export.json"
SDIST_ENV = "CONJ_LITE_LLAMA_SDIST"
CONVERTER_MARKER = "conj_lite_converter.json"
LORA_CONVERTER = "convert_lora_to_gguf.py"
LORA_OUTTYPES = ("f16", "bf16", "f32", "q8_0")
CONVERTER_OUTTYPES = ("f16", "bf16", "f32", "q8_0")
MERGE_DTYPES = ("auto", "float16", "bfloat16", "float32")
MERGE_FORMAT = 2  # bump when merged/ gets written differently: finished merges are redone

# Quantization types: name -> (llama_cpp ftype constant, the GGML type most tensors get).
# llama.cpp's "_M"/"_S"/"_L" mixes give some tensors (output, attn_v, ffn_down) a larger
# type on purpose; those are not fallbacks.
QUANT_TYPES = {
    "q8_0": ("LLAMA_FTYPE_MOSTLY_Q8_0", "Q8_0"),
    "q6_k": ("LLAMA_FTYPE_MOSTLY_Q6_K", "Q6_K"),
    "q5_k_m": ("LLAMA_FTYPE_MOSTLY_Q5_K_M", "Q5_K"),
    "q5_k_s": ("LLAMA_FTYPE_MOSTLY_Q5_K_S", "Q5_K"),
    "q5_0": ("LLAMA_FTYPE_MOSTLY_Q5_0", "Q5_0"),
    "q5_1": ("LLAMA_FTYPE_MOSTLY_Q5_1", "Q5_1"),
    "q4_k_m": ("LLAMA_FTYPE_MOSTLY_Q4_K_M", "Q4_K"),
    "q4_k_s": ("LLAMA_FTYPE_MOSTLY_Q4_K_S", "Q4_K"),
    "q4_0": ("LLAMA_FTYPE_MOSTLY_Q4_0", "Q4_0"),
    "q4_1": ("LLAMA_FTYPE_MOSTLY_Q4_1", "Q4_1"),
    "iq4_nl": ("LLAMA_FTYPE_MOSTLY_IQ4_NL", "IQ4_NL"),
    "iq4_xs": ("LLAMA_FTYPE_MOSTLY_IQ4_XS", "IQ4_XS"),
    "q3_k_l": ("LLAMA_FTYPE_MOSTLY_Q3_K_L", "Q3_K"),
    "q3_k_m": ("LLAMA_FTYPE_MOSTLY_Q3_K_M", "Q3_K"),
    "q3_k_s": ("LLAMA_FTYPE_MOSTLY_Q3_K_S", "Q3_K"),
    "q2_k": ("LLAMA_FTYPE_MOSTLY_Q2_K", "Q2_K"),
}


# ---------------------------------------------------------------- small helpers


def _console(console=None):
    return console if console is not None else get_console()


def _human_size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def _sha256_file(path: Path, limit: int | None = None) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        remaining = limit
        while True:
            chunk = f.read(1 << 20 if remaining is None else min(1 << 20, remaining))
            if not chunk:
                break
            digest.update(chunk)
            if remaining is not None:
                remaining -= len(chunk)
                if remaining <= 0:
                    break
    return digest.hexdigest()


def parse_quant_types(value: str | Iterable[str] | None) -> tuple[str, ...]:
    """"q8_0,q4_k_m" or ["Q8_0", "q4_k_m"] -> ("q8_0", "q4_k_m"); unknown names are an
    InputError listing the known ones."""
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else list(value)
    out = []
    for item in items:
        name = str(item).strip().lower()
        if not name or name == "none":
            continue
        if name not in QUANT_TYPES:
            raise InputError(f"unknown quantization type {item!r}; known: {', '.join(QUANT_TYPES)}")
        if name not in out:
            out.append(name)
    return tuple(out)


# ---------------------------------------------------------------- the converter


@dataclass(frozen=True)
class Converter:
    """llama.cpp's converter: `root` holds convert_hf_to_gguf.py and gguf-py/."""

    root: Path
    version: str | None  # the llama-cpp-python release it came from; None: unknown
    source: str

    @property
    def script(self) -> Path:
        return self.root / "convert_hf_to_gguf.py"

    @property
    def gguf_py(self) -> Path:
        return self.root / "gguf-py"

    @property
    def lora_script(self) -> Path:
        """llama.cpp's convert_lora_to_gguf.py (a PEFT adapter -> a GGUF LoRA)."""
        return self.root / LORA_CONVERTER


def installed_llama_cpp_version() -> str:
    """The installed llama-cpp-python version (without loading its shared library)."""
    from importlib import metadata

    try:
        return metadata.version("llama_cpp_python")
    except metadata.PackageNotFoundError:
        raise InputError(
            'llama-cpp-python is not installed; export and the GGUF judge need it: pip install "conj-lite[export]"'
        ) from None


def converter_cache_dir(version: str) -> Path:
    return cache_root() / "llama.cpp" / f"llama-cpp-python-{version}"


def _check_converter_tree(root: Path, where: str) -> None:
    script = root / "convert_hf_to_gguf.py"
    if not script.is_file():
        raise InputError(f"{where}: no convert_hf_to_gguf.py (is this a llama.cpp checkout?)")
    if not (root / "gguf-py" / "gguf" / "__init__.py").is_file():
        raise InputError(f"{where}: no gguf-py/gguf package next to convert_hf_to_gguf.py")
    text = script.read_text("utf-8", errors="replace")
    if re.search(r"^from conversion import", text, re.M) and not (root / "conversion" / "__init__.py").is_file():
        raise InputError(f"{where}: convert_hf_to_gguf.py needs the conversion/ package next to it")


def _version_in_tree(root: Path) -> str | None:
    """__version__ of a llama-cpp-python source tree (root = its top directory)."""
    init = root / "llama_cpp" / "__init__.py"
    if not init.is_file():
        return None
    match = re.search(r"__version__\s*=\s*[\"']([^\"']+)", init.read_text("utf-8"))
    return match.group(1) if match else None


def converter_from_dir(path: str | Path, console=None) -> Converter:
    """The converter in a llama.cpp checkout, or in a llama-cpp-python source tree
    (vendor/llama.cpp), or in a llama-cpp-python sdist archive."""
    path = Path(path).expanduser()
    if path.is_file() and path.name.endswith((".tar.gz", ".tgz")):
        return converter_from_sdist(path, console=console)
    if not path.is_dir():
        raise InputError(f"{path}: --llama-cpp must be a llama.cpp checkout, a llama-cpp-python source tree or sdist")
    installed = installed_llama_cpp_version()
    vendored = path / "vendor" / "llama.cpp"
    if vendored.is_dir() and not (path / "convert_hf_to_gguf.py").is_file():
        _check_converter_tree(vendored, str(vendored))
        version = _version_in_tree(path)
        if version and version != installed:
            raise InputError(
                f"{path}: this llama-cpp-python source is version {version} but version {installed} is installed; "
                f"the converter must match the runtime: use the {installed} source, or pip install llama-cpp-python=={version}"
            )
        return Converter(vendored, version, f"llama-cpp-python source {path}")
    _check_converter_tree(path, str(path))
    _console(console).print(
        f"[yellow]note:[/] using the converter of the llama.cpp checkout {path}; conj-lite cannot check that it is "
        f"the commit vendored by llama-cpp-python {installed} (a mismatch can write files this runtime rejects)",
        highlight=False,
    )
    return Converter(path, None, f"llama.cpp checkout {path}")


def sdist_version(sdist: Path) -> str:
    """The version of a llama-cpp-python sdist, read from its llama_cpp/__init__.py."""
    try:
        with tarfile.open(sdist, "r:*") as tar:
            for member in tar:
                parts = member.name.split("/")
                if len(parts) == 3 and parts[1:] == ["llama_cpp", "__init__.py"] and member.isfile():
                    text = tar.extractfile(member).read().decode("utf-8", "replace")
                    match = re.search(r"__version__\s*=\s*[\"']([^\"']+)", text)
                    if match:
                        return match.group(1)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise InputError(f"{sdist}: not a readable llama-cpp-python sdist archive: {exc}") from None
    raise InputError(f"{sdist}: not a llama-cpp-python sdist (no llama_cpp/__init__.py with __version__)")


def _wanted(rel: str) -> bool:
    """Files of vendor/llama.cpp that the converter needs."""
    return (
        rel in ("convert_hf_to_gguf.py", LORA_CONVERTER)
        or rel.startswith(("conversion/", "gguf-py/gguf/", "models/templates/"))
        or rel in ("gguf-py/pyproject.toml", "LICENSE")
    )


def extract_converter(sdist: Path, dest: Path) -> None:
    """Unpack only the converter, conversion/ and gguf-py/ from the sdist into dest."""
    with staged_dir(dest) as staging:
        count = 0
        try:
            with tarfile.open(sdist, "r:*") as tar:
                for member in tar:
                    parts = member.name.split("/")
                    if len(parts) < 4 or parts[1:3] != ["vendor", "llama.cpp"] or not member.isfile():
                        continue
                    rel = "/".join(parts[3:])
                    if not _wanted(rel) or ".." in parts or member.name.startswith("/"):
                        continue
                    target = staging / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with tar.extractfile(member) as src, open(target, "wb") as out:
                        shutil.copyfileobj(src, out)
                    count += 1
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise InputError(f"{sdist}: cannot unpack the converter: {exc}") from None
        _check_converter_tree(staging, f"{sdist} (vendor/llama.cpp)")
        (staging / CONVERTER_MARKER).write_text(json.dumps({"sdist": str(sdist), "files": count}))


def converter_from_sdist(sdist: Path, console=None) -> Converter:
    sdist = Path(sdist).expanduser()
    if sdist.is_dir():
        candidates = sorted(sdist.glob("llama_cpp_python-*.tar.gz"))
        installed = installed_llama_cpp_version()
        exact = [c for c in candidates if c.name == f"llama_cpp_python-{installed}.tar.gz"]
        if not (exact or candidates):
            raise InputError(f"{sdist}: no llama_cpp_python-*.tar.gz in this directory")
        sdist = (exact or candidates)[-1]
    if not sdist.is_file():
        raise InputError(f"{sdist}: llama-cpp-python sdist not found")
    installed = installed_llama_cpp_version()
    version = sdist_version(sdist)
    if version != installed:
        raise InputError(
            f"{sdist}: this sdist is llama-cpp-python {version} but {installed} is installed; the converter must "
            f"match the runtime: use llama_cpp_python-{installed}.tar.gz (pip download --no-deps --no-binary :all: "
            f"llama-cpp-python=={installed})"
        )
    dest = converter_cache_dir(version)
    if not (dest / CONVERTER_MARKER).is_file():
        with exclusive(dest):
            if not (dest / CONVERTER_MARKER).is_file():
                _console(console).print(f"export: unpacking llama.cpp's converter from {sdist}", highlight=False)
                extract_converter(sdist, dest)
    return Converter(dest, version, f"sdist {sdist}")


def download_sdist(version: str, dest_dir: Path, console=None) -> Path:
    """`pip download` the llama-cpp-python source release into dest_dir."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    target = dest_dir / f"llama_cpp_python-{version}.tar.gz"
    if target.is_file():
        return target
    _console(console).print(
        f"export: downloading the llama-cpp-python {version} source release (for llama.cpp's converter) with pip",
        highlight=False,
    )
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
        "--disable-pip-version-check", f"llama-cpp-python=={version}", "-d", str(dest_dir),
    ]
    fix = (
        f"fix: download it yourself (pip download --no-deps --no-binary :all: llama-cpp-python=={version}) and set "
        f"{SDIST_ENV}=<path to llama_cpp_python-{version}.tar.gz>, or pass --llama-cpp <llama.cpp checkout at the "
        f"commit llama-cpp-python {version} vendors>"
    )
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as exc:
        raise InputError(f"cannot run pip to fetch llama.cpp's converter: {exc}; {fix}") from None
    if proc.returncode != 0 or not target.is_file():
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-8:])
        why = "pip is not installed in this environment" if "No module named pip" in tail else "pip download failed"
        raise InputError(f"{why} while fetching llama-cpp-python {version}'s source release:\n{tail}\n{fix}")
    return target


def unpacked(cached: Path, lora: bool) -> bool:
    """The converter is unpacked in `cached` (with the LoRA converter, where asked)."""
    return (cached / CONVERTER_MARKER).is_file() and (not lora or (cached / LORA_CONVERTER).is_file())


def find_converter(llama_cpp_dir: str | Path | None = None, *, sdist: str | Path | None = None,
                   download: bool = True, console=None, lora: bool = False) -> Converter:
    """llama.cpp's converter at the commit of the installed llama-cpp-python.

    Order: `llama_cpp_dir` (a checkout, source tree or sdist the user names); the cache
    (~/.cache/conj-lite/llama.cpp/llama-cpp-python-<version>); `sdist` or
    $CONJ_LITE_LLAMA_SDIST (a local sdist file or a directory holding it); else
    `pip download` of the sdist (download=False makes that an error instead).
    lora: also needs convert_lora_to_gguf.py (a cache unpacked before it was kept is
    unpacked again)."""
    if llama_cpp_dir:
        return converter_from_dir(llama_cpp_dir, console)
    version = installed_llama_cpp_version()
    cached = converter_cache_dir(version)
    if unpacked(cached, lora):
        return Converter(cached, version, f"cache {cached}")
    if lora and (cached / CONVERTER_MARKER).is_file():
        (cached / CONVERTER_MARKER).unlink()  # an older unpacking without the LoRA converter
    sdist = sdist or os.environ.get(SDIST_ENV)
    if sdist:
        return converter_from_sdist(Path(sdist), console)
    if not download:
        raise InputError(
            f"llama.cpp's converter for llama-cpp-python {version} is not cached in {cached}; set {SDIST_ENV} to "
            f"the llama_cpp_python-{version}.tar.gz sdist or allow the pip download"
        )
    with exclusive(cached.parent / "sdist"):  # one download of several processes; the others wait for it
        if unpacked(cached, lora):
            return Converter(cached, version, f"cache {cached}")
        sdist_path = download_sdist(version, cached.parent / "sdist", console)
        converter = converter_from_sdist(sdist_path, console)
        sdist_path.unlink(missing_ok=True)  # 75 MB of C++ sources; the converter is unpacked
    return converter


# ---------------------------------------------------------------- merge


def source_fingerprint(path: Path, base: str | None, dtype: str, template: JudgeTemplate) -> str:
    """Changes whenever the adapter (or model), its base, the dtype or the template does."""
    digest = hashlib.sha256()
    digest.update(json.dumps({"base": base, "dtype": dtype, "template": template.to_dict(), "v": MERGE_FORMAT},
                             sort_keys=True).encode())
    for item in sorted(path.iterdir()):
        if not item.is_file():
            continue
        stat = item.stat()
        digest.update(item.name.encode())
        if stat.st_size <= (64 << 20):
            digest.update(_sha256_file(item).encode())
        else:  # large weight shards: size + head is enough to notice a different file
            digest.update(f"{stat.st_size}:{_sha256_file(item, 1 << 20)}".encode())
    return digest.hexdigest()[:20]


def system_default_template(chat_template: str, system: str | None) -> str:
    """The chat template with the judge's system prompt as the default system message.

    Prompts that already start with a system message render exactly as before, so
    training and the conj-lite judge are unaffected; a plain llama.cpp/Ollama chat that
    sends only a user message still gets the system prompt the judge was trained with."""
    if not system or not chat_template:
        return chat_template
    literal = json.dumps(system, ensure_ascii=False)
    guard = "{# conj-lite: default judge system prompt #}"
    if guard in chat_template:
        return chat_template
    return (
        guard
        + "{% if not messages or messages[0]['role'] != 'system' %}"
        + "{% set messages = [{'role': 'system', 'content': " + literal + "}] + messages %}"
        + "{% endif %}"
        + chat_template
    )


def _special_tokens_added(tokenizer) -> tuple[bool, bool]:
    """Whether the tokenizer adds BOS / EOS by itself to plain text."""
    plain = tokenizer("judge", add_special_tokens=False).input_ids
    full = tokenizer("judge", add_special_tokens=True).input_ids
    bos = tokenizer.bos_token_id is not None and len(full) > len(plain) and full[0] == tokenizer.bos_token_id
    eos = tokenizer.eos_token_id is not None and len(full) > len(plain) and full[-1] == tokenizer.eos_token_id
    return bool(bos), bool(eos)


def _added_tokens_decoder(tokenizer) -> dict:
    """The added tokens in the tokenizer_config.json form transformers 4 wrote.

    transformers 5 keeps them only in tokenizer.json, but llama.cpp's converter reads
    them from tokenizer_config.json for sentencepiece vocabularies; without them chat
    markers such as <|im_start|> become plain text to llama.cpp and are split into
    pieces, so the GGUF judge would see a different prompt than training did."""
    out = {}
    for token_id, token in sorted(getattr(tokenizer, "added_tokens_decoder", {}).items()):
        out[str(token_id)] = {
            "content": token.content,
            "lstrip": bool(getattr(token, "lstrip", False)),
            "normalized": bool(getattr(token, "normalized", False)),
            "rstrip": bool(getattr(token, "rstrip", False)),
            "single_word": bool(getattr(token, "single_word", False)),
            "special": bool(getattr(token, "special", False)),
        }
    return out


def _copy_sentencepiece_model(staging: Path, candidates: Sequence[str]) -> None:
    """llama.cpp's converter reads sentencepiece vocabularies from tokenizer.model, which
    transformers does not re-save; copy it from the adapter or the base model."""
    if (staging / "tokenizer.model").is_file():
        return
    for candidate in candidates:
        path = Path(candidate) / "tokenizer.model"
        if path.is_file():
            shutil.copy(path, staging / "tokenizer.model")
            return
    for candidate in candidates:
        if Path(candidate).exists() or "/" not in candidate:
            continue
        try:  # a hub id: fetch the file if the repo has one
            from huggingface_hub import hf_hub_download

            shutil.copy(hf_hub_download(candidate, "tokenizer.model"), staging / "tokenizer.model")
            return
        except Exception:  # the repo has no sentencepiece model: tokenizer.json is used
            continue


def _merge_dtype(base_config, dtype: str):
    import torch

    names = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
    if dtype != "auto":
        return names[dtype]
    # float16 even for bfloat16 bases: the converter writes f16 anyway, and f16's finer
    # mantissa keeps small LoRA deltas that bf16 rounds away (see merge_adapter).
    return torch.float16


def _checkpoint_files(base: str) -> list[Path]:
    """The safetensors shards of a local or hub-cached checkpoint; [] if it has none."""
    root = Path(base)
    if not root.is_dir():
        try:
            from huggingface_hub import snapshot_download

            # the files from_pretrained would fetch (not e.g. Mistral's consolidated.safetensors)
            root = Path(snapshot_download(base, allow_patterns=[
                "config.json", "model.safetensors", "model.safetensors.index.json", "model-*.safetensors"]))
        except Exception:  # offline and not cached, not a hub id: from_pretrained says why
            return []
    index = root / "model.safetensors.index.json"
    if index.is_file():
        return [root / name for name in sorted(set(read_json(index)["weight_map"].values()))]
    return [root / "model.safetensors"] if (root / "model.safetensors").is_file() else []


def load_base_16bit(base: str, dtype):
    """The base model converted to `dtype` as it is read, holding about one copy of the
    model in memory.

    transformers reads safetensors through mmap, and converting (bf16 checkpoint -> f16)
    touches every page of the mapping, so the process's resident set peaks at the file
    plus the converted copy (2x the 16-bit size). Read with pread instead (the backend
    transformers itself uses on Windows), tensor by tensor, only the converted copy stays."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig, AutoModelForCausalLM, GenerationConfig

    files = _checkpoint_files(base)
    config = AutoConfig.from_pretrained(base)
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None) if files else None
    if model_class is None:
        return AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    from safetensors import safe_open

    try:
        handles = [safe_open(str(f), framework="pt", backend="pread") for f in files]
    except TypeError:  # a safetensors without the pread backend
        return AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    try:
        state = {key: h.get_slice(key) for h in handles for key in h.keys()}  # read when loaded
        model = model_class.from_pretrained(None, config=config, state_dict=state, dtype=dtype)
    finally:
        for h in handles:
            h.__exit__(None, None, None)
    try:
        model.generation_config = GenerationConfig.from_pretrained(base)
    except OSError:  # the checkpoint has none
        pass
    return model


@dataclass
class MergeResult:
    merged_dir: Path
    seconds: float
    skipped: bool
    dtype: str
    fingerprint: str


def merge_adapter(source: str | Path, merged_dir: str | Path, *, base: str | None = None, dtype: str = "auto",
                  template=None, force: bool = False, console=None) -> MergeResult:
    """Merge a LoRA adapter into its base in 16 bits and save a complete HF model dir.

    `source` may also be a full transformers model: it is re-saved with the same
    tokenizer fixes. The merged dir is complete when conj_lite_merge.json is in it."""
    source, merged_dir = Path(source), Path(merged_dir)
    info = describe_source(source)
    if dtype not in MERGE_DTYPES:
        raise InputError(f"merge dtype must be one of {MERGE_DTYPES}, got {dtype!r}")
    base = base or info["base"]
    template = resolve_template(template if template is not None else info["template"])
    fingerprint = source_fingerprint(source, base, dtype, template)
    done = merged_dir / MERGE_META
    if not force and done.is_file() and read_json(done).get("fingerprint") == fingerprint:
        meta = read_json(done)
        return MergeResult(merged_dir, 0.0, True, meta.get("dtype", dtype), fingerprint)

    from transformers import AutoConfig, AutoTokenizer

    start = time.perf_counter()
    try:
        base_config = AutoConfig.from_pretrained(base)
    except (OSError, ValueError) as exc:
        raise InputError(f"{base}: cannot load the base model's config: {exc}") from None
    torch_dtype = _merge_dtype(base_config, dtype)
    if info["load_in_4bit"]:
        _console(console).print(
            "export: training used a 4-bit base; merging into the 16-bit base weights instead", highlight=False
        )
    try:
        # The base in the saved dtype (no float32 copy of the model: that needed twice the
        # host RAM). The merge is still float32 arithmetic, module by module: peft keeps the
        # loaded LoRA weights in float32, so each W16 += scale * B @ A is computed in
        # float32 and rounded once to 16 bits. Rounding the delta to 16 bits first would
        # lose small deltas (delta std 1e-4 on weights of std 0.02: 33% error in bf16,
        # 4% merged in float32 and saved as f16).
        model = load_base_16bit(base, torch_dtype)
    except (OSError, ValueError) as exc:
        raise InputError(f"{base}: cannot load the base model: {exc}") from None
    if info["kind"] == "adapter":
        from peft import PeftModel

        try:
            # autocast_adapter_dtype: LoRA weights in float32 whatever the base's dtype (the
            # float32 merge above relies on it)
            model = PeftModel.from_pretrained(model, str(source), autocast_adapter_dtype=True)
        except (RuntimeError, ValueError, KeyError) as exc:
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            raise InputError(
                f"{source}: the adapter does not fit the base model {base} ({first}); "
                f"pass the base it was trained on with --base"
            ) from None
        model = model.merge_and_unload()
    model = model.to(torch_dtype)

    tokenizer_dir = source if any((source / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json")) else base
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    except (OSError, ValueError) as exc:
        raise InputError(f"{tokenizer_dir}: cannot load the tokenizer: {exc}") from None
    if not getattr(tokenizer, "chat_template", None):
        raise InputError(f"{tokenizer_dir}: the tokenizer has no chat template; the GGUF judge needs one")
    tokenizer.chat_template = system_default_template(tokenizer.chat_template, template.system)
    add_bos, add_eos = _special_tokens_added(tokenizer)

    with staged_dir(merged_dir) as staging:
        model.save_pretrained(str(staging), safe_serialization=True)
        tokenizer.save_pretrained(str(staging))
        config_path = staging / "tokenizer_config.json"
        tok_config = read_json(config_path) if config_path.is_file() else {}
        tok_config["add_bos_token"], tok_config["add_eos_token"] = add_bos, add_eos
        tok_config.setdefault("added_tokens_decoder", _added_tokens_decoder(tokenizer))
        config_path.write_text(json.dumps(tok_config, indent=2, ensure_ascii=False), encoding="utf-8")
        _copy_sentencepiece_model(staging, [str(source), str(base)])
        seconds = time.perf_counter() - start
        meta = {
            "fingerprint": fingerprint,
            "source": str(source),
            "kind": info["kind"],
            "base_model": base,
            "trained_in_4bit": info["load_in_4bit"],
            "dtype": str(torch_dtype).replace("torch.", ""),
            "template": template.to_dict(),
            "chat_date": info.get("chat_date") or DEFAULT_CHAT_DATE,
            "add_bos_token": add_bos,
            "add_eos_token": add_eos,
            "seconds": round(seconds, 2),
        }
        (staging / MERGE_META).write_text(json.dumps(meta, indent=2, ensure_ascii=False), encoding="utf-8")
    del model
    return MergeResult(merged_dir, seconds, False, meta["dtype"], fingerprint)


# ---------------------------------------------------------------- convert


# Runs in the converter's Python (with the vendored gguf-py first on sys.path): copies
# a GGUF, adding conj-lite's keys, with gguf-py's own gguf_new_metadata tool.
_ADD_METADATA = r"""
import json, sys
from pathlib import Path
import gguf
from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata
src, dst, extra = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
reader = gguf.GGUFReader(src, "r")
arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
writer = gguf.GGUFWriter(dst, arch=arch, endianess=reader.endianess)
new = {k: MetadataDetails(gguf.GGUFValueType.STRING, v) for k, v in extra.items()}
copy_with_new_metadata(reader, writer, new, [])
"""


def _run_logged(cmd: list[str], env: dict, log_path: Path, what: str) -> None:
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        lines = log_path.read_text("utf-8", errors="replace").strip().splitlines()
        tail = "\n".join(lines[-12:])
        raise InputError(f"{what} failed (exit code {proc.returncode}):\n{tail}\nfull log: {log_path}")


def _add_judge_metadata(converted: Path, final_tmp: Path, out_path: Path, template, env: dict, log_path: Path,
                        chat_date: str | None = None) -> None:
    """Copy `converted` with the judge template, the chat date training used and
    conj-lite's version added (gguf-py's own copy tool, in a subprocess), then move it
    into place as `out_path`."""
    extra = {GGUF_TEMPLATE_KEY: json.dumps(template.to_dict(), ensure_ascii=False),
             GGUF_CHAT_DATE_KEY: chat_date or DEFAULT_CHAT_DATE,
             GGUF_VERSION_KEY: _conj_lite_version()}
    cmd = [sys.executable, "-c", _ADD_METADATA, str(converted), str(final_tmp), json.dumps(extra, ensure_ascii=False)]
    _run_logged(cmd, env, log_path, "adding conj-lite metadata with gguf-py")
    os.replace(final_tmp, out_path)


def convert_to_gguf(merged_dir: Path, out_path: Path, converter: Converter, *, outtype: str = "f16",
                    template: JudgeTemplate, name: str = "judge", log_path: Path | None = None) -> Path:
    """merged HF dir -> GGUF with llama.cpp's converter, plus conj-lite's metadata."""
    if outtype not in CONVERTER_OUTTYPES:
        raise InputError(f"outtype must be one of {CONVERTER_OUTTYPES}, got {outtype!r}")
    out_path = Path(out_path)
    log_path = log_path or out_path.with_name("convert.log")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(converter.gguf_py), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("NO_LOCAL_GGUF", None)
    converted = out_path.with_name(out_path.name + ".convert.partial")
    final_tmp = out_path.with_name(out_path.name + ".partial")
    metadata_file = out_path.with_name(out_path.name + ".metadata.json")
    merge_meta = read_json(merged_dir / MERGE_META) if (merged_dir / MERGE_META).is_file() else {}
    base = merge_meta.get("base_model")
    metadata = {
        "general.name": name,
        "general.description": (
            "Pairwise LLM judge trained with conj-lite (Con-J). Replies with one JSON object "
            f'{{"{template.rationale_key}": "...", "{template.verdict_key}": 1 or 2}}.'
        ),
        "general.tags": ["conj-lite", "llm-as-a-judge", "pairwise"],
        # A judge should be deterministic: llama.cpp reads these as sampling defaults.
        "general.sampling.temp": 0.0,
        "general.sampling.top_k": 1,
    }
    if base and not Path(base).exists():
        metadata["general.base_models"] = [{"name": base, "repo_url": f"https://huggingface.co/{base}"}]
    try:
        metadata_file.write_text(json.dumps(metadata, ensure_ascii=False), encoding="utf-8")
        cmd = [
            sys.executable, str(converter.script), str(merged_dir), "--outfile", str(converted),
            "--outtype", outtype, "--metadata", str(metadata_file), "--model-name", name,
        ]
        _run_logged(cmd, env, log_path, f"llama.cpp's converter ({converter.source})")
        _add_judge_metadata(converted, final_tmp, out_path, template, env, log_path, merge_meta.get("chat_date"))
    finally:
        for tmp in (converted, final_tmp, metadata_file):
            tmp.unlink(missing_ok=True)
    return out_path


def convert_lora_to_gguf(adapter_dir: str | Path, out_path: str | Path, base_dir: str | Path, *,
                         converter: Converter | None = None, outtype: str = "f16", template: JudgeTemplate | None = None,
                         log_path: Path | None = None, console=None) -> Path:
    """A PEFT LoRA adapter -> a GGUF LoRA with llama.cpp's own convert_lora_to_gguf.py
    (from the same source release as the model converter), plus conj-lite's metadata
    (the judge template). Load it on the base GGUF at run time:
    `Judge.from_gguf(base_gguf, lora_path=out_path)` or `conj-lite serve --lora`.
    `base_dir` is the base model's HF directory (only its config is read)."""
    if outtype not in LORA_OUTTYPES:
        raise InputError(f"LoRA outtype must be one of {LORA_OUTTYPES}, got {outtype!r}")
    adapter_dir, out_path, base_dir = Path(adapter_dir), Path(out_path), Path(base_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise InputError(f"{adapter_dir}: not a LoRA adapter (no adapter_config.json)")
    if not (base_dir / "config.json").is_file():
        raise InputError(f"{base_dir}: the base model directory has no config.json")
    converter = converter or find_converter(console=console, lora=True)
    if not converter.lora_script.is_file():
        raise InputError(f"{converter.root}: no {LORA_CONVERTER} next to the converter ({converter.source})")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    log_path = log_path or out_path.with_name(out_path.stem + ".convert.log")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(converter.gguf_py), str(converter.root),
                                         env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("NO_LOCAL_GGUF", None)
    converted = out_path.with_name(out_path.name + ".convert.partial")
    final_tmp = out_path.with_name(out_path.name + ".partial")
    try:
        cmd = [sys.executable, str(converter.lora_script), "--outfile", str(converted), "--outtype", outtype,
               "--base", str(base_dir), str(adapter_dir)]
        _run_logged(cmd, env, log_path, f"llama.cpp's LoRA converter ({converter.source})")
        info = describe_source(adapter_dir)
        if template is None:
            template = resolve_template(info.get("template"))
        _add_judge_metadata(converted, final_tmp, out_path, template, env, log_path, info.get("chat_date"))
    finally:
        for tmp in (converted, final_tmp):
            tmp.unlink(missing_ok=True)
    return out_path


def _conj_lite_version() -> str:
    return __version__


# ---------------------------------------------------------------- quantize


UNQUANTIZED_FTYPES = {"f32": "LLAMA_FTYPE_ALL_F32", "f16": "LLAMA_FTYPE_MOSTLY_F16"}  # rewrites, not exports


def quantize_gguf(src: Path, dst: Path, qtype: str, *, threads: int = 0, verbose: bool = False,
                  allow_requantize: bool = False) -> Path:
    """Quantize `src` (f16/bf16/f32 GGUF) to `dst` in-process with llama_model_quantize:
    to an export type (QUANT_TYPES), or to f32/f16 (UNQUANTIZED_FTYPES). With
    `allow_requantize` a quantized `src` is dequantized first."""
    import ctypes

    import llama_cpp
    from llama_cpp._logger import set_verbose

    ftype_name = UNQUANTIZED_FTYPES.get(qtype) or QUANT_TYPES[qtype][0]
    if not hasattr(llama_cpp, ftype_name):
        raise InputError(f"this llama-cpp-python ({llama_cpp.__version__}) has no {ftype_name}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, ftype_name)
    params.nthread = threads
    params.allow_requantize = allow_requantize
    tmp = dst.with_name(dst.name + ".partial")
    set_verbose(verbose)
    try:
        code = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        if code != 0 or not tmp.is_file():
            raise InputError(f"{src}: llama_model_quantize to {qtype} failed (code {code})")
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return dst


@dataclass
class TensorReport:
    """The tensor types of one GGUF file, and the tensors that fell back."""

    types: dict[str, int]  # GGML type name -> tensor count
    fallbacks: list[dict]  # {"tensor", "shape", "type", "wanted"}


def classify_tensors(tensors: Iterable[tuple[str, Sequence[int], str]], wanted: str, block_size: int) -> TensorReport:
    """Pure core of the fallback report. `tensors` are (name, shape with the row length
    first, type name). A tensor falls back when its rows do not split into the wanted
    type's blocks and it got another type instead; 1-D tensors (norms) always stay F32."""
    types: dict[str, int] = {}
    fallbacks = []
    for name, shape, type_name in tensors:
        types[type_name] = types.get(type_name, 0) + 1
        matrix = sum(1 for d in shape if d > 1) >= 2
        if matrix and type_name != wanted and shape[0] % block_size != 0:
            fallbacks.append({"tensor": name, "shape": list(shape), "type": type_name, "wanted": wanted})
    return TensorReport(dict(sorted(types.items(), key=lambda kv: -kv[1])), fallbacks)


def tensor_report(path: Path, qtype: str | None) -> TensorReport:
    import gguf

    reader = gguf.GGUFReader(str(path), "r")
    tensors = [(t.name, [int(x) for x in t.shape], t.tensor_type.name) for t in reader.tensors]
    if qtype is None:
        return classify_tensors(tensors, "", 1)
    wanted = QUANT_TYPES[qtype][1]
    block_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[wanted]][0]
    return classify_tensors(tensors, wanted, block_size)


# ---------------------------------------------------------------- Ollama


def ollama_modelfile_text(gguf_name: str, template: JudgeTemplate, chat_template: str | None, eos: str | None) -> str:
    """An Ollama Modelfile for one GGUF file (in the same directory)."""
    lines = [
        "# Ollama Modelfile written by conj-lite. Use:",
        f"#   ollama create conj-judge -f {gguf_name.rsplit('.', 1)[0]}.Modelfile",
        f"FROM ./{gguf_name}",
    ]
    if chat_template and "<|im_start|>" in chat_template:
        lines += [
            'TEMPLATE """{{- if .System }}<|im_start|>system',
            "{{ .System }}<|im_end|>",
            "{{ end }}<|im_start|>user",
            "{{ .Prompt }}<|im_end|>",
            "<|im_start|>assistant",
            '"""',
        ]
    else:
        lines.append("# TEMPLATE: Ollama derives it from the chat template stored in the GGUF file")
    if template.system:
        lines.append(f'SYSTEM """{template.system}"""')
    lines += ["PARAMETER temperature 0", "PARAMETER top_k 1"]
    if eos:
        lines.append(f'PARAMETER stop "{eos}"')
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- the stage


@dataclass
class GGUFFile:
    type: str  # "f16" (the converter's output) or a quantization type
    path: Path
    size: int
    seconds: float
    skipped: bool
    tensor_types: dict[str, int] = field(default_factory=dict)
    fallbacks: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["path"] = str(self.path)
        return d


@dataclass
class ExportResult:
    merged_dir: Path
    merge_seconds: float
    merge_skipped: bool
    files: list[GGUFFile]
    converter: str
    modelfile: Path | None = None
    verify: VerifyReport | None = None

    @property
    def gguf_paths(self) -> dict[str, Path]:
        return {f.type: f.path for f in self.files}

    def to_dict(self) -> dict:
        return {
            "merged_dir": str(self.merged_dir),
            "merge_seconds": self.merge_seconds,
            "merge_skipped": self.merge_skipped,
            "converter": self.converter,
            "files": [f.to_dict() for f in self.files],
            "modelfile": str(self.modelfile) if self.modelfile else None,
            "verify": self.verify.to_dict() if self.verify else None,
        }


def export_gguf(
    adapter_dir: str | Path,
    out_dir: str | Path,
    *,
    outtype: str = "f16",
    quant_types: Sequence[str] = ("q8_0", "q4_k_m"),
    llama_cpp_dir: str | Path | None = None,
    verify: int = 0,
    ollama_modelfile: bool = False,
    merged_dir: str | Path | None = None,
    base: str | None = None,
    template=None,
    name: str = "judge",
    merge_dtype: str = "auto",
    verify_data=None,
    threads: int = 0,
    force: bool = False,
    console=None,
) -> ExportResult:
    """Merge -> convert -> quantize into OUT/merged and OUT/gguf/<name>-<type>.gguf.

    Finished outputs whose inputs have not changed are skipped (see gguf/export.json)."""
    console = _console(console)
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    quant_types = parse_quant_types(quant_types)
    if outtype not in CONVERTER_OUTTYPES:
        raise InputError(f"export outtype must be one of {CONVERTER_OUTTYPES}, got {outtype!r}")
    if quant_types and outtype == "q8_0":
        raise InputError("quantized types are made from a 16/32-bit file: use outtype f16, bf16 or f32 with quant_types")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise InputError(f"export name {name!r}: use letters, digits, '.', '_' and '-'")
    merged_dir = Path(merged_dir) if merged_dir else out_dir / "merged"
    gguf_dir = out_dir / "gguf"

    # Check the runtime and find the converter first: both should fail before a long merge.
    import importlib.util

    for module in ("llama_cpp", "gguf"):
        if importlib.util.find_spec(module) is None:
            raise InputError(f'GGUF export needs {module}: pip install "conj-lite[export]"')
    converter = find_converter(llama_cpp_dir, console=console)
    merge = merge_adapter(adapter_dir, merged_dir, base=base, dtype=merge_dtype, template=template, force=force,
                          console=console)
    merge_meta = read_json(merged_dir / MERGE_META)
    judge_template = resolve_template(merge_meta["template"])
    console.print(
        f"export: merged model in {merged_dir} ({'up to date' if merge.skipped else f'{merge.seconds:.1f}s'}, "
        f"{merge.dtype})",
        highlight=False,
    )

    gguf_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = gguf_dir / MANIFEST
    manifest = read_json(manifest_path) if manifest_path.is_file() else {}
    source_key = {"merged": merge.fingerprint, "outtype": outtype, "converter": converter.version, "name": name}
    if manifest.get("source") != source_key:
        manifest = {"source": source_key, "files": {}}

    def up_to_date(kind: str, path: Path) -> bool:
        entry = manifest["files"].get(kind)
        return (not force and entry is not None and path.is_file() and has_gguf_magic(path)
                and path.stat().st_size == entry.get("size"))

    files: list[GGUFFile] = []
    base_path = gguf_dir / f"{name}-{outtype}.gguf"
    if up_to_date(outtype, base_path):
        entry = manifest["files"][outtype]
        files.append(GGUFFile(outtype, base_path, base_path.stat().st_size, entry.get("seconds", 0.0), True,
                              entry.get("tensor_types", {})))
    else:
        console.print(f"export: converting with llama.cpp's converter ({converter.source})", highlight=False)
        start = time.perf_counter()
        convert_to_gguf(merged_dir, base_path, converter, outtype=outtype, template=judge_template, name=name,
                        log_path=gguf_dir / "convert.log")
        seconds = time.perf_counter() - start
        report = tensor_report(base_path, None)
        files.append(GGUFFile(outtype, base_path, base_path.stat().st_size, seconds, False, report.types))
        manifest["files"][outtype] = {"size": base_path.stat().st_size, "seconds": round(seconds, 2),
                                      "tensor_types": report.types}
        write_json(manifest_path, manifest)

    for qtype in quant_types:
        path = gguf_dir / f"{name}-{qtype}.gguf"
        if up_to_date(qtype, path):
            entry = manifest["files"][qtype]
            files.append(GGUFFile(qtype, path, path.stat().st_size, entry.get("seconds", 0.0), True,
                                  entry.get("tensor_types", {}), entry.get("fallbacks", [])))
            continue
        start = time.perf_counter()
        quantize_gguf(base_path, path, qtype, threads=threads)
        seconds = time.perf_counter() - start
        report = tensor_report(path, qtype)
        files.append(GGUFFile(qtype, path, path.stat().st_size, seconds, False, report.types, report.fallbacks))
        manifest["files"][qtype] = {"size": path.stat().st_size, "seconds": round(seconds, 2),
                                    "tensor_types": report.types, "fallbacks": report.fallbacks}
        write_json(manifest_path, manifest)

    modelfile = None
    if ollama_modelfile:
        chosen = next((f for f in reversed(files) if f.type != outtype), files[0])
        chat_template, eos = _chat_template_and_eos(merged_dir)
        modelfile = gguf_dir / f"{chosen.path.stem}.Modelfile"
        tmp = modelfile.with_name(modelfile.name + ".partial")
        tmp.write_text(ollama_modelfile_text(chosen.path.name, judge_template, chat_template, eos), encoding="utf-8")
        os.replace(tmp, modelfile)

    result = ExportResult(merged_dir, merge.seconds, merge.skipped, files, converter.source, modelfile)
    print_export(result, console)
    if verify:
        reference = adapter_dir if describe_source(adapter_dir)["kind"] == "adapter" else None
        result.verify = verify_export(merged_dir, {f.type: f.path for f in files}, verify, pairs=verify_data,
                                      threads=threads or None, reference=reference, console=console)
        print_verify(result.verify, console)
        manifest["verify"] = result.verify.to_dict()
        write_json(manifest_path, manifest)
    return result



def _chat_template_and_eos(merged_dir: Path) -> tuple[str | None, str | None]:
    template = None
    jinja = merged_dir / "chat_template.jinja"
    config = read_json(merged_dir / "tokenizer_config.json") if (merged_dir / "tokenizer_config.json").is_file() else {}
    if jinja.is_file():
        template = jinja.read_text("utf-8")
    elif isinstance(config.get("chat_template"), str):
        template = config["chat_template"]
    eos = config.get("eos_token")
    if isinstance(eos, dict):
        eos = eos.get("content")
    return template, eos if isinstance(eos, str) else None


def print_export(result: ExportResult, console) -> None:
    from rich.table import Table

    where = result.files[0].path.parent if result.files else result.merged_dir
    table = Table(title=f"GGUF files in {where}", caption=f"converter: {result.converter}", header_style="bold")
    for column, justify in (("type", "left"), ("file", "left"), ("size", "right"), ("time", "right"),
                            ("tensor types", "left"), ("fallbacks", "left")):
        table.add_column(column, justify=justify)
    for f in result.files:
        types = ", ".join(f"{k}×{v}" for k, v in f.tensor_types.items())
        fallbacks = ", ".join(f"{x['tensor']}→{x['type']}" for x in f.fallbacks) or "none"
        table.add_row(f.type, f.path.name, _human_size(f.size), "skipped" if f.skipped else f"{f.seconds:.1f}s",
                      types, fallbacks)
    console.print(table)
    for f in result.files:
        if f.fallbacks:
            console.print(
                f"[yellow]note:[/] {f.path.name}: {len(f.fallbacks)} tensor(s) have rows that do not split into "
                f"{f.fallbacks[0]['wanted']} blocks; llama.cpp used {sorted({x['type'] for x in f.fallbacks})} instead",
                highlight=False,
            )
    if result.modelfile:
        console.print(f"export: Ollama Modelfile {result.modelfile}", highlight=False)
