"""conj-lite serve: request parsing, then the real server (uvicorn, in a subprocess) on a
free 127.0.0.1 port with the tiny model's q8_0 GGUF, talked to with httpx."""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conj_lite.cli import main
from conj_lite.errors import InputError
from conj_lite.judging.serve import (
    RequestError,
    chat_completion,
    check_api_key,
    check_bind,
    is_loopback,
    parse_chat_request,
    parse_request,
    wait_until_up,
    without_paths,
)
from conj_lite.prompts import build_messages, load_template

KEY = "test-key-123-abcdef"
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


def refused(body: bytes) -> RequestError:
    with pytest.raises(RequestError) as info:
        parse_request(body, "verdict")
    json.dumps(info.value.extra, ensure_ascii=False).encode("utf-8")  # the reply can be sent
    info.value.message.encode("utf-8")
    return info.value


@pytest.mark.parametrize("body, name", [
    ('{"question": "q \\ud800", "answer_a": "a", "answer_b": "b"}', "question"),
    ('{"question": "q", "answer_a": "a \\udfff", "answer_b": "b"}', "answer_a"),
    ('{"pairs": [{"question": "q", "answer_a": "a", "answer_b": "\\ud83d"}]}', "pairs[0].answer_b"),
])
def test_a_lone_surrogate_in_a_field_is_a_400_naming_it(body, name):
    error = refused(body.encode())
    assert error.status == 400 and error.extra["field"] == name and "surrogate" in error.message


def test_json_nested_too_deeply_is_a_400():
    for body in (b"[" * 100_000 + b"]" * 100_000, b'{"question": ' + b"[" * 100_000):
        error = refused(body)
        assert error.status == 400 and "JSON" in error.message


@pytest.mark.parametrize("pair_id", ["NaN", "Infinity", "1e999", '"x \\ud800"', "true", '{"a": 1}', "[1]"])
def test_an_id_that_cannot_be_echoed_is_refused_before_judging(pair_id):
    single = '{"question": "q", "answer_a": "a", "answer_b": "b", "id": %s}' % pair_id
    assert refused(single.encode()).extra["field"] == "id"
    many = '{"pairs": [{"question": "q", "answer_a": "a", "answer_b": "b", "id": %s}]}' % pair_id
    assert refused(many.encode()).extra["field"] == "pairs[0].id"
    good = parse_request(b'{"pairs": [{"question": "q", "answer_a": "a", "answer_b": "b", "id": 7.5}, '
                         b'{"question": "q", "answer_a": "a", "answer_b": "b", "id": "x"}]}', "verdict")
    assert good.ids == [7.5, "x"]


def test_unknown_fields_are_refused_not_ignored():
    error = refused(json.dumps({"pairs": [{**PAIR, "mode": "rationale"}]}).encode())
    assert error.extra["field"] == "pairs[0].mode" and "top level" in error.message
    assert refused(json.dumps({**PAIR, "rationale": True}).encode()).extra["field"] == "rationale"
    assert refused(json.dumps({"pairs": [PAIR], "question": "q"}).encode()).extra["field"] == "question"
    assert refused(b'{"pairs": [], "\\ud800": 1}').extra["field"] == "'\\ud800'"
    assert parse_request(json.dumps({**PAIR, "id": 3, "mode": "rationale", "rationales": False,
                                     "adapter": "x"}).encode(), "verdict").adapter == "x"


def test_json_errors_read_well():
    error = refused(b'{"question": "unterminated')
    assert "starting at column 14" in error.message and "at at" not in error.message


def test_api_keys_must_be_long_enough():
    check_api_key(None)
    check_api_key("k" * 16)
    for bad in ("", " ", "k", "k" * 15, "k" * 16 + " ", "kkkkkkkk kkkkkkkk"):
        with pytest.raises(InputError, match="at least 16"):
            check_api_key(bad, "--api-key")
    env = dict(os.environ)
    try:  # refused before any model loads, from the flag or the environment
        os.environ.pop("CONJ_LITE_API_KEY", None)
        assert main(["serve", "--model", "missing.gguf", "--api-key", "x"]) == 2
        os.environ["CONJ_LITE_API_KEY"] = " "
        assert main(["serve", "--model", "missing.gguf"]) == 2
    finally:
        os.environ.clear()
        os.environ.update(env)


