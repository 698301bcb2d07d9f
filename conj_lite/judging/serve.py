"""The judge as a local HTTP service (`conj-lite serve`), on FastAPI/Starlette + uvicorn.

    conj-lite serve --model judge.gguf [--risk 0.1 --calibration cal.jsonl] [--port 8080]

    POST /v1/judge   {"question": ..., "answer_a": ..., "answer_b": ...[, "id": ...]}
                     or {"pairs": [{...}, ...]}; optional "mode", "rationales" (bool) and
                     "adapter" (which of the server's LoRA adapters judges)
                     -> {"model", "mode", "results": [one record per pair]}
    POST /v1/chat/completions   an OpenAI chat request whose last user message is the
                     judge's prompt, or that carries the pair in the extension field
                     "judge" -> a chat completion whose message is the judge's JSON
    GET  /health     -> {"status": "ok", "queued": pairs waiting}
    GET  /v1/models  -> the model card: template, format, calibration, training summary

A record holds the verdict (A, B or inconsistent), P(A better) `p_a`, both orders'
verdicts and P(answer 1), the rationales when asked for (rationale mode), and with a
calibration the selective verdict at the server's risk level (A, B or abstain; see
`selective`) for requests in the mode the server was calibrated in (its --mode; a
request in the other mode gets no selective fields: the threshold would not hold).

With --lora NAME=FILE (repeatable) the server holds several GGUF LoRA judges on one
base GGUF and each request picks one by name (default: the first); the worker switches
adapters between batches (llama_set_adapters_lora), never inside one.

One worker thread owns the judge: llama.cpp contexts are not thread-safe. Requests wait
in a queue; the worker takes what is waiting (up to `max_batch` pairs) into one
`Judge.compare_many`, so the pairs of concurrent requests decode together in one
llama.cpp batch. A request whose client has gone before the worker reaches it is
dropped; one that goes mid-judgment is finished and its result thrown away, so other
requests never see an error or a half-used context.

Errors: bad JSON, a missing, unknown or ill-typed field (a lone surrogate, an id that
is not a string or a finite number) -> 400 naming the field; a body over
`max_body_bytes`, more than `max_pairs` pairs, or a pair whose prompt and judgment do
not fit the model's context -> 413 naming the limit; a missing or wrong API key -> 401;
a body not sent as application/json -> 415. Without an API key only loopback Host
headers are served (DNS rebinding) and /v1/models names no paths.

Slow and gone clients: a request must arrive whole within `read_timeout` seconds
(`timed_protocol`); past `max_connections` open connections uvicorn answers 503; a client
that hangs up mid-body costs one log line; on SIGTERM, requests still arriving are closed
at once and judgments in flight get `shutdown_grace` seconds.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations
# (Request, imported inside create_app) at run time.
import asyncio
import hmac
import ipaddress
import json
import logging
import math
import queue
import re
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

from ..artifacts import GGUF_VERSION_KEY, TRAIN_META
from ..data import text_problem
from ..errors import InputError
from ..jsonio import json_error
from ..prompts import PLACEHOLDER
from .selective import ABSTAIN, mark_record
from .verdicts import MODES

API_KEY_ENV = "CONJ_LITE_API_KEY"
MIN_API_KEY = 16  # characters; `openssl rand -hex 16` gives 32
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
MAX_BODY_BYTES = 1 << 20  # 1 MiB
MAX_PAIRS = 64  # pairs per request
MAX_BATCH = 8  # pairs the worker judges together
MAX_CONNECTIONS = 64  # open connections before new requests get 503 (uvicorn's limit_concurrency)
READ_TIMEOUT = 10.0  # seconds for a request's headers and body to arrive
SHUTDOWN_GRACE = 8  # seconds in-flight judgments get after SIGTERM (uvicorn's timeout_graceful_shutdown): out within 10 s
PAIR_FIELDS = ("question", "answer_a", "answer_b")
PAIR_KEYS = (*PAIR_FIELDS, "id")
REQUEST_KEYS = ("mode", "rationales", "adapter")

log = logging.getLogger("uvicorn.error")  # uvicorn's own log: its handler and --log-level


class RequestError(Exception):
    """A request the service refuses: an HTTP status and a message."""

    def __init__(self, status: int, message: str, **extra):
        super().__init__(message)
        self.status, self.message, self.extra = status, message, extra


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, api_key: str | None) -> None:
    """Anything but a loopback address needs an API key."""
    if not is_loopback(host) and not api_key:
        raise InputError(f"--host {host} would expose the judge beyond this machine; give an API key "
                         f"(${API_KEY_ENV}, or --api-key) to bind anything but 127.0.0.1")


def check_api_key(api_key: str | None, source: str = "the API key") -> None:
    """A key given at all must be one that guessing cannot find: MIN_API_KEY characters or
    more, no spaces (a blank or one-character key is a mistake, not a key)."""
    if api_key is None:
        return
    if len(api_key) < MIN_API_KEY or api_key != api_key.strip() or any(c.isspace() for c in api_key):
        raise InputError(f"{source} must be at least {MIN_API_KEY} characters without spaces (got "
                         f"{len(api_key)}); make one with `openssl rand -hex 16`")


# ---------------------------------------------------------------- requests


@dataclass
class JudgeRequest:
    pairs: list[tuple[str, str, str]]
    ids: list
    mode: str
    rationales: bool
    adapter: str | None = None


def load_body(body: bytes) -> dict:
    """A request body's JSON object; RequestError(400) when it is none."""
    try:
        data = json.loads(body)
    except json.JSONDecodeError as exc:
        raise RequestError(400, f"the body is not valid JSON: {json_error(exc)} of line {exc.lineno}") from None
    except RecursionError:  # json's parser recurses once per nesting level
        raise RequestError(400, "the body is not valid JSON for this service: nested too deeply") from None
    except ValueError as exc:  # not UTF-8; an integer of more than 4300 digits
        raise RequestError(400, f"the body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise RequestError(400, "the body must be a JSON object with question/answer_a/answer_b or pairs")
    return data


def check_keys(item: dict, known: tuple[str, ...], prefix: str, hint: str = "") -> None:
    """RequestError(400) for the first key of `item` not in `known`: a misplaced field
    (a pair's own "mode") is refused, not silently ignored."""
    unknown = [key for key in item if key not in known]
    if unknown:
        name = f"{prefix}{unknown[0]}"
        raise RequestError(400, f"unknown field {ascii(name)}; known here: {', '.join(known)}{hint}",
                           field=name if text_problem(name, answer=True) is None else ascii(name))


def check_id(value, name: str):
    """A pair's id as it will be echoed: a string, a finite number or null. Checked before
    judging, so a reply never fails to encode after the work is done."""
    if value is None or (isinstance(value, str) and text_problem(value, answer=True) is None):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return value
    raise RequestError(400, f"field '{name}' must be a string (of characters, no lone surrogate) or a finite "
                            "number", field=name)


def parse_pair(item, prefix: str) -> tuple[str, str, str]:
    """(question, answer_a, answer_b) of one pair object; RequestError(400) naming the field."""
    if not isinstance(item, dict):
        raise RequestError(400, f"'{prefix.rstrip('.')}' must be an object", field=prefix.rstrip("."))
    values = []
    for name in PAIR_FIELDS:
        if name not in item:
            raise RequestError(400, f"missing field '{prefix}{name}'", field=prefix + name)
        if not isinstance(item[name], str):
            raise RequestError(400, f"field '{prefix}{name}' must be a string", field=prefix + name)
        problem = text_problem(item[name], answer=name != "question")
        if problem:
            raise RequestError(400, f"field '{prefix}{name}' {problem}", field=prefix + name)
        values.append(item[name])
    return tuple(values)


def parse_request(body: bytes, default_mode: str, max_pairs: int = MAX_PAIRS) -> JudgeRequest:
    """A JudgeRequest from a request body; RequestError(400/413) naming what is wrong."""
    data = load_body(body)
    if "pairs" in data:
        check_keys(data, ("pairs", *REQUEST_KEYS), "")
    else:
        check_keys(data, (*PAIR_KEYS, *REQUEST_KEYS), "", "; several pairs go in 'pairs'")
    mode = data.get("mode", default_mode)
    if mode not in MODES:
        raise RequestError(400, f"field 'mode' must be one of {list(MODES)}, got {mode!r}", field="mode")
    rationales = data.get("rationales", True)
    if not isinstance(rationales, bool):
        raise RequestError(400, "field 'rationales' must be true or false", field="rationales")
    adapter = data.get("adapter")
    if adapter is not None and not isinstance(adapter, str):
        raise RequestError(400, "field 'adapter' must be the name of one of the server's adapters", field="adapter")
    if "pairs" in data:
        items, where = data["pairs"], "pairs[{}]."
        if not isinstance(items, list) or not items:
            raise RequestError(400, "field 'pairs' must be a non-empty list of pairs", field="pairs")
        if len(items) > max_pairs:
            raise RequestError(413, f"{len(items)} pairs in one request; the limit is {max_pairs}",
                               field="pairs", limit=max_pairs)
    else:
        items, where = [data], ""
    pairs, ids = [], []
    for n, item in enumerate(items):
        prefix = where.format(n)
        pairs.append(parse_pair(item, prefix))
        if where:
            check_keys(item, PAIR_KEYS, prefix, "; mode, rationales and adapter go at the top level")
        ids.append(check_id(item.get("id", n if where else None), prefix + "id"))
    return JudgeRequest(pairs, ids, mode, rationales, adapter)


# ---------------------------------------------------------------- the worker


@dataclass
class _Job:
    request: JudgeRequest
    future: Future = field(default_factory=Future)


class JudgeService:
    """A judge behind a queue: one worker thread runs every judgment (see module doc)."""

    def __init__(self, judge, *, threshold=None, threshold_mode: str | None = None, card: dict | None = None,
                 max_batch: int = MAX_BATCH, adapters: list[str] | None = None):
        self.judge, self.threshold = judge, threshold
        # LoRA adapters loaded on the judge's backend (add_adapter); the first is the
        # default and the one the calibration was made with.
        self.adapters = list(adapters or [])
        self.threshold_mode = threshold_mode or judge.mode
        self.card = card or {}
        self.max_batch = max(1, max_batch)
        self.judged = 0
        self._queue: queue.Queue = queue.Queue()
        self._waiting = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._work, name="conj-lite-judge", daemon=True)
        self._thread.start()

    @property
    def queued(self) -> int:
        return self._waiting

    def submit(self, request: JudgeRequest) -> Future:
        """The future of a request's records (list of dicts), or of a RequestError."""
        if request.adapter is None and self.adapters:
            request.adapter = self.adapters[0]
        elif request.adapter is not None and request.adapter not in self.adapters:
            known = ", ".join(self.adapters) or "none (this server runs one judge)"
            raise RequestError(400, f"field 'adapter': unknown adapter {request.adapter!r}; known: {known}",
                               field="adapter")
        job = _Job(request)
        with self._lock:
            self._waiting += len(request.pairs)
        self._queue.put(job)
        return job.future

    def close(self, timeout: float = 30.0) -> bool:
        """Stop the worker after the batch it is on; False when it is still busy after
        `timeout` seconds (then the judge must not be closed under it)."""
        self._queue.put(None)
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # -- the worker thread

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            jobs, size, stop = [job], len(job.request.pairs), False
            while size < self.max_batch:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                jobs.append(more)
                size += len(more.request.pairs)
            with self._lock:
                self._waiting -= size
            live = [j for j in jobs if j.future.set_running_or_notify_cancel()]  # the gone are dropped
            for adapter in dict.fromkeys(j.request.adapter for j in live):
                try:
                    if self.adapters:
                        self.judge.backend.use_adapter(adapter)
                except Exception as exc:
                    for j in live:
                        if j.request.adapter == adapter:
                            j.future.set_exception(exc)
                    continue
                for mode in MODES:
                    self._run([j for j in live if j.request.mode == mode and j.request.adapter == adapter], mode)
            if stop:
                return

    def _run(self, jobs: list[_Job], mode: str) -> None:
        ready = []
        for job in jobs:
            try:
                for n, pair in enumerate(job.request.pairs):
                    self._check_fits(pair, mode, n if len(job.request.pairs) > 1 else None)
                ready.append(job)
            except RequestError as exc:
                job.future.set_exception(exc)
            except Exception as exc:  # never let one request stop the worker
                job.future.set_exception(exc)
        if not ready:
            return
        pairs = [pair for job in ready for pair in job.request.pairs]
        try:
            results = self.judge.compare_many(pairs, mode=mode)
        except Exception as exc:
            if len(ready) == 1:
                ready[0].future.set_exception(RequestError(413, str(exc)) if isinstance(exc, InputError) else exc)
            else:  # judge them apart, so one bad request does not fail the others
                for job in ready:
                    self._run([job], mode)
            return
        self.judged += len(pairs)  # before any reply leaves: /health after a reply counts it
        start = 0
        for job in ready:
            n = len(job.request.pairs)
            job.future.set_result(self._records(job.request, results[start:start + n], mode))
            start += n

    def _check_fits(self, pair: tuple[str, str, str], mode: str, index: int | None) -> None:
        need, n_ctx = self.judge.tokens_needed(*pair, mode=mode)
        if need > n_ctx:
            where = "the pair" if index is None else f"pairs[{index}]"
            raise RequestError(413, f"{where} needs {need} tokens (prompt in the longer order + the judgment) but "
                                    f"the context holds {n_ctx}", limit=n_ctx, tokens=need)

    def _records(self, request: JudgeRequest, results, mode: str) -> list[dict]:
        out = []
        for pair_id, result in zip(request.ids, results):
            record = result.to_record()
            if not request.rationales or mode == "verdict":
                record.pop("rationale_ab", None)
                record.pop("rationale_ba", None)
            calibrated = mode == self.threshold_mode and (not self.adapters or request.adapter == self.adapters[0])
            if self.threshold is not None and calibrated:
                record = mark_record(record, self.threshold)
            if request.adapter is not None:
                record["adapter"] = request.adapter
            out.append({"id": pair_id, **record} if pair_id is not None else record)
        return out


