"""A bounded abuse test of `conj-lite serve` on 127.0.0.1: what careless and hostile
clients do to the judge service, and what it must hold (issue 22).

    python benchmarks/serve_abuse.py                     # packaged SmolLM2 Q4_1, verdict mode
    python benchmarks/serve_abuse.py --model judge.gguf --slow 100 --hangups 100

Phases, each against a server started here as a subprocess on a free loopback port:
  bad input   a battery of malformed requests (lone surrogates, JSON nested 100,000
              deep, NaN ids, unknown fields, a rebinding Host, text/plain, oversized
              bodies, ...): every one must get a 4xx, none a 5xx, and the log no traceback;
  slow        --slow connections that send their headers or body a byte every 2 s while
              --clients ordinary clients judge pairs: how long the slow ones are held, and
              whether the others are still served;
  hang-ups    --hangups clients that send half a body and close: the log may grow by a
              line each, not a traceback;
  SIGTERM     under load (--clients clients judging) with --slow slow connections held:
              seconds from SIGTERM to exit, and how the requests in flight ended.
Everything stops by itself (every phase is bounded in count and time) and talks only to
127.0.0.1. Results go to docs/benchmarks/serve_abuse.json and the "Judge service under
abuse" section of docs/benchmarks.md (replaced on each run).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime as dt
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

TITLE = "Judge service under abuse (benchmarks/serve_abuse.py)"
from conj_lite.judging.serve import wait_until_up  # noqa: E402
from conj_lite.system import usable_cpus  # noqa: E402
from report import write_section  # noqa: E402
from serve_load import default_model, free_port  # noqa: E402

HOST = "127.0.0.1"
PAIR = {"question": "What is 7 + 5?", "answer_a": "7 + 5 = 12.", "answer_b": "7 + 5 = 13."}
HEAD = "POST /v1/judge HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {kind}\r\nContent-Length: {n}\r\n\r\n"


def bad_requests(max_body: int) -> dict[str, tuple[bytes, dict]]:
    """name -> (body, extra headers) of requests the service must refuse with a 4xx."""
    pair = json.dumps(PAIR)
    return {
        "invalid JSON": (b'{"question": "unterminated', {}),
        "not an object": (b"[1, 2]", {}),
        "lone surrogate in a field": (b'{"question": "q \\ud800", "answer_a": "a", "answer_b": "b"}', {}),
        "nested 100,000 deep": (b"[" * 100_000 + b"]" * 100_000, {}),
        "NaN id": (pair[:-1].encode() + b', "id": NaN}', {}),
        "1e999 id": (pair[:-1].encode() + b', "id": 1e999}', {}),
        "lone surrogate id": (pair[:-1].encode() + b', "id": "\\udfff"}', {}),
        "mode inside a pair": (json.dumps({"pairs": [{**PAIR, "mode": "rationale"}]}).encode(), {}),
        "unknown field": (json.dumps({**PAIR, "colour": "red"}).encode(), {}),
        "empty question": (json.dumps({**PAIR, "question": " "}).encode(), {}),
        "missing answer": (json.dumps({"question": "q", "answer_a": "a"}).encode(), {}),
        "number as answer": (json.dumps({**PAIR, "answer_a": 12}).encode(), {}),
        "bad mode": (json.dumps({**PAIR, "mode": "fast"}).encode(), {}),
        "unknown adapter": (json.dumps({**PAIR, "adapter": "../../etc/passwd"}).encode(), {}),
        "empty pairs": (b'{"pairs": []}', {}),
        "100 pairs": (json.dumps({"pairs": [PAIR] * 100}).encode(), {}),
        "body over the limit": (json.dumps({**PAIR, "answer_a": "x" * (max_body + 1)}).encode(), {}),
        "answer over the context": (json.dumps({**PAIR, "answer_a": "seven plus five " * 4000}).encode(), {}),
        "not UTF-8": (b'{"question": "\xff\xfe", "answer_a": "a", "answer_b": "b"}', {}),
        "text/plain (a cross-site form)": (pair.encode(), {"content-type": "text/plain"}),
        "rebinding Host": (pair.encode(), {"host": "attacker.example"}),
        "chat: stream": (json.dumps({"messages": [], "stream": True, "judge": PAIR}).encode(), {"path": "/v1/chat/completions"}),
        "chat: not the judge prompt": (json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode(),
                                       {"path": "/v1/chat/completions"}),
    }


def bad_input(base: str, max_body: int) -> dict:
    import httpx

    statuses, fives = {}, []
    for name, (body, extra) in bad_requests(max_body).items():
        headers = {"content-type": "application/json", **{k: v for k, v in extra.items() if k != "path"}}
        reply = httpx.post(base + extra.get("path", "/v1/judge"), content=body, headers=headers, timeout=120)
        statuses[name] = reply.status_code
        if reply.status_code >= 500 or reply.status_code < 400:
            fives.append(name)
    return {"cases": len(statuses), "not_4xx": fives, "statuses": statuses}


def slow_connection(port: int, body: bool, limit_s: float) -> float:
    """Send a request a byte every 2 s (the headers, or after them the body); seconds
    until the server closes the connection (limit_s when it never did)."""
    start = time.monotonic()
    payload = json.dumps(PAIR).encode()
    try:
        with socket.create_connection((HOST, port), timeout=5) as sock:
            if body:
                sock.sendall(HEAD.format(kind="application/json", n=len(payload)).encode())
            else:
                sock.sendall(b"POST /v1/judge HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            sock.settimeout(2.0)
            while time.monotonic() - start < limit_s:
                try:
                    if sock.recv(4096) == b"":
                        break
                except socket.timeout:
                    pass
                except OSError:
                    break
                try:
                    sock.sendall(b"x")
                except OSError:
                    break
    except OSError:
        pass
    return time.monotonic() - start


def judge_clients(base: str, clients: int, stop: threading.Event, limit_s: float) -> dict:
    """`clients` threads judging PAIR until `stop` is set (or limit_s): counts and latencies."""
    import httpx

    out = {"ok": 0, "errors": [], "statuses": {}, "latencies": []}
    lock = threading.Lock()

    def client():
        with httpx.Client(base_url=base, timeout=120) as http:
            end = time.monotonic() + limit_s
            while not stop.is_set() and time.monotonic() < end:
                start = time.perf_counter()
                try:
                    reply = http.post("/v1/judge", json=PAIR)
                except httpx.HTTPError as exc:
                    with lock:
                        out["errors"].append(type(exc).__name__)
                    if stop.is_set():
                        return
                    time.sleep(0.2)
                    continue
                with lock:
                    out["statuses"][reply.status_code] = out["statuses"].get(reply.status_code, 0) + 1
                    if reply.status_code == 200:
                        out["ok"] += 1
                        out["latencies"].append(time.perf_counter() - start)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    out["threads"] = threads
    return out


def summary(load: dict) -> dict:
    lat = sorted(load["latencies"])
    p = (lambda q: round(lat[min(len(lat) - 1, int(q * len(lat)))], 3) if lat else None)
    return {"ok": load["ok"], "statuses": load["statuses"], "connection_errors": len(load["errors"]),
            "error_kinds": sorted(set(load["errors"])), "latency_p50_s": p(0.5), "latency_p95_s": p(0.95)}


def slow_phase(base: str, port: int, n: int, clients: int, limit_s: float) -> dict:
    stop = threading.Event()
    load = judge_clients(base, clients, stop, limit_s + 10)
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        held = list(pool.map(lambda i: slow_connection(port, i % 2 == 1, limit_s), range(n)))
    stop.set()
    for t in load.pop("threads"):
        t.join(130)
    return {"slow_connections": n, "held_max_s": round(max(held), 1), "held_median_s": round(sorted(held)[n // 2], 1),
            "never_closed": sum(h >= limit_s for h in held), "meanwhile": summary(load)}


def hangups(port: int, n: int) -> None:
    payload = json.dumps(PAIR).encode()
    for _ in range(n):
        with socket.create_connection((HOST, port), timeout=5) as sock:
            sock.sendall(HEAD.format(kind="application/json", n=len(payload)).encode() + payload[:20])
            time.sleep(0.02)


def sigterm_phase(proc, base: str, port: int, slow: int, clients: int) -> dict:
    stop = threading.Event()
    load = judge_clients(base, clients, stop, 120)
    holders = []
    for i in range(slow):  # held open, half-sent, through the SIGTERM
        sock = socket.create_connection((HOST, port), timeout=5)
        payload = json.dumps(PAIR).encode()
        sock.sendall(HEAD.format(kind="application/json", n=len(payload)).encode() + payload[:10] if i % 2
                     else b"POST /v1/judge HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        holders.append(sock)
    time.sleep(3.0)  # load running
    ok_before = load["ok"]
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
        exit_s = round(time.monotonic() - start, 2)
    except subprocess.TimeoutExpired:
        exit_s = None
        proc.kill()
    stop.set()
    for t in load.pop("threads"):
        t.join(130)
    for sock in holders:
        sock.close()
    return {"slow_connections_held": slow, "clients": clients, "exit_s": exit_s, "exit_code": proc.returncode,
            "ok_before_sigterm": ok_before, "ok_after_sigterm": load["ok"] - ok_before, "after": summary(load)}


def start_server(model: Path, port: int, args, log_path: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "CONJ_LITE_API_KEY"}  # keyless: the loopback rules apply
    cmd = [sys.executable, "-m", "conj_lite.cli", "serve", "--model", str(model), "--host", HOST, "--port", str(port),
           "--mode", "verdict", "--threads", str(args.threads), "--read-timeout", str(args.read_timeout),
           "--max-body-bytes", str(args.max_body), "--log-level", "info"]
    log = open(log_path, "w")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)


def markdown(report: dict) -> str:
    r, m = report["result"], report["machine"]
    bad, slow, sig = r["bad_input"], r["slow"], r["sigterm"]
    return "\n".join([
        f"Run {report['date']}: `{report['command']}`. Server: `conj-lite serve` on 127.0.0.1 without an API key "
        f"(verdict mode, --read-timeout {report['read_timeout']:g} s, defaults otherwise) with {report['model']}; "
        f"clients in the same machine: {m['cores']} cores visible, load average {m['load_before']} before, "
        f"{m['load_after']} after" + (" (**taken under contention**: other work shared the CPUs)"
                                      if m["contended"] else "") + ".",
        "",
        "| phase | what was done | result |",
        "|---|---|---|",
        f"| bad input | {bad['cases']} malformed or hostile requests | "
        f"{bad['cases'] - len(bad['not_4xx'])} answered 4xx, {len(bad['not_4xx'])} otherwise"
        + (f" ({', '.join(bad['not_4xx'])})" if bad["not_4xx"] else "") + " |",
        f"| slow clients | {slow['slow_connections']} connections sending headers or body a byte every 2 s, "
        f"{report['clients']} clients judging meanwhile | held at most {slow['held_max_s']} s (median "
        f"{slow['held_median_s']} s), {slow['never_closed']} never closed; meanwhile {slow['meanwhile']['ok']} "
        f"pairs judged, statuses {slow['meanwhile']['statuses']}, p50 {slow['meanwhile']['latency_p50_s']} s |",
        f"| hang-ups | {r['hangups']['count']} clients sending half a body, then closing | log grew "
        f"{r['hangups']['log_lines']} lines ({r['hangups']['log_bytes']} bytes), {r['hangups']['tracebacks']} tracebacks |",
        f"| SIGTERM under load | {sig['clients']} clients judging, {sig['slow_connections_held']} half-sent "
        f"connections held | exit {sig['exit_s']} s after SIGTERM (code {sig['exit_code']}); requests after it: "
        f"statuses {sig['after']['statuses']}, {sig['after']['connection_errors']} refused connections |",
        "",
        f"Tracebacks in the whole server log: {r['tracebacks']}. Each phase is bounded and talks to 127.0.0.1 only. "
        "Slow connections count against --max-connections (64): while more are open, ordinary requests get 503 "
        "(the clients here retry at once, hence the many 503s) until --read-timeout closes the slow ones. "
        "After SIGTERM the server stops accepting, closes connections still sending a request (no work had started "
        "for them) and lets the judgments in flight finish (up to --shutdown-grace); the clients' later requests "
        "find the port closed, which is the refused connections above. Raw figures: "
        "[docs/benchmarks/serve_abuse.json](benchmarks/serve_abuse.json).",
        "",
    ])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a GGUF judge (default: the packaged SmolLM2-135M-Instruct Q4_1)")
    parser.add_argument("--clients", type=int, default=8, help="ordinary clients during the slow and SIGTERM phases")
    parser.add_argument("--slow", type=int, default=60, help="slow connections (default 60)")
    parser.add_argument("--hangups", type=int, default=100, help="clients that hang up mid-body (default 100)")
    parser.add_argument("--read-timeout", type=float, default=10.0)
    parser.add_argument("--max-body", type=int, default=1 << 20)
    parser.add_argument("--threads", type=int, help="server threads (default: the CPUs this process may use)")
    parser.add_argument("--no-docs", action="store_true", help="print only; leave docs/ alone")
    parser.add_argument("--render", metavar="JSON", help="only rewrite the docs section from a saved report")
    args = parser.parse_args(argv)
    if args.render:
        report = json.loads(Path(args.render).read_text())
        print(f"wrote {write_section(TITLE, markdown(report), report, 'serve_abuse.json')}")
        return 0
    args.threads = args.threads or usable_cpus()
    model = Path(args.model) if args.model else default_model()
    port = free_port()
    base = f"http://{HOST}:{port}"
    log_path = Path(tempfile.mkdtemp(prefix="conj-lite-serve-abuse-")) / "server.log"
    load_before = os.getloadavg()[0]
    proc = start_server(model, port, args, log_path)
    result = {}
    try:
        wait_until_up(base, proc, log_path=log_path)
        import httpx

        httpx.post(base + "/v1/judge", json=PAIR, timeout=600)  # warm-up
        result["bad_input"] = bad_input(base, args.max_body)
        result["slow"] = slow_phase(base, port, args.slow, args.clients, limit_s=3 * args.read_timeout + 10)
        before = log_path.read_text(errors="replace")
        hangups(port, args.hangups)
        time.sleep(1.0)
        grown = log_path.read_text(errors="replace")[len(before):]
        result["hangups"] = {"count": args.hangups, "log_lines": len(grown.splitlines()),
                             "log_bytes": len(grown.encode()), "tracebacks": grown.count("Traceback")}
        result["sigterm"] = sigterm_phase(proc, base, port, args.slow, args.clients)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    result["tracebacks"] = log_path.read_text(errors="replace").count("Traceback")
    load_after = os.getloadavg()[0]
    cores = usable_cpus()
    report = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python benchmarks/serve_abuse.py" + ("" if argv is None and len(sys.argv) == 1
                                                          else " " + " ".join(argv if argv is not None else sys.argv[1:])),
        "model": model.name if args.model else "the packaged SmolLM2-135M-Instruct Q4_1 (base.gguf)",
        "clients": args.clients, "read_timeout": args.read_timeout, "threads": args.threads,
        "machine": {"cores": cores, "load_before": round(load_before, 2), "load_after": round(load_after, 2),
                    "contended": load_before > cores},
        "result": result,
    }
    print(json.dumps(report, indent=2))
    if not args.no_docs:
        write_section(TITLE, markdown(report), report, "serve_abuse.json")
    held = result["sigterm"]["exit_s"]
    good = (not result["bad_input"]["not_4xx"] and result["tracebacks"] == 0 and held is not None and held <= 10
            and result["slow"]["never_closed"] == 0)
    return 0 if good else 1


if __name__ == "__main__":
    raise SystemExit(main())
