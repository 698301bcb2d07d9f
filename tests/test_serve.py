"""conj-lite serve: request parsing, then the real server (uvicorn, in a subprocess) on a
free 127.0.0.1 port with the tiny model's q8_0 GGUF, talked to with httpx."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from conj_lite.cli import main
from conj_lite.errors import InputError
from conj_lite.judging.serve import RequestError, check_bind, is_loopback, parse_request, wait_until_up

KEY = "test-key-123"
PAIR = {"question": "What is 7 + 5?", "answer_a": "7 + 5 = 12.", "answer_b": "7 + 5 = 13."}


# ---------------------------------------------------------------- pure parts


def test_parse_request_names_the_field():
    one = parse_request(json.dumps(PAIR).encode(), "verdict")
    assert one.pairs == [tuple(PAIR.values())] and one.ids == [None] and one.mode == "verdict" and one.rationales
    many = parse_request(json.dumps({"pairs": [PAIR, {**PAIR, "id": "x"}], "mode": "rationale",
                                     "rationales": False}).encode(), "verdict")
    assert many.ids == [0, "x"] and many.mode == "rationale" and not many.rationales
    cases = {
        b"{bad": (400, None),
        b"[1, 2]": (400, None),
        json.dumps({"question": "q", "answer_a": "a"}).encode(): (400, "answer_b"),
        json.dumps({**PAIR, "answer_a": 3}).encode(): (400, "answer_a"),
        json.dumps({**PAIR, "question": " "}).encode(): (400, "question"),
        json.dumps({**PAIR, "mode": "fast"}).encode(): (400, "mode"),
        json.dumps({**PAIR, "rationales": "yes"}).encode(): (400, "rationales"),
        json.dumps({"pairs": []}).encode(): (400, "pairs"),
        json.dumps({"pairs": [PAIR, {"question": "q", "answer_b": "b"}]}).encode(): (400, "pairs[1].answer_a"),
        json.dumps({"pairs": [PAIR] * 5}).encode(): (413, "pairs"),
    }
    for body, (status, name) in cases.items():
        with pytest.raises(RequestError) as info:
            parse_request(body, "verdict", max_pairs=4)
        assert info.value.status == status, body
        if name:
            assert info.value.extra.get("field") == name and name in info.value.message


def test_binding_beyond_loopback_needs_a_key():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5")
    check_bind("127.0.0.1", None)
    check_bind("0.0.0.0", "k")
    with pytest.raises(InputError, match="API key"):
        check_bind("0.0.0.0", None)
    env = dict(os.environ)
    os.environ.pop("CONJ_LITE_API_KEY", None)
    try:  # refused before any model loads
        assert main(["serve", "--model", "missing.gguf", "--host", "0.0.0.0"]) == 2
    finally:
        os.environ.clear()
        os.environ.update(env)


# ---------------------------------------------------------------- the real server


@pytest.fixture(scope="session")
def exported(tiny_model_dir, tmp_path_factory):
    from test_export import export_tiny

    return export_tiny(tiny_model_dir, tmp_path_factory.getbasetemp() / "tiny-export")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(exported, tmp_path_factory):
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    work = tmp_path_factory.mktemp("serve")
    # A judgments JSONL as calibration (no judging needed): confident judgments right,
    # unsure ones a coin flip, so a threshold near 0.8 is certified at risk 0.2.
    rows = []
    for i in range(400):
        confident = i % 2 == 0
        p_a = 0.95 if confident else 0.55
        label = "A" if confident or i % 4 == 1 else "B"
        rows.append({"id": str(i), "p_a": p_a, "label": label, "mode": "verdict"})
    calibration = work / "calibration.jsonl"
    calibration.write_text("".join(json.dumps(r) + "\n" for r in rows))
    port = free_port()
    log = open(work / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "conj_lite.cli", "serve", "--model", str(exported.gguf_paths["q8_0"]),
         "--port", str(port), "--threads", "2", "--mode", "verdict", "--max-new-tokens", "48",
         "--api-key", KEY, "--risk", "0.2", "--calibration", str(calibration), "--max-pairs", "8",
         "--max-body-bytes", "20000", "--log-level", "warning"],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "COLUMNS": "200"},
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(base, proc, timeout=180, log_path=work / "server.log")
    except RuntimeError:
        proc.kill()
        raise
    client = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
    yield client, base, proc, work / "server.log"
    client.close()
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.mark.slow
def test_health_models_and_the_api_key(server):
    import httpx

    client, base, _, _ = server
    assert httpx.get(base + "/health").json()["status"] == "ok"  # no key needed
    assert httpx.get(base + "/v1/models").status_code == 401
    assert httpx.get(base + "/v1/models", headers={"X-API-Key": "wrong"}).status_code == 401
    assert httpx.post(base + "/v1/judge", json=PAIR).status_code == 401
    card = client.get("/v1/models").json()["data"][0]
    assert card["id"] == "judge-q8_0" and card["format"]["file_type"] == "Q8_0"
    assert card["format"]["backend"] == "gguf" and card["format"]["context"] > 0
    assert card["template"]["name"] == "en" and card["mode"] == "verdict"
    assert card["calibration"]["alpha"] == 0.2 and card["calibration"]["threshold"] is not None
    assert card["training"]["template"] == "en"  # from the run's adapter/conj_lite_train.json


@pytest.mark.slow
def test_judge_one_pair_and_a_list_with_selective_verdicts(server):
    client, _, _, _ = server
    reply = client.post("/v1/judge", json=PAIR)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["mode"] == "verdict" and len(body["results"]) == 1
    record = body["results"][0]
    assert record["verdict"] in ("A", "B", "inconsistent") and 0 <= record["p_a"] <= 1
    assert record["verdict_ab"] in ("A", "B") and record["verdict_ba"] in ("A", "B")
    assert "rationale_ab" not in record  # verdict mode has none
    threshold = client.get("/v1/models").json()["data"][0]["calibration"]["threshold"]
    expected = ("A" if record["p_a"] >= 0.5 else "B") if record["confidence"] >= threshold else "abstain"
    assert record["selective_verdict"] == expected and record["risk_threshold"] == threshold

    pairs = [{**PAIR, "id": "p1"}, {"question": "Capital of France?", "answer_a": "Lyon", "answer_b": "Paris",
                                    "id": "p2"}, {**PAIR, "id": "p3"}]
    many = client.post("/v1/judge", json={"pairs": pairs}).json()["results"]
    assert [r["id"] for r in many] == ["p1", "p2", "p3"]
    assert many[0]["p_a"] == pytest.approx(record["p_a"], abs=5e-3) and many[0]["verdict"] == record["verdict"]

    rationale = client.post("/v1/judge", json={**PAIR, "mode": "rationale"}).json()
    r = rationale["results"][0]
    assert rationale["mode"] == "rationale" and isinstance(r["rationale_ab"], str) and isinstance(r["rationale_ba"], str)
    assert "selective_verdict" not in r  # calibrated in verdict mode only
    quiet = client.post("/v1/judge", json={**PAIR, "mode": "rationale", "rationales": False}).json()["results"][0]
    assert "rationale_ab" not in quiet and quiet["verdict"] == r["verdict"]


@pytest.mark.slow
def test_bad_requests_get_400_and_413_naming_the_problem(server):
    client, _, _, _ = server
    bad = client.post("/v1/judge", content=b"{not json", headers={"content-type": "application/json"})
    assert bad.status_code == 400 and "JSON" in bad.json()["error"]["message"]
    missing = client.post("/v1/judge", json={"pairs": [PAIR, {"question": "q", "answer_a": "a"}]})
    assert missing.status_code == 400 and missing.json()["error"]["field"] == "pairs[1].answer_b"
    big = client.post("/v1/judge", json={**PAIR, "answer_a": "x" * 30000})
    assert big.status_code == 413 and big.json()["error"]["limit"] == 20000
    many = client.post("/v1/judge", json={"pairs": [PAIR] * 9})
    assert many.status_code == 413 and many.json()["error"]["limit"] == 8
    long = client.post("/v1/judge", json={**PAIR, "answer_a": "seven plus five " * 900})
    error = long.json()["error"]
    assert long.status_code == 413 and error["tokens"] > error["limit"] and "context" in error["message"]
    assert client.post("/v1/judge", json=PAIR).status_code == 200  # still serving


@pytest.mark.slow
def test_concurrent_clients_and_a_client_that_leaves(server):
    import httpx

    client, base, proc, log = server
    headers = {"X-API-Key": KEY}

    def leave():  # a whole rationale-mode batch sent, then the connection closed unread
        host, port = base.removeprefix("http://").split(":")
        body = json.dumps({"pairs": [PAIR] * 8, "mode": "rationale"}).encode()
        head = (f"POST /v1/judge HTTP/1.1\r\nHost: {host}\r\nX-API-Key: {KEY}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(head + body)
            return True

    def ask(i):
        pair = {**PAIR, "id": i} if i % 2 else {"question": "Capital of France?", "answer_a": "Paris",
                                               "answer_b": "Lyon", "id": i}
        return httpx.post(base + "/v1/judge", json=pair, headers=headers, timeout=120)

    with concurrent.futures.ThreadPoolExecutor(9) as pool:
        leaving = pool.submit(leave)
        time.sleep(0.1)
        replies = list(pool.map(ask, range(8)))
        assert leaving.result()
    assert all(r.status_code == 200 for r in replies), [r.text for r in replies]
    by_kind = {}
    for i, reply in enumerate(replies):
        result = reply.json()["results"][0]
        assert result["id"] == i
        by_kind.setdefault(i % 2, set()).add(result["verdict"])
    assert all(len(v) == 1 for v in by_kind.values())  # batched together or not, the same verdict
    time.sleep(1.0)
    assert proc.poll() is None and client.get("/health").json()["status"] == "ok"
    assert client.post("/v1/judge", json=PAIR).status_code == 200
    assert "Traceback" not in log.read_text()


def test_wait_until_up_reports_an_exited_server_with_its_log(tmp_path):
    pytest.importorskip("httpx")
    log = tmp_path / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-c", "print('bad model file')"], stdout=out)
        proc.wait(30)
    port = free_port()  # nothing listens there
    with pytest.raises(RuntimeError, match="(?s)exited.*bad model file"):
        wait_until_up(f"http://127.0.0.1:{port}", proc, timeout=5, log_path=log)
    with pytest.raises(RuntimeError, match="did not come up"):
        wait_until_up(f"http://127.0.0.1:{port}", None, timeout=0.5)