def test_chat_requests_carry_the_pair_in_the_judge_prompt_or_an_extension_field():
    en = load_template("en")
    prompt = build_messages(en, "What is 7 + 5?", "12", "Thirteen,\nsurely.")[-1]["content"]
    messages = [{"role": "system", "content": "You judge."}, {"role": "user", "content": prompt}]
    request, model = parse_chat_request(json.dumps({"model": "judge", "messages": messages}).encode(), en, "verdict")
    assert request.pairs == [("What is 7 + 5?", "12", "Thirteen,\nsurely.")] and model == "judge"
    assert request.mode == "verdict" and request.ids == [None]
    parts = [{"role": "user", "content": [{"type": "text", "text": prompt}]}]
    assert parse_chat_request(json.dumps({"messages": parts}).encode(), en, "verdict")[0].pairs == request.pairs
    extension = {"model": "m", "messages": [{"role": "user", "content": "judge this"}],
                 "judge": {**PAIR, "mode": "rationale"}}
    request, _ = parse_chat_request(json.dumps(extension).encode(), en, "verdict")
    assert request.pairs == [tuple(PAIR.values())] and request.mode == "rationale"
    cases = [
        ({"messages": messages, "stream": True}, "stream"),
        ({"messages": [{"role": "user", "content": "Which is better, 12 or 13?"}]}, "messages[0].content"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "system", "content": "x"}]}, "messages"),
        ({"messages": messages, "judge": {"question": "q", "answer_a": "a"}}, "judge.answer_b"),
        ({"messages": messages, "judge": {**PAIR, "id": 1}}, "judge.id"),
        ({"messages": messages, "judge": {**PAIR, "question": "\ud800"}}, "judge.question"),
    ]
    for body, name in cases:
        with pytest.raises(RequestError) as info:
            parse_chat_request(json.dumps(body).encode(), en, "verdict")
        assert info.value.status == 400 and info.value.extra["field"] == name, (body, info.value.message)


def test_a_chat_completion_holds_the_record_and_the_judgment_in_the_templates_keys():
    record = {"verdict": "inconsistent", "p_a": 0.3, "verdict_ab": "A", "verdict_ba": "B", "rationale_ab": "why"}
    reply = chat_completion(record, load_template("en"), "judge")
    content = json.loads(reply["choices"][0]["message"]["content"])
    assert content == {"rationale": "why", "better_answer": 2, **record}
    assert reply["object"] == "chat.completion" and reply["model"] == "judge"
    assert reply["choices"][0]["message"]["role"] == "assistant" and reply["choices"][0]["finish_reason"] == "stop"
    zh = load_template("zh")
    content = json.loads(chat_completion({"verdict": "A", "p_a": 0.9}, zh, None)["choices"][0]["message"]["content"])
    assert content[zh.verdict_key] == 1 and zh.rationale_key not in content


def test_model_cards_of_a_keyless_server_name_no_paths():
    card = {"id": "judge", "path": "/home/me/runs/x/gguf/judge.gguf", "lora": "C:\\runs\\a.gguf",
            "calibration": {"source": "/data/cal.jsonl", "alpha": 0.1}, "training": {"base_model": "~/m", "n": 3},
            "template": {"name": "en"}}
    assert without_paths(card) == {"id": "judge", "path": "judge.gguf", "lora": "a.gguf",
                                   "calibration": {"source": "cal.jsonl", "alpha": 0.1},
                                   "training": {"base_model": "m", "n": 3}, "template": {"name": "en"}}


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
    proc, base, log = launch(exported, work, "--api-key", KEY, "--risk", "0.2", "--calibration", str(calibration),
                             "--max-pairs", "8", "--max-body-bytes", "20000")
    client = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
    yield client, base, proc, log
    client.close()
    stop(proc)


def launch(exported, work, *extra, log_level="warning"):
    """`conj-lite serve` on the tiny q8_0 judge (verdict mode) on a free loopback port, as a
    subprocess: (process, base URL, log path) once it answers /health."""
    pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    port = free_port()
    log_path = work / f"server-{port}.log"
    env = {k: v for k, v in os.environ.items() if k != "CONJ_LITE_API_KEY"}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "conj_lite.cli", "serve", "--model", str(exported.gguf_paths["q8_0"]),
             "--port", str(port), "--threads", "2", "--mode", "verdict", "--max-new-tokens", "48",
             "--log-level", log_level, *extra],
            stdout=log, stderr=subprocess.STDOUT, env={**env, "COLUMNS": "200"},
        )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(base, proc, timeout=180, log_path=log_path)
    except RuntimeError:
        proc.kill()
        raise
    return proc, base, log_path


def stop(proc) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


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