# ---------------------------------------------------------------- the model card


def model_card(judge, path, *, threshold=None, calibration_source=None, mode: str = "rationale") -> dict:
    """What `GET /v1/models` says about the judge being served."""
    path = Path(path)
    backend = judge.backend
    meta = getattr(backend, "meta", {}) or {}
    fmt = {"backend": getattr(backend, "name", "?"), "context": backend.n_ctx}
    if meta:
        fmt.update(architecture=meta.get("general.architecture"), file_type=_file_type(meta.get("general.file_type")))
    if path.is_file():
        fmt["size_bytes"] = path.stat().st_size
    template = judge.template
    card = {
        "id": path.stem if path.suffix else path.name,
        "object": "model",
        "owned_by": "conj-lite",
        "path": str(path),
        "format": fmt,
        "template": {"name": template.name, "rationale_key": template.rationale_key,
                     "verdict_key": template.verdict_key},
        "mode": mode,
        "max_new_tokens": judge.max_new_tokens,
        "parallel_pairs": getattr(backend, "n_parallel", 1),
        "exported_by": meta.get(GGUF_VERSION_KEY),
        "calibration": None,
        "training": _training_summary(path),
    }
    if threshold is not None:
        card["calibration"] = {"source": str(calibration_source) if calibration_source else None,
                               "mode": mode, **threshold.to_dict()}
    return card


