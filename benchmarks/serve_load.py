"""A bounded load test of `conj-lite serve` on 127.0.0.1: N concurrent clients send a
fixed number of requests (one pair each) and the run reports throughput, p50/p95
latency and errors.

    python benchmarks/serve_load.py                          # packaged SmolLM2 Q4_1, verdict mode, 8 then 16 clients
    python benchmarks/serve_load.py --model judge.gguf --mode rationale --requests 40 --clients 4

The server is started here as a subprocess (`python -m conj_lite.cli serve`) on a free
loopback port and stopped at the end; each --clients count (one run after the other, on
the same server) stops by itself after --requests requests or --max-seconds, whichever
comes first (requests not sent by then are counted as unsent).
Pairs cycle through --data (default: LLMBar Natural next to the repo, else
data/sample_prefs.jsonl). Results go to docs/benchmarks/serve_load.json and to the
"Judge service under load" section of docs/benchmarks.md (replaced on each run).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

TITLE = "Judge service under load (benchmarks/serve_load.py)"
from conj_lite.judging.serve import wait_until_up  # noqa: E402
from conj_lite.system import usable_cpus  # noqa: E402
from report import write_section  # noqa: E402

LLMBAR = REPO.parent / "shared" / "data" / "llmbar" / "Dataset" / "LLMBar" / "Natural" / "dataset.json"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_model() -> Path:
    from conj_lite.packaged import BASE_GGUF, packaged_model_path

    return packaged_model_path("smollm2-135m") / BASE_GGUF


def load_pairs(path: Path, limit: int) -> list[dict]:
    from conj_lite.data import load_pairs as load

    pairs = load(path).pairs[:limit]
    return [{"question": p.question, "answer_a": p.answer_a, "answer_b": p.answer_b, "id": p.id} for p in pairs]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


async def load(base: str, pairs: list[dict], clients: int, requests: int, mode: str, deadline: float) -> dict:
    import httpx

    latencies, errors, statuses, unsent = [], [], {}, []
    counter = iter(range(requests))

    async def client(http):
        for i in counter:
            if time.perf_counter() > deadline:
                unsent.append(i)  # the time bound, not a failure of the server
                continue
            start = time.perf_counter()
            try:
                reply = await http.post("/v1/judge", json={**pairs[i % len(pairs)], "mode": mode, "rationales": False})
                statuses[reply.status_code] = statuses.get(reply.status_code, 0) + 1
                if reply.status_code != 200:
                    errors.append(f"{reply.status_code}: {reply.text[:200]}")
                    continue
            except httpx.HTTPError as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                continue
            latencies.append(time.perf_counter() - start)

    timeout = httpx.Timeout(max(1.0, deadline - time.perf_counter()))
    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=base, timeout=timeout, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        wall = time.perf_counter() - start
    ok = len(latencies)
    return {
        "requests": requests, "sent": requests - len(unsent), "ok": ok, "errors": len(errors),
        "unsent": len(unsent), "error_samples": errors[:5], "statuses": statuses,
        "wall_s": round(wall, 2), "requests_per_s": round(ok / wall, 3) if wall else None,
        "pairs_per_min": round(60 * ok / wall, 1) if wall else None,
        "latency_p50_s": round(percentile(latencies, 0.5), 3), "latency_p95_s": round(percentile(latencies, 0.95), 3),
        "latency_mean_s": round(statistics.fmean(latencies), 3) if latencies else None,
        "latency_max_s": round(max(latencies), 3) if latencies else None,
    }


def start_server(model: Path, port: int, args, log_path: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "conj_lite.cli", "serve", "--model", str(model), "--host", "127.0.0.1",
           "--port", str(port), "--mode", args.mode, "--parallel", str(args.parallel),
           "--max-batch", str(args.max_batch), "--max-new-tokens", str(args.max_new_tokens), "--log-level", "warning"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.ctx:
        cmd += ["--ctx", str(args.ctx)]
    log = open(log_path, "w")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)


def seconds(value) -> str:
    """A latency for the table; none when no request of the run succeeded."""
    return "n/a" if value is None or value != value else f"{value:.2f} s"


def markdown(report: dict) -> str:
    m = report["machine"]
    results = report.get("results") or [{**report["result"], "clients": report["clients"]}]  # older reports: one
    unsent = sum(r["unsent"] for r in results)
    return "\n".join([
        f"Run {report['date']}: `{report['command']}`. Server: `conj-lite serve` on 127.0.0.1 "
        f"({report['mode']} mode, --parallel {report['parallel']} pairs per llama.cpp batch, --max-batch "
        f"{report['max_batch']}, {report['threads']} threads) with {report['model']}; concurrent clients (httpx, one "
        f"pair per request, pairs cycling through {report['pairs']} {report['data']} pairs) in the "
        f"same machine: {m['cores']} cores visible, load average {m['load_before']} before, {m['load_after']} after"
        + (" (**taken under contention**: other work shared the CPUs, so the times are longer than on an idle "
           "machine)" if m["contended"] else "") + ".",
        "",
        "| clients | requests sent | ok | errors | wall | requests/s | pairs/min | p50 latency | p95 latency | max latency |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *(f"| {r['clients']} | {r['sent']} of {r['requests']} | {r['ok']} | {r['errors']} | {r['wall_s']:.1f} s | "
          f"{r['requests_per_s']:.2f} | {r['pairs_per_min']:.1f} | {seconds(r['latency_p50_s'])} | "
          f"{seconds(r['latency_p95_s'])} | {seconds(r['latency_max_s'])} |" for r in results),
        "",
        (f"The runs hit their time bound (--max-seconds): {unsent} requests were not sent. " if unsent else "")
        + "One worker owns the model and takes every queued request (up to --max-batch pairs) into one "
        "`Judge.compare_many`: in rationale mode both orders of those pairs decode together in one llama.cpp batch; "
        "in verdict mode (prompts only, compute-bound on a CPU) the prompts go one at a time, each reusing the KV "
        "cache of the prefix it shares with the one before, which benchmarks/kv_layout.py measures as faster. "
        "Latency is about the time of one batch plus the queue ahead of it. Raw figures: "
        "[docs/benchmarks/serve_load.json](benchmarks/serve_load.json).",
        "",
    ])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a GGUF judge (default: the packaged SmolLM2-135M-Instruct Q4_1)")
    parser.add_argument("--data", help="pairs to send (default: LLMBar Natural, else data/sample_prefs.jsonl)")
    parser.add_argument("--pairs", type=int, default=40, help="distinct pairs to cycle through (default 40)")
    parser.add_argument("--clients", default="8,16", help="concurrent clients, a run for each (default 8,16)")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--mode", default="verdict", choices=("verdict", "rationale"))
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--threads", type=int, help="server threads (default: the CPUs this process may use)")
    parser.add_argument("--ctx", type=int)
    parser.add_argument("--max-seconds", type=float, default=1200, help="stop sending after this long")
    parser.add_argument("--no-docs", action="store_true", help="print only; leave docs/ alone")
    parser.add_argument("--render", metavar="JSON", help="only rewrite the docs section from a saved report")
    args = parser.parse_args(argv)
    if args.render:
        report = json.loads(Path(args.render).read_text())
        print(f"wrote {write_section(TITLE, markdown(report), report, 'serve_load.json')}")
        return 0
    if args.threads is None:
        args.threads = usable_cpus()
    clients_list = [int(c) for c in str(args.clients).split(",") if c.strip()]

    model = Path(args.model) if args.model else default_model()
    data = Path(args.data) if args.data else (LLMBAR if LLMBAR.is_file() else REPO / "data" / "sample_prefs.jsonl")
    pairs = load_pairs(data, args.pairs)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = Path(tempfile.mkdtemp(prefix="conj-lite-serve-load-")) / "server.log"
    load_before = os.getloadavg()[0]
    proc = start_server(model, port, args, log_path)
    try:
        wait_until_up(base, proc, log_path=log_path)
        import httpx

        httpx.post(base + "/v1/judge", json={**pairs[0], "mode": args.mode}, timeout=600)  # warm-up
        results = []
        for clients in clients_list:
            deadline = time.perf_counter() + args.max_seconds
            result = asyncio.run(load(base, pairs, clients, args.requests, args.mode, deadline))
            results.append({"clients": clients, **result})
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    load_after = os.getloadavg()[0]
    cores = usable_cpus()
    report = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python benchmarks/serve_load.py" + ("" if argv is None and len(sys.argv) == 1
                                                         else " " + " ".join(argv if argv is not None else sys.argv[1:])),
        "model": model.name if args.model else "the packaged SmolLM2-135M-Instruct Q4_1 (base.gguf)",
        "data": data.parent.name if data.name == "dataset.json" else data.name, "pairs": len(pairs),
        "mode": args.mode, "parallel": args.parallel, "max_batch": args.max_batch, "threads": args.threads,
        "max_new_tokens": args.max_new_tokens,
        "machine": {"cores": cores, "load_before": round(load_before, 2), "load_after": round(load_after, 2),
                    # other work already running at the start; the load after includes this
                    # benchmark's own server and clients, so it says nothing about others
                    "contended": load_before > cores},
        "results": results,
    }
    print(json.dumps(report, indent=2))
    if not args.no_docs:
        write_section(TITLE, markdown(report), report, "serve_load.json")
    return 0 if all(r["errors"] == 0 for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
