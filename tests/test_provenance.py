"""Issue 12: every stored result knows what made it; stale work is redone or refused.

Two real judges on the tiny model, in verdict mode: `good` is the tiny model itself,
`wrong` a copy whose output rows for the verdict tokens "1" and "2" are swapped, so
it always names the other answer: its P(A better) is 1 - the good judge's. The data is
labelled with the good judge's argmax P(A better), so the good judge is right on every
pair and the wrong judge on none (before this issue, the wrong judge resumed the good
judge's file and scored the good judge's figures).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from conj_lite.artifacts import fingerprint_id, identity_changes, path_identity
from conj_lite.cli import main
from conj_lite.data import load_pairs
from conj_lite.errors import InputError
from conj_lite.jsonio import read_jsonl
from conj_lite.judging.batch import judge_pairs, judge_provenance, meta_path
from conj_lite.judging.evaluation import default_name, evaluate
from conj_lite.judging.judge import open_judge
from conj_lite.judging.selective import calibration_records
from conj_lite.tiny import swap_verdict_rows


@pytest.fixture(scope="module")
def judges(tiny_model_dir, tmp_path_factory, sample_data):
    """(good dir, wrong dir, labelled data file, its pairs)."""
    from conj_lite.judging.verdicts import verdict_prefix
    from conj_lite.prompts import ordered_answers

    work = tmp_path_factory.mktemp("provenance")
    pairs = load_pairs(sample_data).pairs[:26]
    good = open_judge(str(tiny_model_dir), mode="verdict", n_threads=2, warn=None)
    try:
        p = pairs[0]
        _, one, two = good._verdict_tokens(good.prompt(p.question, *ordered_answers(p.answer_a, p.answer_b, "ab")),
                                           verdict_prefix(good.template, ""))
        records = judge_pairs(good, pairs, "verdict")
    finally:
        good.close()
    wrong = swap_verdict_rows(tiny_model_dir, work / "wrong", one, two)
    rows = []
    for pair, record in zip(pairs, records):
        if record["p_a"] != 0.5:
            rows.append({"id": pair.id, "question": pair.question, "answer_a": pair.answer_a,
                         "answer_b": pair.answer_b, "label": "A" if record["p_a"] > 0.5 else "B"})
    assert len(rows) >= 20
    data = work / "labelled.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows[:6]), "utf-8")
    calibration = work / "calibration.jsonl"
    calibration.write_text("".join(json.dumps(r) + "\n" for r in rows[6:]), "utf-8")
    return tiny_model_dir, wrong, data, calibration


def right(row: dict) -> bool:
    """Whether argmax P(A better) names the labelled answer."""
    return (row["p_a"] >= 0.5) == (row["label"] == "A")


def judge_cli(model, data, output, *extra) -> int:
    return main(["judge", "--model", str(model), "--backend", "hf", "--data", str(data), "--output", str(output),
                 "--mode", "verdict", "--threads", "2", *extra])


@pytest.mark.slow
def test_the_two_judges_are_good_and_always_wrong(judges, tmp_path):
    good, wrong, data, _ = judges
    for model, accuracy in ((good, 1.0), (wrong, 0.0)):
        out = tmp_path / f"{model.name}.jsonl"
        assert judge_cli(model, data, out) == 0
        rows = read_jsonl(out)
        assert rows and all(right(r) is (accuracy == 1.0) for r in rows)


# ---------------------------------------------------------------- judge --output


@pytest.mark.slow
def test_judge_output_of_another_judge_is_refused_then_redone_with_fresh(judges, tmp_path, capsys):
    good, wrong, data, _ = judges
    out = tmp_path / "out.jsonl"
    assert judge_cli(good, data, out) == 0
    first = read_jsonl(out)
    meta = json.loads(meta_path(out).read_text())
    assert {r["fingerprint"] for r in first} == {meta["fingerprint"]}
    assert meta["provenance"]["judge"]["model"]["path"] == str(Path(good).resolve())
    capsys.readouterr()
    # the reproduction: the always-wrong judge into the same --output
    assert judge_cli(wrong, data, out) == 2
    err = capsys.readouterr().err
    assert "another judge setup" in err and "judge.model" in err and "--fresh" in err
    assert read_jsonl(out) == first  # untouched
    assert judge_cli(wrong, data, out, "--fresh") == 0
    err = capsys.readouterr().err
    assert "6 pairs judged (0 already done)" in err
    rows = read_jsonl(out)
    assert len(rows) == len(first) and not any(right(r) for r in rows) and all(right(r) for r in first)
    assert {r["fingerprint"] for r in rows} == {json.loads(meta_path(out).read_text())["fingerprint"]}
    stale = list(tmp_path.glob("out.jsonl.stale-*"))
    assert len([s for s in stale if not s.name.endswith(".meta.json")]) == 1  # the good judge's file, kept


@pytest.mark.slow
def test_resume_with_the_same_judge_reuses_every_row(judges, tmp_path, capsys):
    good, _, data, _ = judges
    out = tmp_path / "out.jsonl"
    assert judge_cli(good, data, out) == 0
    capsys.readouterr()
    assert judge_cli(good, data, out) == 0
    assert "0 pairs judged (6 already done)" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("change", ["max_new_tokens", "template", "n_ctx"])
def test_a_setting_of_the_judge_is_part_of_the_fingerprint(judges, change, tmp_path):
    good, _, data, _ = judges
    pairs = load_pairs(data).pairs[:2]
    options = {"mode": "rationale", "n_threads": 2, "warn": None, "max_new_tokens": 8, "n_ctx": 512}
    other = dict(options, **{"max_new_tokens": {"max_new_tokens": 9}, "template": {"template": "zh"},
                             "n_ctx": {"n_ctx": 640}}[change])
    path = tmp_path / "r.jsonl"
    with open_judge(str(good), **options) as judge:
        judge_pairs(judge, pairs, records_path=path)
    with open_judge(str(good), **other) as judge:
        with pytest.raises(InputError, match=change if change != "template" else "template"):
            judge_pairs(judge, pairs, records_path=path)


@pytest.mark.slow
def test_rows_without_provenance_are_not_reused(judges, tmp_path):
    good, _, data, _ = judges
    pairs = load_pairs(data).pairs[:2]
    path = tmp_path / "old.jsonl"
    with open_judge(str(good), mode="verdict", n_threads=2, warn=None) as judge:
        judge_pairs(judge, pairs, records_path=path)
        meta_path(path).unlink()
        rows = [{k: v for k, v in r.items() if k != "fingerprint"} for r in read_jsonl(path)]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        with pytest.raises(InputError, match="do not say which judge"):
            judge_pairs(judge, pairs, records_path=path)


# ---------------------------------------------------------------- calibration cache


@pytest.mark.slow
def test_calibration_cache_of_another_judge_is_not_reused(judges, tmp_path, capsys):
    good, wrong, data, calibration = judges
    out = tmp_path / "sel.jsonl"
    risk = ["--risk", "0.3", "--calibration", str(calibration)]
    assert judge_cli(good, data, out, *risk) == 0
    assert {r["selective_verdict"] for r in read_jsonl(out)} <= {"A", "B", "abstain"}
    good_threshold = read_jsonl(out)[0]["risk_threshold"]
    cache = out.with_suffix(".calibration.jsonl")
    good_fid = json.loads(meta_path(cache).read_text())["fingerprint"]
    capsys.readouterr()
    # the reproduction: the always-wrong judge, same --risk/--calibration/--output
    assert judge_cli(wrong, data, out, *risk, "--fresh") == 0
    rows = read_jsonl(cache)
    wrong_fid = json.loads(meta_path(cache).read_text())["fingerprint"]
    assert wrong_fid != good_fid and {r["fingerprint"] for r in rows} == {wrong_fid}
    assert not any(right(r) for r in rows)  # judged by the wrong judge, every one
    marked = read_jsonl(out)
    assert {r["selective_verdict"] for r in marked} == {"abstain"}  # nothing can be certified for it
    assert marked[0]["risk_threshold"] is None and good_threshold is not None


@pytest.mark.slow
def test_switching_calibration_files_calibrates_on_the_current_one_only(judges, tmp_path):
    good, _, data, calibration = judges
    cache = tmp_path / "cache.jsonl"
    with open_judge(str(good), mode="verdict", n_threads=2, warn=None) as judge:
        big = calibration_records(judge, data, mode="verdict", cache=cache)
        small = calibration_records(judge, calibration, mode="verdict", cache=cache)
    assert len(big) == len(load_pairs(data).pairs)
    assert len(small) == len(load_pairs(calibration).pairs)  # not big + small
    assert len(read_jsonl(cache)) == len(big) + len(small)  # the cache keeps both


@pytest.mark.slow
def test_judgments_of_another_judge_are_refused_as_calibration(judges, tmp_path, capsys):
    good, wrong, data, calibration = judges
    judged = tmp_path / "good.jsonl"
    assert judge_cli(good, calibration, judged) == 0
    capsys.readouterr()
    assert judge_cli(wrong, data, tmp_path / "w.jsonl", "--risk", "0.3", "--calibration", str(judged)) == 2
    assert "another judge setup" in capsys.readouterr().err


# ---------------------------------------------------------------- eval


@pytest.mark.slow
def test_eval_does_not_resume_another_judges_records(judges, tmp_path):
    good, wrong, data, _ = judges
    pairs = load_pairs(data).pairs
    path = tmp_path / "judgments" / "j.partial.jsonl"
    with open_judge(str(good), mode="verdict", n_threads=2, warn=None) as judge:
        judge_pairs(judge, pairs, "verdict", records_path=path)
    with open_judge(str(wrong), mode="verdict", n_threads=2, warn=None) as judge:
        report = evaluate(judge, pairs, mode="verdict", bootstrap=0, records_path=path, name="j")
    assert report.metrics["accuracy_prob"] == 0.0
    assert list(path.parent.glob("j.partial.jsonl.stale-*"))  # the good judge's records, kept aside


@pytest.mark.slow
def test_cli_eval_same_name_two_judges(judges, tmp_path):
    """An interrupted eval of one judge leaves judgments/<name>.partial.jsonl; another
    judge evaluated under the same name into the same --out must not resume it."""
    good, wrong, data, _ = judges
    out = tmp_path / "eval"
    with open_judge(str(good), mode="verdict", n_threads=2, warn=None) as judge:
        judge_pairs(judge, load_pairs(data).pairs, "verdict", records_path=out / "judgments" / "j.partial.jsonl")
    code = main(["eval", "--judge", f"j={wrong}", "--data", str(data), "--out", str(out), "--mode", "verdict",
                 "--bootstrap", "0", "--threads", "2", "--no-plots"])
    assert code == 0
    doc = json.loads((out / "report.json").read_text())
    assert doc["judges"]["j"]["metrics"]["accuracy_prob"] == 0.0
    assert doc["judges"]["j"]["fingerprint"] == json.loads(meta_path(out / "judgments" / "j.jsonl").read_text())[
        "fingerprint"]
    assert not list((out / "judgments").glob("j.*.partial.jsonl"))  # its own resumable file is cleaned up


def test_default_names_of_two_runs_do_not_collide():
    a, b = "runs/a/gguf/judge-q4_k_m.gguf", "runs/b/gguf/judge-q4_k_m.gguf"
    assert default_name(a) == "a/judge-q4_k_m" and default_name(b) == "b/judge-q4_k_m"
    assert default_name("judge.gguf") == "judge" and default_name("runs/x/adapter") == "x/adapter"


@pytest.mark.slow
def test_eval_refuses_calibration_equal_to_test_and_warns_on_overlap(judges, tmp_path, capsys):
    good, _, data, calibration = judges
    base = ["eval", "--judge", f"g={good}", "--data", str(data), "--mode", "verdict", "--bootstrap", "0",
            "--threads", "2", "--no-plots", "--risk", "0.3"]
    assert main([*base, "--out", str(tmp_path / "same"), "--calibration", str(data)]) == 2
    assert "every one of the 6 test pairs is also a calibration pair" in capsys.readouterr().err
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(data.read_text().splitlines(keepends=True)[0] + calibration.read_text(), "utf-8")
    assert main([*base, "--out", str(tmp_path / "mixed"), "--calibration", str(mixed)]) == 0
    assert "1 of the 6 test pairs are also calibration pairs" in capsys.readouterr().err
    doc = json.loads((tmp_path / "mixed" / "report.json").read_text())
    assert doc["judges"]["g"]["selective"]["calibration_overlap"] == 1


# ---------------------------------------------------------------- identities


def test_file_identity_follows_the_bytes_not_the_time(tmp_path, monkeypatch):
    path = tmp_path / "judge.gguf"
    path.write_bytes(b"GGUF" + bytes(range(256)) * 4096)
    first = path_identity(path)
    os.utime(path, (1, 1))
    assert path_identity(path)["digest"] == first["digest"]
    data = bytearray(path.read_bytes())
    data[600_000] ^= 1  # a weight in the middle
    path.write_bytes(bytes(data))
    assert path_identity(path)["digest"] != first["digest"]
    # a large file is hashed by its head, slices and tail: a changed slice still shows
    monkeypatch.setattr("conj_lite.artifacts.FULL_HASH_BYTES", 1 << 16)
    monkeypatch.setattr("conj_lite.artifacts.HEAD_BYTES", 1 << 12)
    monkeypatch.setattr("conj_lite.artifacts.SPOT_BYTES", 1 << 12)
    sampled = path_identity(path)["digest"]
    assert sampled.startswith("s")
    data[data_offset := 4096 + (len(data) - 8192) // 16 * 5 + 10] ^= 1
    path.write_bytes(bytes(data))
    assert path_identity(path)["digest"] != sampled, data_offset


def test_identity_changes_name_the_field():
    before = {"judge": {"model": {"kind": "file", "path": "/a", "size": 1, "digest": "x"}}, "mode": "verdict",
              "n_ctx": 512}
    now = {"judge": {"model": {"kind": "file", "path": "/b", "size": 1, "digest": "x"}}, "mode": "verdict",
           "n_ctx": 1024}
    assert identity_changes(before, now) == ["n_ctx: was 512, now 1024"]  # a moved file is the same judge
    assert fingerprint_id(before) != fingerprint_id(now)


@pytest.mark.slow
def test_a_gguf_judge_is_identified_by_its_file(tmp_path):
    """A real GGUF (the packaged SmolLM2 base, ~98 MB): its identity is read in well under
    a second, names the file, and another file of the same size whose weights differ in
    one byte gets another fingerprint."""
    import time

    pytest.importorskip("llama_cpp")
    from conj_lite.packaged import BASE_GGUF, packaged_model_path

    source = packaged_model_path("smollm2-135m") / BASE_GGUF  # built here when the cache lacks it
    start = time.perf_counter()
    ident = path_identity(source)
    assert time.perf_counter() - start < 2.0 and ident["digest"].startswith("s")  # sampled, not read whole
    with open_judge(str(source), mode="verdict", n_threads=2, n_ctx=512, warn=None) as judge:
        provenance = judge_provenance(judge, "verdict")
    assert provenance["backend"] == "gguf" and provenance["judge"]["model"]["digest"] == ident["digest"]
    assert provenance["n_ctx"] == 512 and provenance["max_new_tokens"] is None  # verdict mode
    copy = tmp_path / "copy.gguf"
    shutil.copyfile(source, copy)
    with open(copy, "r+b") as handle:  # one byte in the first weight slice after the head
        from conj_lite.artifacts import HEAD_BYTES, SPOT_BYTES, SPOTS

        size = copy.stat().st_size
        handle.seek(HEAD_BYTES + (size - HEAD_BYTES - SPOT_BYTES) // SPOTS + 7)
        byte = handle.read(1)
        handle.seek(-1, 1)
        handle.write(bytes([byte[0] ^ 0xFF]))
    other = dict(provenance, judge={"model": path_identity(copy)})
    assert fingerprint_id(other) != fingerprint_id(provenance)
    assert identity_changes(provenance, other)[0].startswith("judge.model: was ")
