"""The local judge: a question and two answers in, a verdict out, on a CPU.

    judge = Judge.from_gguf("runs/tiny/gguf/judge-q4_k_m.gguf")
    result = judge.compare("What is 7 + 5?", "12", "13")
    result.verdict, result.p_a          # "A", 0.93

Every pair is judged in both orders (answer 1 = A, then answer 1 = B) with the prompt of
`conj_lite.prompts`, so judging sees exactly what training saw. Per order the judge
either writes a rationale and then its verdict (mode "rationale"), or the verdict is
read straight after the prompt (mode "verdict": much faster, no rationale).

P(A better) comes from the verdict token: at the position where the judgment's JSON
expects the verdict (`{"rationale": "...", "better_answer": ` in the template's own keys)
the model's probabilities of "1" and "2" are read and normalised over the two;
P(A) = mean(p(slot of A) in order ab, p(slot of A) in order ba). The verdict is A or B
when both orders agree, otherwise "inconsistent". On the GGUF path in rationale mode
they are read at the generation step that writes the digit (a judgment cut off at
max_new_tokens is first closed by a grammar); otherwise after prompt + reply up to the
verdict, tokenized afresh. Verdict mode uses an empty rationale: `{"rationale": "",
"better_answer": `.

Backends
  GGUF (default): llama-cpp-python. The prompt is rendered with the chat template
    stored in the GGUF (so the .gguf file alone is a judge) and generation is held to
    the judgment's JSON by a grammar, so a GGUF judgment is never unparseable.
    Quantized files are loaded without llama.cpp's repacked CPU weight buffers
    (`use_extra_bufts=False`): on CPUs with AMX those buffers segfault.
  transformers: a merged model directory, or base + LoRA adapter, for comparison; its
    free-form output is read with `parsing.parse_verdict`.

`judge_file` judges any data file `conj_lite.data` reads into a resumable JSONL.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import re
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

from .errors import InputError
from .prompts import ORDERS, JudgeTemplate, build_messages, ordered_answers, slot_to_label

MODES = ("rationale", "verdict")
BACKENDS = ("auto", "gguf", "hf")
DEFAULT_MAX_NEW_TOKENS = 256
DEFAULT_CTX = 4096
TRUNCATION_MARK = "\n[... truncated]"
MIN_ANSWER_TOKENS = 16
GGUF_TEMPLATE_KEY = "conj_lite.judge_template"  # written by conj_lite.export


# ---------------------------------------------------------------- pure core


def verdict_prefix(template: JudgeTemplate, rationale: str = "") -> str:
    """The judgment's JSON up to the verdict value, spaced like
    `prompts.judge_verdict_json`: `{"rationale": "...", "better_answer": `."""
    return (
        "{" + json.dumps(template.rationale_key, ensure_ascii=False) + ": "
        + json.dumps(rationale, ensure_ascii=False) + ", "
        + json.dumps(template.verdict_key, ensure_ascii=False) + ": "
    )


def _gbnf_literal(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
    return f'"{escaped}"'


def judgment_grammar(template: JudgeTemplate) -> str:
    """GBNF for exactly one judgment: {"<rationale_key>": "<JSON string>", "<verdict_key>": 1|2}."""
    key_r = json.dumps(template.rationale_key, ensure_ascii=False)
    key_v = json.dumps(template.verdict_key, ensure_ascii=False)
    head = "{" + key_r + ': "'
    middle = '", ' + key_v + ": "
    return (
        f"root ::= {_gbnf_literal(head)} char* {_gbnf_literal(middle)} [12] \"}}\"\n"
        'char ::= [^"\\\\\\x7F\\x00-\\x1F] | "\\\\" (["\\\\/bfnrt] | "u" [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F])\n'
    )


def closing_grammar(template: JudgeTemplate) -> str:
    """GBNF that closes a rationale string cut off at a clean point and gives the verdict."""
    middle = '", ' + json.dumps(template.verdict_key, ensure_ascii=False) + ": "
    return f"root ::= {_gbnf_literal(middle)} [12] \"}}\"\n"


def split_canonical_judgment(template: JudgeTemplate, text: str) -> tuple[str | None, int | None, str | None]:
    """(rationale, slot, prefix) of a reply in the canonical form, where prefix is the
    reply up to the verdict value. A reply cut off inside the rationale gives (partial
    rationale, None, the reply closed at the verdict position): the model's own text is
    kept, so the verdict is read right after what it wrote. Anything else: all None."""
    head = "{" + json.dumps(template.rationale_key, ensure_ascii=False) + ': "'
    marker = ", " + json.dumps(template.verdict_key, ensure_ascii=False) + ": "
    stripped = text.strip()
    if not stripped.startswith(head):
        return None, None, None
    try:
        value = json.loads(stripped)
    except ValueError:
        value = None
    if isinstance(value, dict) and value.get(template.verdict_key) in (1, 2) and isinstance(value.get(template.rationale_key), str):
        cut = stripped.rindex(marker) + len(marker)
        return value[template.rationale_key], value[template.verdict_key], stripped[:cut]
    # Cut off: keep the complete part of the rationale string (no half escape).
    match = re.match(r'(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})*', stripped[len(head):])
    partial = match.group(0)
    try:
        rationale = json.loads('"' + partial + '"')
    except ValueError:
        return None, None, None
    return rationale, None, head + partial + '"' + marker


def p_slot1(logit_1: float, logit_2: float) -> float:
    """P(answer 1 is better) from the two verdict logits (softmax over the two)."""
    diff = logit_2 - logit_1
    if diff > 60:
        return math.exp(-diff)
    return 1.0 / (1.0 + math.exp(diff))


def cap_lengths(len_a: int, len_b: int, room: int) -> tuple[int, int]:
    """Token budgets for two answers that must share `room` tokens: the shorter keeps
    all it can, the longer gets the rest (both get half when both are long)."""
    if len_a + len_b <= room:
        return len_a, len_b
    half = room // 2
    if len_a <= half:
        return len_a, room - len_a
    if len_b <= half:
        return room - len_b, len_b
    return half, room - half


# ---------------------------------------------------------------- results


class Generation(NamedTuple):
    text: str
    finished: bool  # ended by the model (EOS), not by max_new_tokens
    tokens: int
    p1: float | None  # P(answer 1 better) read at the verdict token while generating, if it was


@dataclass
class OrderJudgment:
    """The judgment of one answer order."""

    order: str  # "ab" or "ba"
    slot: int | None  # the better answer as shown (1 or 2); None when unreadable (HF only)
    p1: float  # P(answer 1 is better) from the verdict token
    rationale: str | None
    text: str | None  # the raw reply (rationale mode)
    finished: bool = True  # False: cut off at max_new_tokens; the verdict then comes from p1
    method: str = "verdict"  # grammar | verdict | a parse_verdict method | probability
    tokens: int = 0  # tokens generated (rationale mode)

    @property
    def label(self) -> str | None:
        """The verdict as a record label: "A" or "B"."""
        return slot_to_label(self.slot, self.order)

    @property
    def p_a(self) -> float:
        return self.p1 if self.order == "ab" else 1.0 - self.p1


@dataclass
class JudgeResult:
    verdict: str  # "A", "B" or "inconsistent" (the two orders disagree)
    p_a: float  # P(A better), averaged over both orders
    orders: dict[str, OrderJudgment]
    mode: str
    seconds: float = 0.0
    truncated: bool = False
    warnings: list[str] = field(default_factory=list)

    def to_record(self) -> dict:
        ab, ba = self.orders["ab"], self.orders["ba"]
        return {
            "verdict": self.verdict,
            "p_a": round(self.p_a, 6),
            "verdict_ab": ab.label,
            "verdict_ba": ba.label,
            "p1_ab": round(ab.p1, 6),
            "p1_ba": round(ba.p1, 6),
            "rationale_ab": ab.rationale,
            "rationale_ba": ba.rationale,
            "finished_ab": ab.finished,
            "finished_ba": ba.finished,
            "tokens_ab": ab.tokens,
            "tokens_ba": ba.tokens,
            "mode": self.mode,
            "truncated": self.truncated,
            "seconds": round(self.seconds, 4),
        }


def combine(ab: OrderJudgment, ba: OrderJudgment, mode: str) -> JudgeResult:
    labels = {ab.label, ba.label}
    verdict = labels.pop() if len(labels) == 1 and None not in labels else "inconsistent"
    return JudgeResult(verdict, (ab.p_a + ba.p_a) / 2, {"ab": ab, "ba": ba}, mode)


# ---------------------------------------------------------------- GGUF files


def read_gguf_metadata(path: str | Path) -> dict:
    """Check that `path` is a complete GGUF file and return its scalar/string metadata.

    Everything that would make llama.cpp fail (or worse) on a bad file is checked here
    first, in Python: the magic, the header, the tensor table, and that every tensor's
    data lies inside the file."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such GGUF file")
    if path.is_dir():
        raise InputError(f"{path}: is a directory; pass a .gguf file (or use --backend hf for a transformers model)")
    size = path.stat().st_size
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise InputError(f"{path}: not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    try:
        import gguf
    except ImportError:
        raise InputError('reading GGUF files needs the gguf package: pip install "conj-lite[export]"') from None
    try:
        reader = gguf.GGUFReader(str(path), "r")
    except Exception as exc:  # gguf raises ValueError, IndexError, struct errors... on broken files
        raise InputError(f"{path}: corrupt or truncated GGUF file ({type(exc).__name__}: {exc})") from None
    for tensor in reader.tensors:
        end = int(tensor.data_offset) + int(tensor.n_bytes)
        if end > size:
            raise InputError(f"{path}: truncated GGUF file: tensor {tensor.name} ends at byte {end}, the file has {size}")
    if not reader.tensors:
        raise InputError(f"{path}: the GGUF file holds no tensors (a vocabulary-only file?)")
    meta = {}
    for key, fld in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and key.rsplit(".", 1)[-1] in ("tokens", "scores", "token_type", "merges"):
            continue
        try:
            meta[key] = fld.contents()
        except Exception:
            continue
    if "general.architecture" not in meta:
        raise InputError(f"{path}: the GGUF file has no general.architecture; it is not a model")
    return meta


@contextmanager
def _model_params(use_extra_bufts: bool):
    """Load-time model parameters that `llama_cpp.Llama` does not expose.

    Llama() builds its llama_model_params from llama_model_default_params(); for the
    duration of the load, that function returns params with use_extra_bufts set."""
    import llama_cpp
    import llama_cpp.llama as llama_module

    fields = dict(llama_cpp.llama_model_params._fields_)
    if "use_extra_bufts" not in fields:
        if not use_extra_bufts:
            raise InputError(
                f"llama-cpp-python {llama_cpp.__version__} has no use_extra_bufts model parameter; "
                "conj-lite needs >= 0.3.30 to load quantized files safely on AMX CPUs"
            )
        yield
        return
    original = llama_module.llama_cpp.llama_model_default_params

    def params():
        p = original()
        p.use_extra_bufts = use_extra_bufts
        return p

    llama_module.llama_cpp.llama_model_default_params = params
    try:
        yield
    finally:
        llama_module.llama_cpp.llama_model_default_params = original


def load_llama(path: str | Path, *, n_ctx: int | None = None, n_threads: int | None = None,
               use_extra_bufts: bool = False, verbose: bool = False):
    """A llama_cpp.Llama for a validated GGUF file (see read_gguf_metadata)."""
    meta = read_gguf_metadata(path)
    try:
        import llama_cpp
    except ImportError:
        raise InputError('the GGUF judge needs llama-cpp-python: pip install "conj-lite[export]"') from None
    arch = meta["general.architecture"]
    trained = int(meta.get(f"{arch}.context_length", 0) or 0)
    if n_ctx is None:
        n_ctx = min(DEFAULT_CTX, trained) if trained else DEFAULT_CTX
    if n_ctx < 64:
        raise InputError(f"--ctx {n_ctx} is too small for a judge prompt; use at least 512")
    threads = n_threads or os.cpu_count() or 1
    with _model_params(use_extra_bufts):
        try:
            llm = llama_cpp.Llama(
                str(path), n_ctx=n_ctx, n_batch=min(512, n_ctx), n_threads=threads, n_threads_batch=threads,
                logits_all=False, verbose=verbose,
            )
        except ValueError as exc:
            raise InputError(f"{path}: llama.cpp cannot load this model ({exc}); is the architecture {arch!r} "
                             f"supported by llama-cpp-python {llama_cpp.__version__}?") from None
    return llm, meta


# ---------------------------------------------------------------- backends


class GGUFBackend:
    """llama-cpp-python: chat template from the GGUF, grammar-held generation."""

    name = "gguf"

    def __init__(self, path, *, n_ctx=None, n_threads=None, use_extra_bufts=False, verbose=False):
        import llama_cpp
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        self.path = Path(path)
        self.llm, self.meta = load_llama(path, n_ctx=n_ctx, n_threads=n_threads,
                                         use_extra_bufts=use_extra_bufts, verbose=verbose)
        self.n_ctx = self.llm.n_ctx()
        chat_template = self.meta.get("tokenizer.chat_template")
        if not chat_template:
            raise InputError(f"{path}: the GGUF file has no chat template (tokenizer.chat_template)")
        model = self.llm._model
        bos, eos = self.llm.token_bos(), self.llm.token_eos()
        self.formatter = Jinja2ChatFormatter(
            template=chat_template,
            eos_token=model.token_get_text(eos) if eos != -1 else "",
            bos_token=model.token_get_text(bos) if bos != -1 else "",
            add_generation_prompt=True,
        )
        self.vocab = model.vocab
        self._llama_cpp = llama_cpp
        self._grammar = None
        # Free the model before interpreter shutdown tears down the modules that
        # Llama.__del__ needs (else Python prints an ignored TypeError at exit).
        ref = weakref.ref(self)
        atexit.register(lambda: ref() is not None and ref().close())

    def embedded_template(self) -> dict | None:
        raw = self.meta.get(GGUF_TEMPLATE_KEY)
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            raise InputError(f"{self.path}: metadata {GGUF_TEMPLATE_KEY} is not valid JSON") from None

    def render(self, messages: list[dict]) -> str:
        try:
            return self.formatter(messages=messages).prompt
        except Exception as exc:
            raise InputError(f"{self.path}: the GGUF chat template cannot render the judge prompt: {exc}") from None

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.llm.detokenize(list(ids)).decode("utf-8", errors="replace")

    def next_logits(self, ids: Sequence[int]):
        """Logits of the token after `ids`, reusing the KV cache of a shared prefix."""
        import numpy as np

        llm, ids = self.llm, list(ids)
        cached = llm._input_ids.tolist()
        keep = 0
        for a, b in zip(cached, ids):
            if a != b:
                break
            keep += 1
        keep = min(keep, len(ids) - 1)  # always decode at least one token for fresh logits
        if keep > 0 and llm._ctx.kv_cache_seq_rm(-1, keep, -1):
            llm.n_tokens = keep
        else:
            llm.reset()
            keep = 0
        llm.eval(ids[keep:])
        ptr = self._llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).copy()

    def set_template(self, template: JudgeTemplate) -> None:
        """The judgment grammar, plus what is needed to read the verdict while generating."""
        from llama_cpp.llama_grammar import LlamaGrammar

        self._grammar = LlamaGrammar.from_string(self._checked(judgment_grammar(template)), verbose=False)
        self._closing = LlamaGrammar.from_string(self._checked(closing_grammar(template)), verbose=False)
        head = ("{" + json.dumps(template.rationale_key, ensure_ascii=False) + ': "').encode("utf-8")
        marker = ('", ' + json.dumps(template.verdict_key, ensure_ascii=False) + ": ").encode("utf-8")
        body = rb'(?:[^"\\]|\\.)*'
        self._verdict_at = re.compile(re.escape(head) + body + re.escape(marker), re.S)
        # Inside the rationale string, at a clean point (not within an escape).
        self._in_body = re.compile(re.escape(head) + rb'(?:[^"\\]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})*', re.S)

    def _checked(self, gbnf: str) -> str:
        # An invalid grammar makes llama.cpp return a null sampler: check before use.
        probe = self._llama_cpp.llama_sampler_init_grammar(self.vocab, gbnf.encode("utf-8"), b"root")
        if not probe:
            raise InputError("the judge template's keys give an invalid llama.cpp grammar")
        self._llama_cpp.llama_sampler_free(probe)
        return gbnf

    def _run(self, ids: list[int], grammar, limit: int, before: list[int]):
        """Greedy generation after ids under `grammar`; `before` are the tokens of the
        judgment generated so far (ids ends with them). Returns (new tokens, finished,
        p1), p1 read from the logits of the step that writes the verdict digit."""
        llm, new, finished, p1 = self.llm, [], False, None
        text = llm.detokenize(before) if before else b""
        for token in llm.generate(ids, temp=0.0, top_k=1, grammar=grammar, reset=True):
            if self._llama_cpp.llama_vocab_is_eog(self.vocab, token):
                finished = True
                break
            full = text + llm.detokenize([token])  # detokenize() joins the pieces one by one
            if p1 is None and (b"1" in full[len(text):] or b"2" in full[len(text):]):
                match = self._verdict_at.match(full)
                if match and len(full) > match.end():
                    p1 = self._digit_p1(token, full, len(text), match.end())
                    p1 = -1.0 if p1 is None else p1  # -1: read it later, the canonical way
            new.append(token)
            text = full
            if len(new) >= limit:
                break
        return new, finished, (None if p1 is None or p1 < 0 else p1)

    def _digit_p1(self, token: int, full: bytes, start: int, digit_at: int) -> float | None:
        """P(slot 1) at the step that sampled `token`, the token holding the verdict digit:
        its logit against the logit of the same piece with the other digit."""
        piece, index = full[start:], digit_at - start
        if not 0 <= index < len(piece) or piece[index:index + 1] not in (b"1", b"2"):
            return None
        digit = piece[index:index + 1]
        other = piece[:index] + (b"2" if digit == b"1" else b"1") + piece[index + 1:]
        twin = self.llm.tokenize(other, add_bos=False, special=False)
        if len(twin) != 1:
            return None
        ptr = self._llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        logit, twin_logit = float(ptr[token]), float(ptr[twin[0]])
        return p_slot1(logit, twin_logit) if digit == b"1" else p_slot1(twin_logit, logit)

    def generate(self, ids: Sequence[int], max_new_tokens: int) -> Generation:
        """Greedy, grammar-held generation, with P(slot 1) read at the verdict digit.

        A judgment cut off at max_new_tokens is closed by the grammar right after the
        last clean point of its rationale, so the verdict is still read from the
        model's own tokens (the closing tokens are not part of the returned text)."""
        ids = list(ids)
        out, finished, p1 = self._run(ids, self._grammar, max_new_tokens, [])
        if p1 is None and not finished:
            keep = len(out)
            while keep > 0 and not self._in_body.fullmatch(self.llm.detokenize(out[:keep])):
                keep -= 1
            if keep > 0:
                _, _, p1 = self._run(ids + out[:keep], self._closing, 32, out[:keep])
        return Generation(self.detokenize(out), finished, len(out), p1)

    def close(self) -> None:
        if self.llm is not None:
            self.llm.close()
            self.llm = None