def _file_type(value) -> str | None:
    if value is None:
        return None
    try:
        import gguf

        return gguf.LlamaFileType(int(value)).name.removeprefix("MOSTLY_")
    except (ImportError, ValueError):
        return str(value)


def _training_summary(path: Path) -> dict | None:
    """The training summary of the run a GGUF was exported from (RUN/gguf/x.gguf ->
    RUN/adapter/conj_lite_train.json), when it is there."""
    for candidate in (path.parent.parent / "adapter" / TRAIN_META, path.parent / TRAIN_META, path / TRAIN_META):
        if candidate.is_file():
            try:
                meta = json.loads(candidate.read_text(encoding="utf-8"))
            except ValueError:
                return None
            keep = ("base_model", "template", "objective", "load_in_4bit", "summary", "round")
            return {k: meta[k] for k in keep if k in meta}
    return None


# ---------------------------------------------------------------- OpenAI-compatible chat


CHAT_EXTENSION = "judge"  # the extension field of a chat request: {"question", "answer_a", "answer_b"[, "mode"]}


def judge_prompt_pattern(template) -> re.Pattern:
    """The template's user prompt as a pattern whose groups are what was filled into
    {question}, {answer_1} and {answer_2}."""
    parts, seen, out = PLACEHOLDER.split(template.user.strip()), set(), []
    for n, part in enumerate(parts):
        if n % 2 == 0:
            out.append(re.escape(part))
        else:
            out.append(f"(?P={part})" if part in seen else f"(?P<{part}>.*?)")
            seen.add(part)
    return re.compile("".join(out), re.S)


