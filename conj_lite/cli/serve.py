"""`conj-lite serve`: the judge as a local HTTP service (see conj_lite.judging.serve)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..artifacts import GGUF_CHAT_DATE_KEY, GGUF_TEMPLATE_KEY, resolve_template
from ..errors import InputError
from ..judging import selective
from ..judging.backends import BACKENDS
from ..judging.judge import open_judge
from ..judging.serve import (
    API_KEY_ENV,
    DEFAULT_HOST,
    DEFAULT_PORT,
    MAX_BATCH,
    MAX_BODY_BYTES,
    MAX_CONNECTIONS,
    MAX_PAIRS,
    MIN_API_KEY,
    READ_TIMEOUT,
    SHUTDOWN_GRACE,
    JudgeService,
    check_api_key,
    check_bind,
    create_app,
    model_card,
    serve,
)
from ..progress import get_console
from .options import add_risk_args, add_runtime_args, runtime_options


def add_command(subparsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve a judge over HTTP: POST /v1/judge, POST /v1/chat/completions, GET /health, GET /v1/models",
        description="Run the judge as a local HTTP service. POST /v1/judge takes one pair "
        "({question, answer_a, answer_b}) or {pairs: [...]} and answers the verdict, P(A better) and both "
        "orders' verdicts (and rationales); with --risk/--calibration also the selective verdict (A, B or "
        f"abstain). POST /v1/chat/completions answers OpenAI clients: the judge prompt as the last user "
        f"message, or the pair in the extension field \"judge\". Binds {DEFAULT_HOST} unless --host is given, "
        f"which then needs an API key (${API_KEY_ENV}).",
    )
    p.add_argument("--model", required=True, help="a .gguf file, or a transformers model / LoRA adapter directory")
    p.add_argument("--backend", default="auto", choices=("auto", *BACKENDS),
                   help="auto: gguf for a file, hf for a directory")
    p.add_argument("--adapter", help="hf backend: a LoRA adapter to put on --model (the base)")
    p.add_argument("--base", help="hf backend: the base model of an adapter given as --model")
    p.add_argument("--host", default=DEFAULT_HOST, help=f"address to bind (default {DEFAULT_HOST}; anything else "
                   "needs --api-key)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    p.add_argument("--api-key", default=None,
                   help=f"require this key (Authorization: Bearer KEY or X-API-Key) on /v1/*, at least {MIN_API_KEY} "
                   f"characters. Prefer setting ${API_KEY_ENV}: a flag's value shows in `ps` to every user of the "
                   "machine")
    p.add_argument("--lora", action="append", default=[], metavar="NAME=FILE",
                   help="gguf: a GGUF LoRA judge on the --model base (repeatable); requests pick one with "
                   "\"adapter\": NAME, default the first (which --calibration calibrates)")
    p.add_argument("--parallel", type=int, default=4,
                   help="gguf: pairs decoded together (both orders each) in one llama.cpp batch (default 4)")
    p.add_argument("--max-batch", type=int, default=MAX_BATCH,
                   help=f"pairs of queued requests the worker judges together (default {MAX_BATCH})")
    p.add_argument("--max-body-bytes", type=int, default=MAX_BODY_BYTES,
                   help=f"largest request body (default {MAX_BODY_BYTES})")
    p.add_argument("--max-pairs", type=int, default=MAX_PAIRS, help=f"most pairs per request (default {MAX_PAIRS})")
    p.add_argument("--read-timeout", type=float, default=READ_TIMEOUT,
                   help=f"seconds a request's headers and body may take to arrive (default {READ_TIMEOUT:g})")
    p.add_argument("--max-connections", type=int, default=MAX_CONNECTIONS,
                   help=f"open connections beyond which new requests get 503 (default {MAX_CONNECTIONS})")
    p.add_argument("--shutdown-grace", type=int, default=SHUTDOWN_GRACE,
                   help=f"seconds judgments in flight get to finish after SIGTERM (default {SHUTDOWN_GRACE})")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    add_runtime_args(p)
    add_risk_args(p)
    p.set_defaults(func=run, output=None)


def run(args) -> int:
    console = get_console()
    if args.api_key is not None:
        api_key, source = args.api_key, "--api-key"
    else:
        api_key, source = os.environ.get(API_KEY_ENV) or None, f"${API_KEY_ENV}"  # set but empty: unset
    check_api_key(api_key, source)
    check_bind(args.host, api_key)
    if not 0 <= args.port <= 65535:
        raise InputError(f"--port must be 0-65535, got {args.port}")
    if min(args.parallel, args.max_batch, args.max_pairs, args.max_body_bytes, args.max_connections) < 1:
        raise InputError("--parallel, --max-batch, --max-pairs, --max-body-bytes and --max-connections must be at "
                         "least 1")
    if args.read_timeout <= 0 or args.shutdown_grace < 0:
        raise InputError("--read-timeout must be above 0 and --shutdown-grace at least 0")
    selective.check_risk_args(args)  # bad options fail before a model loads
    loras = parse_loras(args.lora)
    judge = open_judge(args.model, backend=args.backend, adapter=args.adapter, base=args.base, warn=None,
                       n_parallel=args.parallel, **runtime_options(args))
    service = None
    try:
        if loras:
            load_adapters(judge, loras, template_given=args.template is not None)
        threshold = selective.threshold_from_args(args, judge, console)
        card = model_card(judge, args.model, threshold=threshold, calibration_source=args.calibration,
                          mode=args.mode)
        service = JudgeService(judge, threshold=threshold, threshold_mode=args.mode, card=card,
                               max_batch=args.max_batch, adapters=list(loras))
        app = create_app(service, api_key=api_key, max_body_bytes=args.max_body_bytes, max_pairs=args.max_pairs,
                         default_mode=args.mode, host=args.host)
        held = f" with LoRA judges {', '.join(loras)}" if loras else ""
        console.print(f"serve: {card['id']}{held} ({args.mode} mode) on http://{args.host}:{args.port}"
                      + (" (API key required)" if api_key else ""), highlight=False, markup=False)
        serve(app, args.host, args.port, log_level=args.log_level, read_timeout=args.read_timeout,
              max_connections=args.max_connections, shutdown_grace=args.shutdown_grace)
        return 0
    finally:
        # A worker still inside a batch keeps the model: the process exit frees it.
        if service is None or service.close():
            judge.close()


def parse_loras(values: list[str]) -> dict[str, str]:
    """{name: file} from --lora NAME=FILE values (a bare FILE is named by its stem)."""
    out: dict[str, str] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep:
            name, path = Path(value).stem, value
        if not name or not path:
            raise InputError(f"--lora {value!r}: use NAME=FILE.gguf")
        if name in out:
            raise InputError(f"--lora: the name {name!r} is given twice")
        if not Path(path).is_file():
            raise InputError(f"--lora {value}: no such file {path}")
        out[name] = path
    return out


def load_adapters(judge, loras: dict[str, str], *, template_given: bool) -> None:
    """Load the LoRA judges on the judge's base and make the first one active; unless
    --template was given, the judge template is the one the adapters record."""
    backend = judge.backend
    if not hasattr(backend, "add_adapter"):
        raise InputError("--lora needs a GGUF base (--model FILE.gguf)")
    templates, dates = {}, set()
    for name, path in loras.items():
        meta = backend.add_adapter(name, path)
        templates[name] = meta.get(GGUF_TEMPLATE_KEY)
        dates.add(meta.get(GGUF_CHAT_DATE_KEY) or backend.chat_date)
    if len(dates) > 1:
        raise InputError(f"the --lora judges were trained with different chat dates ({', '.join(sorted(dates))}); "
                         "serve them apart")
    backend.chat_date = dates.pop()
    if not template_given and any(templates.values()):
        if len(set(templates.values())) > 1:
            raise InputError("the --lora judges record different judge templates; serve them apart or give --template")
        judge.template = resolve_template(json.loads(next(iter(templates.values()))))
    backend.set_template(judge.template)  # the adapters' template and chat date
    backend.use_adapter(next(iter(loras)))