class HFBackend:
    """transformers: the chat template of the tokenizer, free greedy generation."""

    name = "hf"

    def __init__(self, model, tokenizer, *, n_ctx: int | None = None, source: str = ""):
        self.model, self.tokenizer, self.source = model, tokenizer, source
        limit = getattr(model.config, "max_position_embeddings", None) or DEFAULT_CTX
        self.n_ctx = n_ctx if n_ctx else min(DEFAULT_CTX, limit)
        self.device = next(model.parameters()).device

    def set_template(self, template: JudgeTemplate) -> None:  # free generation; parse_verdict reads it
        pass

    def render(self, messages: list[dict]) -> str:
        from .prompts import render_prompt

        return render_prompt(self.tokenizer, messages)

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def next_logits(self, ids: Sequence[int]):
        import torch

        with torch.inference_mode():
            logits = self.model(torch.tensor([list(ids)], device=self.device)).logits[0, -1]
        return logits.float().cpu().numpy()

    def generate(self, ids: Sequence[int], max_new_tokens: int) -> Generation:
        """Greedy, free generation (p1 is read afterwards, the canonical way)."""
        import torch

        tok = self.tokenizer
        input_ids = torch.tensor([list(ids)], device=self.device)
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                max_new_tokens=max_new_tokens, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
                temperature=None, top_p=None, top_k=None,
            )
        new = out[0, input_ids.shape[1]:].tolist()
        count = len(new)
        finished = tok.eos_token_id in new
        if finished:
            new = new[: new.index(tok.eos_token_id)]
        return Generation(self.detokenize(new).strip(), finished, count, None)

    def close(self) -> None:
        self.model = None