def _message_text(message, where: str) -> str:
    """The text of a chat message: a string, or the text parts of a list of parts."""
    if not isinstance(message, dict) or "content" not in message:
        raise RequestError(400, f"'{where}' must be an object with role and content", field=where)
    content = message["content"]
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        content = "".join(str(p.get("text", "")) for p in content)
    if not isinstance(content, str):
        raise RequestError(400, f"field '{where}.content' must be text (or text parts)", field=f"{where}.content")
    return content


def parse_chat_request(body: bytes, template, default_mode: str) -> tuple[JudgeRequest, str | None]:
    """(the JudgeRequest, the model asked for) from a `POST /v1/chat/completions` body. The
    pair comes from the extension field "judge" ({question, answer_a, answer_b}, optional
    mode), else from the last user message, which must be this judge's own prompt (its
    template's user text filled in; answer 1 is A). Other OpenAI fields (temperature,
    max_tokens, ...) are ignored: the judgment is greedy and held to the judge's frame."""
    data = load_body(body)
    if data.get("stream"):
        raise RequestError(400, "field 'stream': streaming is not supported; ask with stream false (the "
                                "judgment comes whole)", field="stream")
    model = data.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError(400, "field 'model' must be a string", field="model")
    mode = default_mode
    if data.get(CHAT_EXTENSION) is not None:
        extension = data[CHAT_EXTENSION]
        if not isinstance(extension, dict):
            raise RequestError(400, f"field '{CHAT_EXTENSION}' must be an object with question, answer_a, answer_b",
                               field=CHAT_EXTENSION)
        check_keys(extension, (*PAIR_FIELDS, "mode"), f"{CHAT_EXTENSION}.")
        pair = parse_pair(extension, f"{CHAT_EXTENSION}.")
        mode = extension.get("mode", default_mode)
        if mode not in MODES:
            raise RequestError(400, f"field '{CHAT_EXTENSION}.mode' must be one of {list(MODES)}, got {mode!r}",
                               field=f"{CHAT_EXTENSION}.mode")
        return JudgeRequest([pair], [None], mode, True), model
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "field 'messages' must be a non-empty list of chat messages", field="messages")
    users = [n for n, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "user"]
    if not users:
        raise RequestError(400, "field 'messages' holds no user message", field="messages")
    where = f"messages[{users[-1]}]"
    match = judge_prompt_pattern(template).fullmatch(_message_text(messages[users[-1]], where).strip())
    if match is None:
        raise RequestError(400, f"'{where}.content' is not this judge's prompt (template {template.name!r}, "
                                "GET /v1/models); send the pair as \"judge\": {\"question\": ..., \"answer_a\": ..., "
                                "\"answer_b\": ...}", field=f"{where}.content")
    item = {"question": match["question"], "answer_a": match["answer_1"], "answer_b": match["answer_2"]}
    return JudgeRequest([parse_pair(item, f"{where}.content: ")], [None], mode, True), model


