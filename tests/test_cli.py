"""The `conj-lite` command as a user meets it: bad input gives one clear line naming the
file and line (or flag) and exit code 2, never a traceback; a full disk says so and
loses nothing. Each case runs the real command in a subprocess, so what is checked is
what a terminal shows."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAIR = {"question": "What is 7 + 5?", "answer_a": "12", "answer_b": "13", "label": "A"}


def conj_lite(*args, env=None) -> subprocess.CompletedProcess:
    """Run `python -m conj_lite.cli ARGS` (args may be bytes, as a shell passes them)."""
    environ = {**os.environ, "COLUMNS": "300", **(env or {})}
    environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), environ.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "conj_lite.cli", *args], capture_output=True, env=environ,
                          timeout=300)


def user_error(proc: subprocess.CompletedProcess) -> str:
    """The error line of a command that failed on bad input (exit 2, no traceback)."""
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 2 and "Traceback" not in err, err[-3000:]
    return " ".join(err.split())  # rich may wrap a long line


def test_error_messages_are_printed_as_plain_text_not_markup(tmp_path):
    model = tmp_path / "m[bold]odel.gguf"
    assert f"{model}: no such judge file" in user_error(conj_lite(
        "judge", "--model", str(model), "--question", "q", "--answer-a", "a", "--answer-b", "b"))
    data = tmp_path / "labels.jsonl"
    data.write_text(json.dumps({**PAIR, "label": "[/x]"}) + "\n")
    assert "[/x]" in user_error(conj_lite("judge", "--model", str(tmp_path / "m.gguf"), "--data", str(data),
                                          "--output", str(tmp_path / "out.jsonl")))


def test_an_empty_question_is_refused_as_by_the_loader_and_the_server(tmp_path):
    for question in ("", "  \n"):
        error = user_error(conj_lite("judge", "--model", str(tmp_path / "m.gguf"), "--question", question,
                                     "--answer-a", "a", "--answer-b", "b"))
        assert "--question is empty" in error
    # undecodable bytes on the command line become lone surrogates: not text to judge
    error = user_error(conj_lite("judge", "--model", str(tmp_path / "m.gguf"), "--question", "q",
                                 "--answer-a", b"caf\xe9", "--answer-b", "b"))
    assert "--answer-a holds a lone surrogate" in error


def test_a_lone_surrogate_in_a_data_row_names_the_file_and_line(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps(PAIR) + "\n" + json.dumps({**PAIR, "answer_a": "half \ud83d"}) + "\n")
    assert "\\ud83d" in data.read_text()  # the escape, as JSON writes it
    error = user_error(conj_lite("judge", "--model", str(tmp_path / "m.gguf"), "--data", str(data),
                                 "--output", str(tmp_path / "out.jsonl")))
    assert f"{data}:2: field 'answer_a' holds a lone surrogate" in error


@pytest.mark.parametrize("damage", ["truncated", "not gzip"])
def test_a_damaged_gz_file_is_named(tmp_path, damage):
    data = tmp_path / "pairs.jsonl.gz"
    whole = gzip.compress("".join(json.dumps({**PAIR, "id": str(i)}) + "\n" for i in range(200)).encode())
    data.write_bytes(whole[: len(whole) // 2] if damage == "truncated" else b"question,answer_a\nq,a\n")
    error = user_error(conj_lite("judge", "--model", str(tmp_path / "m.gguf"), "--data", str(data),
                                 "--output", str(tmp_path / "out.jsonl")))
    assert f"{data}: " in error
    assert ("ends early after line" in error) if damage == "truncated" else ("not a readable gzip file" in error)


def hub_free_env(**extra) -> dict:
    """This environment without the user's hub switches; the hub endpoint on a closed
    loopback port, so a switch that fails to hold makes no request beyond the machine."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("CI", "DO_NOT_TRACK", "TRANSFORMERS_OFFLINE") and not k.startswith("HF_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return {**env, "HF_ENDPOINT": "http://127.0.0.1:9", **extra}


def python(code: str, *args, env: dict, cwd) -> list[str]:
    proc = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=300, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.split()


def test_the_command_starts_no_telemetry_unless_the_user_asks(tmp_path):
    """TRL's trainers call huggingface_hub's send_telemetry, which starts a thread that
    reaches the hub, on every run (unless $CI is set); `conj-lite` switches telemetry
    off for its process, unless the user set the switch."""
    code = ("import sys\nfrom conj_lite.cli import main\nmain(sys.argv[1:])\n"
            "from huggingface_hub.utils import _telemetry\n"
            "_telemetry.send_telemetry('trl/DPOTrainer', library_name='trl')\n"
            "print(_telemetry._TELEMETRY_THREAD is not None)\n")
    assert python(code, "recipes", env=hub_free_env(), cwd=tmp_path)[-1] == "False"
    assert python(code, "recipes", env=hub_free_env(HF_HUB_DISABLE_TELEMETRY="0"), cwd=tmp_path)[-1] == "True"