# ---------------------------------------------------------------- the judge


def _print_warning(message: str) -> None:
    from .progress import get_console

    get_console().print(f"[yellow]warning:[/] {message}", highlight=False)


class Judge:
    """A pairwise judge over one backend. Build it with `Judge.from_gguf` or `Judge.from_hf`."""

    def __init__(self, backend, template: JudgeTemplate, *, mode: str = "rationale",
                 max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, warn: Callable[[str], None] | None = _print_warning):
        if mode not in MODES:
            raise InputError(f"mode must be one of {MODES}, got {mode!r}")
        if max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.backend, self.template, self.mode = backend, template, mode
        self.max_new_tokens, self.warn = max_new_tokens, warn
        backend.set_template(template)

    # -- construction

    @classmethod
    def from_gguf(cls, path: str | Path, *, n_ctx: int | None = None, n_threads: int | None = None,
                  template=None, mode: str = "rationale", max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                  use_extra_bufts: bool = False, verbose: bool = False, **kwargs) -> "Judge":
        """A judge from a GGUF file. The judge template comes from the file's metadata
        (written by `conj-lite export`); `template` overrides it (name, path or JudgeTemplate)."""
        backend = GGUFBackend(path, n_ctx=n_ctx, n_threads=n_threads, use_extra_bufts=use_extra_bufts,
                              verbose=verbose)
        from .export import resolve_template

        chosen = template if template is not None else backend.embedded_template()
        return cls(backend, resolve_template(chosen), mode=mode, max_new_tokens=max_new_tokens, **kwargs)

    @classmethod
    def from_hf(cls, model_dir: str | Path, *, adapter: str | Path | None = None, base: str | None = None,
                template=None, mode: str = "rationale", max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                n_ctx: int | None = None, n_threads: int | None = None, dtype: str = "float32",
                **kwargs) -> "Judge":
        """A judge from transformers: a merged model directory, a LoRA adapter directory
        (its base is read from conj_lite_train.json / adapter_config.json, or `base`),
        or `model_dir` = base with `adapter`."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from .export import describe_source, resolve_template

        if n_threads:
            torch.set_num_threads(n_threads)
        if adapter is not None:
            adapter_info = describe_source(adapter)
            if adapter_info["kind"] != "adapter":
                raise InputError(f"{adapter}: not a LoRA adapter (no adapter_config.json)")
            base_path, adapter_path, info = str(model_dir), Path(adapter), adapter_info
        elif not Path(model_dir).exists() and not str(model_dir).startswith((".", "/", "~")):
            info = {"template": None}  # a hub model id
            base_path, adapter_path = str(model_dir), None
        else:
            info = describe_source(model_dir)
            if info["kind"] == "adapter":
                base_path, adapter_path = base or info["base"], Path(model_dir)
            else:
                base_path, adapter_path = str(model_dir), None
        torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
        try:
            model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch_dtype)
        except (OSError, ValueError) as exc:
            raise InputError(f"{base_path}: cannot load a causal language model: {exc}") from None
        if adapter_path is not None:
            from peft import PeftModel

            try:
                model = PeftModel.from_pretrained(model, str(adapter_path))
            except (RuntimeError, ValueError, KeyError) as exc:
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
                raise InputError(f"{adapter_path}: the adapter does not fit the base model {base_path} ({first}); "
                                 "pass the base it was trained on with --base") from None
        model.eval()
        tok_dir = adapter_path if adapter_path and (adapter_path / "tokenizer_config.json").is_file() else base_path
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
        except (OSError, ValueError) as exc:
            raise InputError(f"{tok_dir}: cannot load the tokenizer: {exc}") from None
        if not getattr(tokenizer, "chat_template", None):
            raise InputError(f"{tok_dir}: the tokenizer has no chat template")
        chosen = template if template is not None else info.get("template")
        backend = HFBackend(model, tokenizer, n_ctx=n_ctx, source=str(model_dir))
        return cls(backend, resolve_template(chosen), mode=mode, max_new_tokens=max_new_tokens, **kwargs)

    def close(self) -> None:
        self.backend.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- prompts

    def prompt(self, question: str, answer_1: str, answer_2: str) -> str:
        """The exact prompt text of one order (chat template + generation prompt)."""
        return self.backend.render(build_messages(self.template, question, answer_1, answer_2))

    def _reserve(self, mode: str) -> int:
        """Tokens the judgment needs after the prompt."""
        prefix = len(self.backend.tokenize(verdict_prefix(self.template, ""))) + 2
        return prefix if mode == "verdict" else self.max_new_tokens + prefix

    def fit(self, question: str, answer_a: str, answer_b: str, mode: str) -> tuple[str, str, list[str]]:
        """The answers, cut so both prompts and the judgment fit the context."""
        n_ctx, reserve = self.backend.n_ctx, self._reserve(mode)
        budget = n_ctx - reserve

        def need(a: str, b: str) -> int:
            return max(len(self.backend.tokenize(self.prompt(question, *ordered_answers(a, b, o)))) for o in ORDERS)

        total = need(answer_a, answer_b)
        if total <= budget:
            return answer_a, answer_b, []
        ids_a, ids_b = self.backend.tokenize(answer_a), self.backend.tokenize(answer_b)
        overhead = total - len(ids_a) - len(ids_b)
        mark = len(self.backend.tokenize(TRUNCATION_MARK))
        room = budget - overhead - 2 * mark - 4
        for _ in range(4):
            if room < 2 * MIN_ANSWER_TOKENS:
                what = "the judgment" if mode == "verdict" else f"a {self.max_new_tokens}-token judgment"
                raise InputError(
                    f"context too small: the prompt needs {overhead} tokens without the answers and {reserve} more "
                    f"for {what}, but the context holds {n_ctx}; use a larger --ctx (at least "
                    f"{overhead + reserve + 2 * MIN_ANSWER_TOKENS + 2 * mark + 4})"
                    + ("" if mode == "verdict" else " or a smaller --max-new-tokens")
                )
            cap_a, cap_b = cap_lengths(len(ids_a), len(ids_b), room)
            a = answer_a if cap_a >= len(ids_a) else self.backend.detokenize(ids_a[:cap_a]) + TRUNCATION_MARK
            b = answer_b if cap_b >= len(ids_b) else self.backend.detokenize(ids_b[:cap_b]) + TRUNCATION_MARK
            excess = need(a, b) - budget
            if excess <= 0:
                notes = [f"answer {name} cut from {n} to {cap} tokens to fit the {n_ctx}-token context"
                         for name, n, cap in (("A", len(ids_a), cap_a), ("B", len(ids_b), cap_b)) if cap < n]
                return a, b, notes
            room -= excess + 2
        raise InputError(f"could not fit the answers into the {n_ctx}-token context; use a larger --ctx")

    # -- judging

    def verdict_p1(self, prompt: str, prefix: str) -> float:
        """P(answer 1 better) at the verdict position after prompt + prefix.

        "1" and "2" are appended and tokenized with the context; the first token where
        the two differ is the verdict token, whatever the tokenizer merges around it."""
        ids_1 = self.backend.tokenize(prompt + prefix + "1")
        ids_2 = self.backend.tokenize(prompt + prefix + "2")
        k = 0
        for x, y in zip(ids_1, ids_2):
            if x != y:
                break
            k += 1
        if k >= min(len(ids_1), len(ids_2)):
            raise RuntimeError("the tokenizer does not tell the verdicts '1' and '2' apart")
        logits = self.backend.next_logits(ids_1[:k])
        return p_slot1(float(logits[ids_1[k]]), float(logits[ids_2[k]]))

    def judge_order(self, question: str, answer_a: str, answer_b: str, order: str, mode: str) -> OrderJudgment:
        """One order's judgment (answers already fitted to the context)."""
        prompt = self.prompt(question, *ordered_answers(answer_a, answer_b, order))
        if mode == "verdict":
            p1 = self.verdict_p1(prompt, verdict_prefix(self.template, ""))
            return OrderJudgment(order, 1 if p1 >= 0.5 else 2, p1, None, None, True, "verdict")
        text, finished, tokens, p1 = self.backend.generate(self.backend.tokenize(prompt), self.max_new_tokens)
        rationale, slot, prefix = split_canonical_judgment(self.template, text)
        method = "grammar" if self.backend.name == "gguf" else "json"
        if slot is None and self.backend.name == "hf":
            from .parsing import VERDICT_KEYS, RATIONALE_KEYS, parse_verdict

            parsed = parse_verdict(text, rationale_keys=(self.template.rationale_key, *RATIONALE_KEYS),
                                   verdict_keys=(self.template.verdict_key, *VERDICT_KEYS))
            slot, method = parsed.slot, parsed.method
            rationale = parsed.rationale if parsed.rationale is not None else rationale
        if p1 is None:  # not read while generating: ask after prompt + reply, tokenized afresh
            if prefix is None:  # not in the canonical form: ask at the canonical position
                prefix = verdict_prefix(self.template, rationale or "")
            p1 = self.verdict_p1(prompt, prefix)
        if slot is None and not finished:
            slot, method = (1 if p1 >= 0.5 else 2), "probability"
        return OrderJudgment(order, slot, p1, rationale, text, finished, method, tokens)

    def compare(self, question: str, answer_a: str, answer_b: str, mode: str | None = None) -> JudgeResult:
        """Judge a pair in both orders: verdict "A", "B" or "inconsistent", and P(A better)."""
        mode = mode or self.mode
        if mode not in MODES:
            raise InputError(f"mode must be one of {MODES}, got {mode!r}")
        start = time.perf_counter()
        a, b, notes = self.fit(question, answer_a, answer_b, mode)
        for note in notes:
            if self.warn:
                self.warn(note)
        ab = self.judge_order(question, a, b, "ab", mode)
        ba = self.judge_order(question, a, b, "ba", mode)
        result = combine(ab, ba, mode)
        result.seconds = time.perf_counter() - start
        result.truncated, result.warnings = bool(notes), notes
        return result