def chat_completion(record: dict, template, model: str | None) -> dict:
    """An OpenAI chat completion whose assistant message is the judge's JSON: the record
    of /v1/judge plus the judgment in the template's own keys (rationale of order ab,
    better answer 1 = A, 2 = B), so a client that parses the judge's format reads it."""
    verdict = record["verdict"]
    slot = 1 if verdict == "A" else 2 if verdict == "B" else (1 if record["p_a"] >= 0.5 else 2)
    judgment = {template.rationale_key: record["rationale_ab"]} if record.get("rationale_ab") is not None else {}
    content = {**judgment, template.verdict_key: slot, **record}
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": json.dumps(content, ensure_ascii=False)},
                     "finish_reason": "stop", "logprobs": None}],
    }


# ---------------------------------------------------------------- the app


def without_paths(value):
    """A model card with this machine's absolute paths cut to their last part (what a
    keyless server may tell any caller)."""
    if isinstance(value, dict):
        return {k: without_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [without_paths(v) for v in value]
    if isinstance(value, str) and (value.startswith(("/", "~")) or (len(value) > 2 and value[1:3] in (":\\", ":/"))):
        return re.split(r"[\\/]", value.rstrip("\\/"))[-1]
    return value


def create_app(service: JudgeService, *, api_key: str | None = None, max_body_bytes: int = MAX_BODY_BYTES,
               max_pairs: int = MAX_PAIRS, default_mode: str | None = None, poll_s: float = 0.25,
               host: str = DEFAULT_HOST):
    """The FastAPI app over a JudgeService.

    Without an API key the service trusts whoever reaches it, so only what a program on
    this machine sends: a loopback Host header (a web page on a rebinding DNS name sends
    its own), application/json bodies (a cross-site page can send text/plain without
    asking), no CORS headers, and no file paths in /v1/models."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from starlette.middleware.trustedhost import TrustedHostMiddleware
    from starlette.requests import ClientDisconnect

    default_mode = default_mode or service.judge.mode
    app = FastAPI(title="conj-lite judge", version="1", docs_url=None, redoc_url=None, openapi_url=None)

    def refuse(exc: RequestError) -> JSONResponse:
        return JSONResponse({"error": {"status": exc.status, "message": exc.message, **exc.extra}},
                            status_code=exc.status)

    def authorized(request: Request) -> bool:
        if not api_key:
            return True
        given = request.headers.get("x-api-key")
        auth = request.headers.get("authorization", "")
        if given is None and auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        return given is not None and hmac.compare_digest(given.encode(), api_key.encode())

    @app.middleware("http")
    async def check_request(request: Request, call_next):
        if request.url.path != "/health" and not authorized(request):
            return refuse(RequestError(401, "missing or wrong API key (Authorization: Bearer KEY or X-API-Key)"))
        kind = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        if request.method == "POST" and kind != "application/json":
            return refuse(RequestError(415, f"send the body as Content-Type: application/json (got {kind or 'none'!r})"))
        return await call_next(request)

    if not api_key:  # added last, so it runs first
        hosts = {"localhost", "127.0.0.1", "[::1]", f"[{host}]" if ":" in host else host}
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=sorted(hosts), www_redirect=False)

    async def judged(request: Request, parse):
        """(the request, its records) or the error response: read, parse, queue, wait."""
        try:
            body = await read_body(request, max_body_bytes)
            parsed = parse(body)
            future = service.submit(parsed)
        except RequestError as exc:
            return None, refuse(exc)
        except ClientDisconnect:  # the client hung up mid-body: one line, no traceback
            log.info("%s hung up before its request body arrived", _client(request))
            return None, JSONResponse({"error": {"status": 499, "message": "client closed the request"}},
                                      status_code=499)
        waiting = asyncio.wrap_future(future)
        while True:
            done, _ = await asyncio.wait({waiting}, timeout=poll_s)
            if done:
                break
            if await request.is_disconnected():
                future.cancel()  # dropped if the worker has not reached it; else finished and thrown away
                return None, JSONResponse({"error": {"status": 499, "message": "client closed the request"}},
                                          status_code=499)
        try:
            return parsed, waiting.result()
        except RequestError as exc:
            return None, refuse(exc)
        except asyncio.CancelledError:
            return None, JSONResponse({"error": {"status": 499, "message": "client closed the request"}},
                                      status_code=499)
        except Exception as exc:
            return None, JSONResponse({"error": {"status": 500, "message": f"{type(exc).__name__}: {exc}"}},
                                      status_code=500)

    @app.get("/health")
    async def health():
        return {"status": "ok", "queued": service.queued, "judged": service.judged}

    @app.get("/v1/models")
    async def models():
        if not service.adapters:
            cards = [service.card]
        else:
            backend = service.judge.backend
            cards = []
            for n, name in enumerate(service.adapters):
                card = {**service.card, "id": name, "lora": str(backend.adapters[name][1]),
                        "base": service.card["path"], "default": n == 0}
                if n:  # the calibration was made with the default adapter
                    card["calibration"] = None
                cards.append(card)
        return {"object": "list", "data": cards if api_key else without_paths(cards)}

    @app.post("/v1/judge")
    async def judge(request: Request):
        start = time.perf_counter()
        parsed, records = await judged(request, lambda body: parse_request(body, default_mode, max_pairs))
        if parsed is None:
            return records
        return {"model": service.card.get("id"), "mode": parsed.mode, "seconds": round(time.perf_counter() - start, 4),
                "results": records}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        asked = {}

        def parse(body):
            parsed, asked["model"] = parse_chat_request(body, service.judge.template, default_mode)
            if asked["model"] in service.adapters:  # a LoRA judge named as the model
                parsed.adapter = asked["model"]
            return parsed

        parsed, records = await judged(request, parse)
        if parsed is None:
            return records
        return chat_completion(records[0], service.judge.template, parsed.adapter or service.card.get("id"))

    return app


def _client(request) -> str:
    client = request.client
    return f"{client.host}:{client.port}" if client else "a client"


async def read_body(request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"request body of {declared} bytes; the limit is {limit}", limit=limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"request body over {limit} bytes; the limit is {limit}", limit=limit)
        chunks.append(chunk)
    return b"".join(chunks)


def timed_protocol(read_timeout: float):
    """uvicorn's h11 protocol with a deadline for each request to arrive whole (headers
    and body), and a shutdown that does not wait for one still arriving. uvicorn closes
    idle keep-alive connections (timeout_keep_alive) but has no setting for a client
    that sends a byte now and then, which would hold its connection, and a SIGTERM,
    forever. Closing such a connection loses nothing: no work has started for it."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class TimedH11Protocol(H11Protocol):
        _deadline = None

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self._deadline is None and self.conn.their_state is h11.IDLE:
                self._arm()  # the first bytes of the next request on a kept-alive connection
            super().data_received(data)
            if self.conn.their_state not in (h11.IDLE, h11.SEND_BODY):
                self._disarm()  # the request is in

        def connection_lost(self, exc):
            self._disarm()
            super().connection_lost(exc)

        def shutdown(self):
            if self.conn.their_state is h11.SEND_BODY:
                self.transport.close()  # a body still arriving: its handler sees a disconnect
            else:
                super().shutdown()

        def _arm(self):
            self._disarm()
            self._deadline = self.loop.call_later(read_timeout, self._expired)

        def _disarm(self):
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expired(self):
            self._deadline = None
            if self.conn.their_state in (h11.IDLE, h11.SEND_BODY) and not self.transport.is_closing():
                client = "%s:%d" % self.client if self.client else "a client"
                self.logger.info("closed the connection of %s: its request did not arrive within %g s",
                                 client, read_timeout)
                self.transport.close()

    return TimedH11Protocol