def test_a_run_on_local_inputs_goes_offline_and_one_naming_a_hub_model_does_not(tmp_path):
    code = ("import sys\nfrom conj_lite.pipeline import ConjRun\n"
            "ConjRun.from_recipe('tiny-cpu', sys.argv[1], sys.argv[2:], offline_when_local=True)\n"  # as the CLI

            "import huggingface_hub.constants as c\n"
            "print(c.HF_HUB_OFFLINE, c.HF_HUB_DISABLE_TELEMETRY)\n")
    local = python(code, tmp_path / "a", env=hub_free_env(), cwd=tmp_path)
    assert local[-2:] == ["True", "True"]  # the tiny model and data/sample_prefs.jsonl: nothing to fetch
    hub = python(code, tmp_path / "b", "model.name_or_path=HuggingFaceTB/SmolLM2-135M-Instruct",
                 env=hub_free_env(), cwd=tmp_path)
    assert hub[-2:] == ["False", "True"]  # a hub model named explicitly still loads
    assert python(code, tmp_path / "c", env=hub_free_env(HF_HUB_OFFLINE="0"), cwd=tmp_path)[-2:] == ["False", "True"]
    notebook = code.replace(", offline_when_local=True", "")  # the Python API in a notebook may name the hub later
    assert python(notebook, tmp_path / "d", env=hub_free_env(), cwd=tmp_path)[-2:] == ["False", "True"]


def test_network_switches_decide_from_the_inputs(tmp_path, monkeypatch):
    from conj_lite.system import network_switches

    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    assert network_switches(None) == {"HF_HUB_DISABLE_TELEMETRY": "1"}  # inputs unknown: telemetry only
    monkeypatch.delenv("HF_HUB_DISABLE_TELEMETRY")
    assert network_switches(["org/model", str(tmp_path)]) == {"HF_HUB_DISABLE_TELEMETRY": "1"}
    monkeypatch.delenv("HF_HUB_DISABLE_TELEMETRY")
    assert network_switches(["smollm2", str(tmp_path), None], local_names=["smollm2"]) == {
        "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    assert network_switches([str(tmp_path)]) == {}  # already set: left as they are


def test_a_full_disk_while_writing_rejected_rows_is_named(small_disk, tmp_path):
    data = tmp_path / "pairs.jsonl"
    bad = json.dumps({**PAIR, "label": "maybe", "answer_b": "x" * 200})
    data.write_text(json.dumps(PAIR) + "\n" + "".join(bad + "\n" for _ in range(1000)))  # 250 KB of rejects
    out = small_disk.path / "judged.jsonl"
    error = user_error(conj_lite("judge", "--model", str(tmp_path / "m.gguf"), "--data", str(data), "--skip-invalid",
                                 "--output", str(out)))
    assert f"disk full while writing {out}.rejects.jsonl" in error


@pytest.fixture(scope="session")
def exported(tiny_model_dir, tmp_path_factory):
    from test_export import export_tiny

    return export_tiny(tiny_model_dir, tmp_path_factory.getbasetemp() / "tiny-export")


@pytest.mark.slow
def test_a_full_disk_stops_judging_with_a_clear_error_and_loses_nothing(small_disk, tmp_path, exported):
    gguf = exported.gguf_paths["q8_0"]
    data = tmp_path / "pairs.jsonl"
    n = 300  # about 150 KB of judgments: more than the 64 KiB disk holds
    data.write_text("".join(json.dumps({**PAIR, "id": f"p{i}", "question": f"What is {i} + 5?"}) + "\n"
                            for i in range(n)))
    out = small_disk.path / "judged.jsonl"
    command = ("judge", "--model", str(gguf), "--data", str(data), "--output", str(out), "--mode", "verdict",
               "--threads", "2")
    error = user_error(conj_lite(*command))
    assert f"disk full while writing {out}" in error
    text = out.read_text("utf-8")
    assert text.endswith("\n") and all(json.loads(line) for line in text.splitlines())  # no torn line
    kept = len(text.splitlines())
    assert 0 < kept < n
    small_disk.grow("4m")
    resumed = conj_lite(*command)
    assert resumed.returncode == 0, resumed.stderr.decode(errors="replace")[-2000:]
    ids = [json.loads(line)["id"] for line in out.read_text("utf-8").splitlines()]
    assert sorted(ids) == sorted(f"p{i}" for i in range(n))  # nothing lost, nothing twice