# ---------------------------------------------------------------- batches


@dataclass
class JudgeFileSummary:
    path: Path
    total: int
    judged: int
    resumed: int
    seconds: float
    accuracy: float | None  # over pairs labelled A/B
    consistency: float | None  # share of verdicts that are not "inconsistent"

    @property
    def per_minute(self) -> float:
        return 60.0 * self.judged / self.seconds if self.seconds else 0.0


def judge_file(judge: Judge, data, out_jsonl: str | Path, *, mode: str | None = None, preset: str = "auto",
               limit: int | None = None, batch_size: int = 8, console=None, model_name: str | None = None,
               **load_kwargs) -> JudgeFileSummary:
    """Judge every pair of `data` (a path `load_pairs` reads, or PreferencePair records)
    into `out_jsonl`, one record per pair. Pairs already in the file are skipped, so an
    interrupted run resumes where it stopped."""
    from .data import load_pairs
    from .progress import stage_progress
    from .sampling import JudgmentFile

    mode = mode or judge.mode
    pairs = list(data) if not isinstance(data, (str, Path)) else load_pairs(data, preset=preset, limit=limit, **load_kwargs).pairs
    if limit is not None:
        pairs = pairs[:limit]
    out_jsonl = Path(out_jsonl)
    out_jsonl.parent.mkdir(parents=True, exist_ok=True)
    store = JudgmentFile(out_jsonl)
    rows = store.load()
    modes = {row.get("mode") for row in rows}
    if rows and modes != {mode}:
        raise InputError(f"{out_jsonl}: holds judgments made in mode {sorted(map(str, modes))}, not {mode!r}; "
                         "write to another file or use the same --mode")
    done = {row.get("id") for row in rows}
    todo = [p for p in pairs if p.id not in done]
    start, judged, buffer = time.perf_counter(), 0, []
    with stage_progress("judge", console) as progress:
        task = progress.add_task(out_jsonl.name, total=len(pairs), completed=len(pairs) - len(todo),
                                 resumed=len(pairs) - len(todo))
        for pair in todo:
            try:
                result = judge.compare(pair.question, pair.answer_a, pair.answer_b, mode=mode)
            except InputError as exc:
                raise InputError(f"pair {pair.id}: {exc}") from None
            record = {"id": pair.id, **result.to_record(), "label": pair.label}
            if pair.label in ("A", "B"):
                record["correct"] = result.verdict == pair.label
            if model_name:
                record["model"] = model_name
            buffer.append(record)
            judged += 1
            if len(buffer) >= batch_size:
                store.append(buffer)
                buffer = []
            progress.advance(task)
        if buffer:
            store.append(buffer)
    seconds = time.perf_counter() - start
    final = {row["id"]: row for row in store.load()}
    wanted = [final[p.id] for p in pairs if p.id in final]
    labelled = [r for r in wanted if r.get("label") in ("A", "B")]
    accuracy = sum(r["verdict"] == r["label"] for r in labelled) / len(labelled) if labelled else None
    consistency = sum(r["verdict"] != "inconsistent" for r in wanted) / len(wanted) if wanted else None
    return JudgeFileSummary(out_jsonl, len(pairs), judged, len(pairs) - len(todo), seconds, accuracy, consistency)