@pytest.mark.slow
def test_bad_input_that_once_gave_500_gets_400_and_no_traceback(server):
    client, _, proc, log = server
    json_body = {"content-type": "application/json"}
    judged = client.get("/health").json()["judged"]
    for body, name in [
        (b'{"question": "q \\ud800", "answer_a": "a", "answer_b": "b"}', "question"),  # a lone surrogate
        (b'{"question": "q", "answer_a": "a", "answer_b": "b", "id": NaN}', "id"),  # ids that do not encode
        (b'{"question": "q", "answer_a": "a", "answer_b": "b", "id": 1e999}', "id"),
        (b'{"pairs": [{"question": "q", "answer_a": "a", "answer_b": "b", "id": "\\udfff"}]}', "pairs[0].id"),
        (b'{"pairs": [{"question": "q", "answer_a": "a", "answer_b": "b", "mode": "rationale"}]}', "pairs[0].mode"),
    ]:
        reply = client.post("/v1/judge", content=body, headers=json_body)
        assert reply.status_code == 400 and reply.json()["error"]["field"] == name, reply.text
    deep = client.post("/v1/judge", content=b"[" * 5000 + b"]" * 5000, headers=json_body)  # 5000 passes 20000 bytes
    assert deep.status_code == 400 and "nested" in deep.json()["error"]["message"], deep.text
    assert client.get("/health").json()["judged"] == judged  # refused before judging: no work lost
    assert client.post("/v1/judge", json=PAIR).status_code == 200
    assert proc.poll() is None and "Traceback" not in log.read_text()


@pytest.mark.slow
def test_the_openai_client_gets_the_judges_json(server):
    openai = pytest.importorskip("openai")
    from conj_lite.prompts import build_messages, load_template

    client, base, _, log = server
    expected = client.post("/v1/judge", json=PAIR).json()["results"][0]
    ai = openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0)
    prompt = build_messages(load_template("en"), *PAIR.values())[-1]["content"]
    reply = ai.chat.completions.create(model="judge-q8_0", messages=[{"role": "user", "content": prompt}])
    content = json.loads(reply.choices[0].message.content)
    assert reply.choices[0].message.role == "assistant" and reply.choices[0].finish_reason == "stop"
    assert content["verdict"] == expected["verdict"] and content["p_a"] == pytest.approx(expected["p_a"], abs=5e-3)
    assert content["better_answer"] == {"A": 1, "B": 2}.get(content["verdict"], 1 if content["p_a"] >= 0.5 else 2)
    assert content["selective_verdict"] == expected["selective_verdict"]
    extension = ai.chat.completions.create(model="judge-q8_0", messages=[], extra_body={"judge": PAIR})  # README
    assert json.loads(extension.choices[0].message.content)["verdict"] == expected["verdict"]
    with pytest.raises(openai.BadRequestError, match="stream"):
        ai.chat.completions.create(model="judge-q8_0", messages=[{"role": "user", "content": prompt}], stream=True)
    with pytest.raises(openai.BadRequestError, match="prompt"):
        ai.chat.completions.create(model="judge-q8_0", messages=[{"role": "user", "content": "Is 12 right?"}])
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base + "/v1", api_key="wrong-" + KEY, max_retries=0).chat.completions.create(
            model="judge-q8_0", messages=[{"role": "user", "content": prompt}])
    assert "Traceback" not in log.read_text()


@pytest.fixture(scope="module")
def keyless(exported, tmp_path_factory):
    """A server without an API key (loopback only), quick to cut slow clients off."""
    proc, base, log = launch(exported, tmp_path_factory.mktemp("keyless"), "--read-timeout", "2",
                             log_level="info")
    yield proc, base, log
    stop(proc)