def serve(app, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, *, log_level: str = "info",
          read_timeout: float = READ_TIMEOUT, max_connections: int = MAX_CONNECTIONS,
          shutdown_grace: int = SHUTDOWN_GRACE) -> None:
    """Run the app with uvicorn until SIGINT/SIGTERM. A request must arrive within
    `read_timeout` s; past `max_connections` open connections new requests get 503;
    on SIGTERM, requests still arriving are closed at once and judgments in flight get
    `shutdown_grace` s to finish."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False,
                http=timed_protocol(read_timeout), limit_concurrency=max_connections,
                timeout_graceful_shutdown=shutdown_grace)


def wait_until_up(base_url: str, proc=None, *, timeout: float = 300.0, log_path: Path | None = None) -> None:
    """Wait for a starting server's GET /health to answer 200 (for scripts that start
    `conj-lite serve` as a subprocess `proc`). RuntimeError when the process exits first
    (with its log when `log_path` is given) or the time runs out."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            log = log_path.read_text("utf-8", errors="replace") if log_path and log_path.is_file() else ""
            raise RuntimeError(f"the server exited (code {proc.returncode})" + (f":\n{log}" if log else ""))
        try:
            if httpx.get(base_url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the server at {base_url} did not come up within {timeout:.0f} s")
        time.sleep(0.5)


__all__ = ["ABSTAIN", "JudgeService", "RequestError", "check_api_key", "check_bind", "create_app", "model_card",
           "parse_chat_request", "parse_request", "serve", "wait_until_up"]