# ---------------------------------------------------------------- CLI


def add_cli(subparsers) -> None:
    """`conj-lite judge`: the lead's cli.py calls this with its subparsers."""
    p = subparsers.add_parser(
        "judge",
        help="judge pairs locally: a GGUF file via llama-cpp-python (default) or a transformers model",
        description="Judge one pair (--question/--answer-a/--answer-b) or every pair of a data file (--data) "
        "in both answer orders. Prints the verdict (A, B or inconsistent) and P(A better); "
        "with --data, writes one JSONL record per pair to --output and resumes an interrupted run.",
    )
    p.add_argument("--model", required=True, help="a .gguf file, or a transformers model / LoRA adapter directory")
    p.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="auto: gguf for a file, hf for a directory")
    p.add_argument("--adapter", help="hf backend: a LoRA adapter to put on --model (the base)")
    p.add_argument("--base", help="hf backend: the base model of an adapter given as --model")
    p.add_argument("--question", help="the question of a single pair")
    p.add_argument("--answer-a", help="answer A of a single pair")
    p.add_argument("--answer-b", help="answer B of a single pair")
    p.add_argument("--data", help="a data file (JSON, JSONL, Parquet, CSV, save_to_disk dir or hub dataset)")
    p.add_argument("--preset", default="auto", help="column layout of --data (see conj_lite.data)")
    p.add_argument("--limit", type=int, help="judge only the first N pairs of --data")
    p.add_argument("--output", help="JSONL output (required with --data; optional for a single pair: appended)")
    add_runtime_args(p)
    from .selective import add_risk_args

    add_risk_args(p)
    p.set_defaults(func=cmd_judge)