def raw_request(base: str, data: bytes, *, read: bool = True, timeout: float = 30) -> bytes:
    """Send bytes as they are on a new connection; the reply's bytes until the server closes."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(data)
        if not read:
            return b""
        out = b""  # (no half-close: uvicorn takes one for a client that left)
        while chunk := sock.recv(65536):
            out += chunk
        return out


def head(path: str, body: bytes, host: str = "127.0.0.1", kind: str = "application/json", length=None) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {kind}\r\nConnection: close\r\n"
            f"Content-Length: {len(body) if length is None else length}\r\n\r\n").encode() + body


@pytest.mark.slow
def test_a_keyless_server_answers_only_programs_on_this_machine(keyless):
    import httpx

    proc, base, log = keyless
    body = json.dumps(PAIR).encode()
    judged = httpx.get(base + "/health").json()["judged"]
    rebound = raw_request(base, head("/v1/judge", body, host="attacker.example:8080"))
    assert rebound.startswith(b"HTTP/1.1 400"), rebound[:200]
    simple = raw_request(base, head("/v1/judge", body, kind="text/plain"))  # what a cross-site form sends
    assert simple.startswith(b"HTTP/1.1 415"), simple[:200]
    assert httpx.get(base + "/health").json()["judged"] == judged  # neither was judged
    ok = httpx.post(base + "/v1/judge", json=PAIR, headers={"Origin": "http://attacker.example"}, timeout=60)
    assert ok.status_code == 200 and "access-control-allow-origin" not in ok.headers  # no CORS
    assert httpx.post(f"http://localhost:{base.rsplit(':', 1)[1]}/v1/judge", json=PAIR, timeout=60).status_code == 200
    preflight = httpx.options(base + "/v1/judge", headers={"Origin": "http://attacker.example",
                                                           "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in preflight.headers
    card = httpx.get(base + "/v1/models").json()["data"][0]
    assert card["path"] == "judge-q8_0.gguf" and not re.search(r'"[/~]', json.dumps(card))  # no absolute paths
    assert proc.poll() is None


@pytest.mark.slow
def test_slow_clients_are_cut_off_and_hangups_log_one_quiet_line(keyless):
    proc, base, log = keyless
    host, port = base.removeprefix("http://").split(":")
    body = json.dumps(PAIR).encode()

    def held_for(first: bytes) -> float:
        """Seconds the server keeps a connection that sends `first`, then a byte every 0.5 s."""
        start = time.monotonic()
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(first)
            sock.settimeout(0.5)
            while time.monotonic() - start < 20:
                try:
                    if sock.recv(65536) == b"":
                        break
                except socket.timeout:
                    pass
                try:
                    sock.sendall(b"x" if b"\r\n\r\n" not in first else b" ")
                except OSError:
                    break
        return time.monotonic() - start

    assert held_for(b"POST /v1/judge HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ") < 8  # headers never end
    assert held_for(head("/v1/judge", body[:10], length=len(body) + 4000)) < 8  # the body never ends
    for _ in range(5):  # hang up mid-body
        raw_request(base, head("/v1/judge", body[:20], length=len(body)), read=False)
    time.sleep(1.0)
    assert raw_request(base, head("/v1/judge", body)).startswith(b"HTTP/1.1 200")
    text = log.read_text()
    assert "Traceback" not in text and "ERROR" not in text, text[-3000:]
    assert text.count("hung up") >= 1 and len(text.splitlines()) < 40
    assert proc.poll() is None


@pytest.mark.slow
def test_sigterm_stops_the_server_soon_whatever_clients_do(exported, tmp_path):
    """SIGTERM while one client holds a half-sent body and another half-sent headers
    (the read timeout far away): the server finishes the judgment it has in flight and
    exits, without waiting for the slow clients (it used to wait for as long as they
    stayed, ignoring further SIGTERMs)."""
    import httpx

    proc, base, log = launch(exported, tmp_path, "--read-timeout", "300", "--shutdown-grace", "60")
    host, port = base.removeprefix("http://").split(":")
    body = json.dumps(PAIR).encode()
    slow = [socket.create_connection((host, int(port))) for _ in range(2)]
    try:
        slow[0].sendall(head("/v1/judge", body[:10], length=len(body)))
        slow[1].sendall(b"POST /v1/judge HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(httpx.post, base + "/v1/judge", json={"pairs": [PAIR] * 2, "mode": "rationale"},
                                    timeout=120)
            time.sleep(0.5)
            start = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            reply = in_flight.result()
            finished = time.monotonic() - start
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                pytest.fail("the server still runs 30 s after SIGTERM and its last judgment")
            stopped = time.monotonic() - start
        assert reply.status_code == 200 and len(reply.json()["results"]) == 2  # in flight: finished
        assert stopped - finished < 5, (finished, stopped)  # then out, slow clients or not
    finally:
        for sock in slow:
            sock.close()
        if proc.poll() is None:
            proc.kill()
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


@pytest.mark.slow
def test_a_reply_is_counted_before_it_leaves(exported):
    """/health's `judged` read right after a reply includes that reply's pairs (the
    count was once made after the futures resolved: test_serve flaked on it)."""
    from conj_lite.judging import Judge
    from conj_lite.judging.serve import JudgeRequest, JudgeService

    service = JudgeService(Judge.from_gguf(exported.gguf_paths["q8_0"], n_threads=2, warn=None))
    try:
        future = service.submit(JudgeRequest(pairs=[tuple(PAIR.values())] * 2, ids=[0, 1], mode="verdict",
                                             rationales=False))
        seen = []
        future.add_done_callback(lambda f: seen.append(service.judged))  # runs as the reply is handed over
        assert len(future.result(timeout=120)) == 2
        assert seen == [2]
    finally:
        service.close()
