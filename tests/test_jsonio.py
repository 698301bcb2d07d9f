"""conj_lite.jsonio: the one atomic writer and reader of our own JSON files."""

import multiprocessing

import pytest

from conj_lite.errors import InputError
from conj_lite.jsonio import JudgmentFile, read_json, read_jsonl, write_json, write_jsonl


def _write_many(path: str, writer: int, times: int) -> None:
    for i in range(times):
        write_json(path, {"writer": writer, "i": i, "pad": "x" * 2000})
        write_jsonl(path + "l", [{"writer": writer, "i": i}] * 20)


def test_concurrent_writers_of_one_file_never_clash(tmp_path):
    """Every rank under `accelerate launch` writes the same stage record (CI failed on a
    shared temporary name: one rank renamed the other's file away -> FileNotFoundError)."""
    path = str(tmp_path / "record.json")
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_write_many, args=(path, w, 300)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    final = read_json(path)
    assert final["i"] == 299 and final["writer"] in (0, 1, 2)
    rows = read_jsonl(path + "l")
    assert len(rows) == 20 and {r["i"] for r in rows} == {299}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["record.json", "record.jsonl"]  # no leftovers


def test_write_then_read_round_trip_keeps_unicode(tmp_path):
    data = {"text": "naïve ✓ 漢字", "n": [1, 2.5, None]}
    write_json(tmp_path / "sub" / "a.json", data)
    assert read_json(tmp_path / "sub" / "a.json") == data
    write_jsonl(tmp_path / "b.jsonl", [data, {"k": 1}])
    assert read_jsonl(tmp_path / "b.jsonl") == [data, {"k": 1}]


def test_lone_surrogate_is_written_escaped_not_crashing(tmp_path):
    write_json(tmp_path / "s.json", {"t": "bad \ud800 half"})
    assert "\\ud800" in (tmp_path / "s.json").read_text("utf-8")


def test_bad_line_names_file_and_line(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\n{oops\n', "utf-8")
    with pytest.raises(InputError, match=r"x\.jsonl.*2"):
        read_jsonl(path)


def test_unreadable_json_names_file(tmp_path):
    (tmp_path / "bad.json").write_text("{", "utf-8")
    with pytest.raises(InputError, match="bad.json"):
        read_json(tmp_path / "bad.json")
    with pytest.raises(InputError, match="missing.json"):
        read_json(tmp_path / "missing.json")


def test_a_full_disk_leaves_no_torn_line_and_says_so(small_disk):
    log = JudgmentFile(small_disk.path / "judged.jsonl")
    rows = [{"id": f"p{i}", "text": "x" * 300} for i in range(400)]  # about 130 KB
    written = 0
    with pytest.raises(InputError, match=f"disk full while writing {log.path}"):
        for start in range(0, len(rows), 8):
            log.append(rows[start:start + 8])
            written += 8
    data = log.path.read_bytes()
    assert data.endswith(b"\n") and len(data.splitlines()) == written  # whole batches only
    assert log.load() == rows[:written]
    small_disk.grow("1m")
    log.append(rows[written:])  # resumed: nothing lost, nothing twice
    assert log.load() == rows


def test_a_full_disk_keeps_the_old_file_of_an_atomic_write(small_disk):
    path = small_disk.path / "pairs.jsonl"
    write_jsonl(path, [{"n": 1}])
    with pytest.raises(InputError, match=f"disk full while writing {path}"):
        write_jsonl(path, [{"n": i, "text": "x" * 1000} for i in range(200)])
    assert read_jsonl(path) == [{"n": 1}] and [p.name for p in small_disk.path.iterdir()] == ["pairs.jsonl"]


def test_a_staged_directory_replaces_the_old_one_whole_or_not_at_all(tmp_path):
    from conj_lite.jsonio import staged_dir

    dest = tmp_path / "adapter"
    dest.mkdir()
    (dest / "old.txt").write_text("old")
    (tmp_path / "adapter.partial").mkdir()  # a killed writer's leftover
    (tmp_path / "adapter.partial" / "stale.txt").write_text("stale")
    with pytest.raises(RuntimeError):
        with staged_dir(dest) as staging:
            assert list(staging.iterdir()) == []  # the leftover cleared
            (staging / "new.txt").write_text("half")
            raise RuntimeError("killed mid-write")
    assert [p.name for p in dest.iterdir()] == ["old.txt"] and not (tmp_path / "adapter.partial").exists()
    with staged_dir(dest) as staging:
        (staging / "new.txt").write_text("new")
        assert (dest / "old.txt").is_file()  # the old one stays readable until the end
    assert [p.name for p in dest.iterdir()] == ["new.txt"] and not (tmp_path / "adapter.partial").exists()