def add_runtime_args(p) -> None:
    """How a judge runs: --mode, --threads, --ctx, --max-new-tokens, --template,
    --extra-bufts (shared by `conj-lite judge` and `conj-lite eval`)."""
    p.add_argument("--mode", default="rationale", choices=MODES,
                   help="rationale: write a rationale then the verdict; verdict: read the verdict probabilities "
                   "right after the prompt (fast, no rationale)")
    p.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    p.add_argument("--ctx", type=int, help="context size in tokens (default: min(4096, the model's))")
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                   help=f"longest rationale + verdict in tokens (default {DEFAULT_MAX_NEW_TOKENS})")
    p.add_argument("--template", help="judge template (default: the one stored with the model, else en)")
    p.add_argument("--extra-bufts", action="store_true",
                   help="gguf: let llama.cpp repack weights into its extra CPU buffers (faster on some CPUs, "
                   "segfaults with quantized files on AMX CPUs)")


def open_judge(args) -> Judge:
    path = Path(args.model)
    backend = args.backend
    if backend == "auto":
        backend = "hf" if path.is_dir() or (not path.exists() and not str(path).endswith(".gguf")) else "gguf"
    kwargs = dict(template=args.template, mode=args.mode, max_new_tokens=args.max_new_tokens)
    if backend == "gguf":
        return Judge.from_gguf(path, n_ctx=args.ctx, n_threads=args.threads, use_extra_bufts=args.extra_bufts,
                               **kwargs)
    return Judge.from_hf(args.model, adapter=args.adapter, base=args.base, n_ctx=args.ctx, n_threads=args.threads,
                         **kwargs)


def cmd_judge(args) -> int:
    from .progress import get_console

    console = get_console()
    single = [args.question, args.answer_a, args.answer_b]
    if args.data and any(x is not None for x in single):
        raise InputError("give either --data or --question/--answer-a/--answer-b, not both")
    if not args.data and any(x is None for x in single):
        raise InputError("give --question, --answer-a and --answer-b (or --data FILE)")
    if args.data and not args.output:
        raise InputError("--data needs --output FILE.jsonl for the judgments")
    from . import selective

    selective.check_risk_args(args)  # bad options fail before a model loads
    judge = open_judge(args)
    try:
        threshold = selective.threshold_from_args(args, judge, console)
        if args.data:
            summary = judge_file(judge, args.data, args.output, mode=args.mode, preset=args.preset,
                                 limit=args.limit, console=console, model_name=str(args.model))
            selective.mark_file(summary.path, threshold, console)
            acc = "n/a" if summary.accuracy is None else f"{100 * summary.accuracy:.1f}%"
            cons = "n/a" if summary.consistency is None else f"{100 * summary.consistency:.1f}%"
            console.print(
                f"judge: {summary.judged} pairs judged ({summary.resumed} already done) in {summary.seconds:.1f}s "
                f"({summary.per_minute:.1f}/min) into {summary.path}; accuracy {acc}, consistent {cons}",
                highlight=False,
            )
            return 0
        result = judge.compare(args.question, args.answer_a, args.answer_b, mode=args.mode)
        record = selective.mark_record(result.to_record(), threshold)
        if args.output:
            from .sampling import JudgmentFile

            JudgmentFile(args.output).append([{"id": f"cli-{int(time.time() * 1000)}", **record}])
        ab, ba = result.orders["ab"], result.orders["ba"]
        console.print(
            f"[bold]verdict: {result.verdict}[/]  P(A better) = {result.p_a:.3f}  "
            f"(order ab: {ab.label}, order ba: {ba.label})",
            highlight=False,
        )
        if threshold is not None:
            console.print(f"selective verdict: {record['selective_verdict']} (confidence {record['confidence']}, "
                          f"threshold {threshold.threshold})", highlight=False)
        for o in (ab, ba):
            if o.rationale:
                console.print(f"  {o.order}: {o.rationale}", highlight=False)
        print(json.dumps(record, ensure_ascii=False))
        return 0
    finally:
        judge.close()
