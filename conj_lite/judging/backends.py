"""Judge backends: what runs the model behind a `Judge`.

A backend renders the judge prompt with its chat template, tokenizes, gives the logits
of the next token, and generates one judgment. Two ship:

  gguf  llama-cpp-python. The prompt is rendered with the chat template stored in the
        GGUF (so the .gguf file alone is a judge) and generation is held to the
        judgment's JSON by a grammar (`constrained`), so a GGUF judgment is never
        unparseable; P(answer 1) is read at the generation step that writes the digit
        (a judgment cut off at max_new_tokens is first closed by a grammar). Quantized
        files are loaded without llama.cpp's repacked CPU weight buffers
        (`use_extra_bufts=False`): on CPUs with AMX those buffers segfault.
  hf    transformers: a merged model directory, or base + LoRA adapter, for
        comparison; its free-form output is read with `parsing.parse_verdict`.

A new backend (say an OpenAI-compatible server) is a class with the `Backend` methods
and an opener registered with `register_backend("name", opener)`; `Judge.open` and
`open_judge(..., backend="name")` then use it. `Judge` never asks which backend it has.
"""

from __future__ import annotations

import atexit
import ctypes
import json
import math
import re
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, Sequence

from ..artifacts import GGUF_CHAT_DATE_KEY, GGUF_TEMPLATE_KEY, describe_source, read_gguf_metadata
from ..errors import InputError
from ..prompts import DEFAULT_CHAT_DATE, JudgeTemplate, check_chat_template, render_prompt
from ..system import usable_cpus
from .verdicts import DEFAULT_CTX, Generation, closing_grammar, judgment_grammar, p_slot1


class Backend(Protocol):
    """What a `Judge` needs from the model it runs on."""

    name: str
    n_ctx: int  # context size in tokens
    constrained: bool  # True: generation always yields the canonical judgment JSON

    def default_template(self):
        """The judge template recorded with the model (a name, a dict, or None)."""

    def set_template(self, template: JudgeTemplate) -> None:
        """Prepare for judgments in this template's keys (a grammar, say)."""

    def render(self, messages: list[dict]) -> str:
        """The prompt text of chat messages, with the generation prompt."""

    def tokenize(self, text: str) -> list[int]: ...

    def detokenize(self, ids: Sequence[int]) -> str: ...

    def next_logits(self, ids: Sequence[int]):
        """Logits (a numpy vector) of the token after `ids`."""

    def generate(self, ids: Sequence[int], max_new_tokens: int) -> Generation:
        """One greedy judgment after `ids`; Generation.p1 when read while generating."""

    def close(self) -> None: ...


# ---------------------------------------------------------------- GGUF (llama-cpp-python)


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
               use_extra_bufts: bool = False, verbose: bool = False, lora_path: str | Path | None = None):
    """A llama_cpp.Llama for a validated GGUF file (see read_gguf_metadata), with the
    GGUF LoRA adapter `lora_path` applied at run time when given."""
    meta = read_gguf_metadata(path)
    if lora_path is not None:
        lora_meta = read_lora_metadata(lora_path)
        if lora_meta.get("general.architecture") != meta["general.architecture"]:
            raise InputError(f"{lora_path}: a LoRA for {lora_meta.get('general.architecture')!r}, but {path} is "
                             f"{meta['general.architecture']!r}")
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
    threads = n_threads or usable_cpus()
    with _model_params(use_extra_bufts):
        try:
            llm = llama_cpp.Llama(
                str(path), n_ctx=n_ctx, n_batch=min(512, n_ctx), n_threads=threads, n_threads_batch=threads,
                logits_all=False, verbose=verbose, lora_path=str(lora_path) if lora_path else None,
            )
        except ValueError as exc:
            raise InputError(f"{path}: llama.cpp cannot load this model ({exc}); is the architecture {arch!r} "
                             f"supported by llama-cpp-python {llama_cpp.__version__}?") from None
    return llm, meta


def read_lora_metadata(path: str | Path) -> dict:
    """The metadata of a GGUF LoRA adapter (general.type "adapter", adapter.type "lora")."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such LoRA file")
    try:
        import gguf

        reader = gguf.GGUFReader(str(path), "r")
        meta = {}
        for key, fld in reader.fields.items():
            try:
                meta[key] = fld.contents()
            except Exception:
                continue
    except ImportError:
        raise InputError('reading GGUF files needs the gguf package: pip install "conj-lite[export]"') from None
    except Exception as exc:
        raise InputError(f"{path}: not a readable GGUF file ({type(exc).__name__}: {exc})") from None
    if meta.get("general.type") != "adapter" or meta.get("adapter.type") != "lora":
        raise InputError(f"{path}: not a GGUF LoRA adapter (general.type {meta.get('general.type')!r})")
    return meta


CLOSE_LIMIT = 32  # tokens the closing grammar may take to finish a judgment cut off before its verdict


# ---------------------------------------------------------------- grammar-held greedy decoding


class GreedyGrammar:
    """Greedy decoding held to a llama.cpp grammar, checked the cheap way round.

    Applying a grammar to every candidate costs a walk of the grammar for each of the
    vocabulary's tokens (49k for SmolLM2) at every step. A model that already writes the
    judgment's JSON rarely wants a token the grammar refuses, so: take the most likely
    token, ask the grammar about that one token, and only when it is refused apply the
    grammar to the whole vocabulary and take the best token left (what llama.cpp's own
    common sampler does). The token is the one grammar-first greedy decoding picks: if
    the best token is allowed, it is the best allowed token (ties go to the lower id in
    both). `full_checks` counts the steps that needed the whole vocabulary."""

    def __init__(self, lib, vocab, gbnf: str, n_vocab: int):
        import numpy as np

        self._lib, self._np, self.n_vocab = lib, np, n_vocab
        self.sampler = lib.llama_sampler_init_grammar(vocab, gbnf.encode("utf-8"), b"root")
        if not self.sampler:
            raise InputError("the judge template's keys give an invalid llama.cpp grammar")
        self._vocab = vocab
        self._one = (lib.llama_token_data * 1)()
        self._one_view = lib.llama_token_data_array(self._one, 1, -1, False)
        self.steps = self.full_checks = 0

    def _allowed(self, token: int, logit: float) -> bool:
        one, view = self._one[0], self._one_view
        one.id, one.logit, one.p = token, logit, 0.0
        view.size, view.selected, view.sorted = 1, -1, False
        self._lib.llama_sampler_apply(self.sampler, ctypes.byref(view))
        return not math.isinf(self._one[0].logit)

    def _best_allowed(self, logits) -> int:
        np, lib = self._np, self._lib
        data = np.empty(self.n_vocab, dtype=[("id", np.int32), ("logit", np.float32), ("p", np.float32)])
        data["id"] = np.arange(self.n_vocab, dtype=np.int32)
        data["logit"], data["p"] = logits, 0.0
        view = lib.llama_token_data_array(data.ctypes.data_as(lib.llama_token_data_p), self.n_vocab, -1, False)
        lib.llama_sampler_apply(self.sampler, ctypes.byref(view))
        token = int(data["logit"].argmax())  # the grammar sets refused logits to -inf, in place
        if math.isinf(float(data["logit"][token])):
            raise RuntimeError("the judgment grammar allows no token here")
        return token

    def pick(self, ptr) -> int:
        """The next token from a step's logits (a ctypes float pointer); the grammar
        advances past it (not past an end-of-generation token, which ends the run)."""
        logits = self._np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))
        token = int(logits.argmax())
        self.steps += 1
        if not self._allowed(token, float(logits[token])):
            self.full_checks += 1
            token = self._best_allowed(logits)
        if not self._lib.llama_vocab_is_eog(self._vocab, token):
            self._lib.llama_sampler_accept(self.sampler, token)
        return token

    def close(self) -> None:
        if self.sampler:
            self._lib.llama_sampler_free(self.sampler)
            self.sampler = None


# ---------------------------------------------------------------- parallel sequences


def shared_prefix(seqs: Sequence[Sequence[int]], start: int = 0) -> int:
    """Length of the token prefix all of `seqs` share, leaving each at least one token
    of its own (its last token is evaluated in its own sequence, for its logits).
    `start`: a length they are known to share, not compared again."""
    if len(seqs) < 2:
        return 0
    n = min(len(s) for s in seqs) - 1
    first = seqs[0]
    for k in range(start, max(n, 0)):
        if any(s[k] != first[k] for s in seqs[1:]):
            return k
    return max(n, 0)


@dataclass(frozen=True)
class Segment:
    """Positions [start, end) of the sequences `members`, which share those tokens:
    evaluated once in `members[0]` and copied to the others. A segment of one member
    ends with its last token, whose logits are wanted."""

    members: tuple[int, ...]
    start: int
    end: int


def prefix_levels(seqs: Sequence[Sequence[int]]) -> list[list[Segment]]:
    """The token prefix tree of `seqs`, level by level: a token that several sequences
    share is in one segment, evaluated once, except where it is the last token of one of
    them (a sequence evaluates its last token itself, for its own logits); a segment's
    sequences hold all positions before its start once the levels above it are
    evaluated and copied.

    A Con-J example's prompts part at three places: the question (after the shared
    instructions), the answer order, and the hint prefix; its repeats share everything
    but the last token."""
    levels: list[list[Segment]] = []
    nodes = [(tuple(range(len(seqs))), 0)] if seqs else []
    while nodes:
        level, below = [], []
        for members, start in nodes:
            if len(members) == 1:
                level.append(Segment(members, start, len(seqs[members[0]])))
                continue
            end = shared_prefix([seqs[i] for i in members], start)  # they share [0, start)
            if end > start:
                level.append(Segment(members, start, end))
            by_token: dict[int, list[int]] = {}
            for i in members:
                by_token.setdefault(seqs[i][end], []).append(i)
            for part in by_token.values():
                last = [i for i in part if len(seqs[i]) == end + 1]  # only their last token left
                rest = tuple(i for i in part if len(seqs[i]) > end + 1)
                below += [((i,), end) for i in last] + ([(rest, end)] if rest else [])
        if level:
            levels.append(level)
        nodes = below
    return levels


def prefix_cells(seqs: Sequence[Sequence[int]]) -> int:
    """KV cells the prefix tree of `seqs` takes (copied cells are shared, not duplicated)."""
    return sum(seg.end - seg.start for level in prefix_levels(seqs) for seg in level)


def cells_needed(seqs: Sequence[Sequence[int]], extra: int = 0) -> int:
    """KV cells a unified cache needs for `seqs` (ParallelDecoder.prefill evaluates their
    prefix tree, each shared token once) and `extra` tokens each may still generate."""
    return prefix_cells(seqs) + extra * len(seqs)


def waves(groups: Sequence[Sequence[Sequence[int]]], n_seq: int, cells: int, extra: int = 0) -> list[list[int]]:
    """Indices of `groups` (each a list of token lists) packed into waves of at most
    `n_seq` sequences and `cells` KV cells (`cells_needed`: the prefixes the wave's
    sequences share counted once), in order; a group is never split."""
    out: list[list[int]] = []
    held: list[Sequence[int]] = []
    for index, group in enumerate(groups):
        grown = held + list(group)
        if not out or len(grown) > n_seq or cells_needed(grown, extra) > cells:
            out.append([])
            grown = list(group)
        out[-1].append(index)
        held = grown
    return out


def set_adapters(ctx, adapters: list, scales: list[float]) -> None:
    """Put these LoRA adapters (llama_adapter_lora pointers) on a llama.cpp context, in
    place of those it had (none: the base model alone)."""
    import llama_cpp

    n = len(adapters)
    array = (llama_cpp.llama_adapter_lora_p_ctypes * max(n, 1))(*adapters)
    weights = (ctypes.c_float * max(n, 1))(*scales)
    if llama_cpp.llama_set_adapters_lora(ctx, array if n else None, n, weights if n else None):
        raise RuntimeError("llama.cpp could not set the LoRA adapters on a context")


class ParallelDecoder:
    """Several sequences decoded together in one llama.cpp context.

    The context shares the weights (and LoRA adapter) of a loaded `Llama` and holds
    `n_seq` sequences in one unified KV cache of `n_ctx` cells. `prefill` evaluates the
    prompts of groups of sequences: a prefix common to a group (the judge prompt up to
    where the two answer orders part) is evaluated once in the group's first sequence
    and copied to the others with `llama_memory_seq_cp`; then the rest of every prompt,
    several sequences per `llama_decode`. `step` then adds one token to each live
    sequence in a single `llama_decode`. Logits are handed to a callback right after
    the decode that made them (the next one overwrites them)."""

    def __init__(self, llm, n_seq: int, n_ctx: int, flash_attn: bool = False):
        import llama_cpp

        self._lib = llama_cpp
        params = llama_cpp.llama_context_params.from_buffer_copy(llm.context_params)
        params.n_ctx = n_ctx
        params.n_seq_max = n_seq
        params.kv_unified = True  # the copied prefix is shared, not duplicated
        if flash_attn:  # llama.cpp's CPU flash attention skips the cells of other sequences
            params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        params.n_batch = max(params.n_batch, n_seq)
        params.n_ubatch = min(params.n_ubatch, params.n_batch)
        from llama_cpp._utils import suppress_stdout_stderr

        with suppress_stdout_stderr(disable=llm.verbose):
            self.ctx = llama_cpp.llama_init_from_model(llm._model.model, params)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not create a {n_seq}-sequence context of {n_ctx} tokens")
        adapter = getattr(llm, "_lora_adapter", None)
        if adapter is not None:
            set_adapters(self.ctx, [adapter], [llm.lora_scale])
        self.n_seq, self.n_ctx, self.n_batch = n_seq, llama_cpp.llama_n_ctx(self.ctx), params.n_batch
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)

    def logits(self, index: int):
        """The logits (a ctypes float pointer) of row `index` of the last decode."""
        return self._lib.llama_get_logits_ith(self.ctx, index)

    def decode(self, entries: list[tuple[int, int, int, object]], on_logits) -> None:
        """entries: (seq, pos, token, key); a key that is not None asks for the logits,
        handed over as on_logits(key, row) after the decode that computed them."""
        batch = self.batch
        for start in range(0, len(entries), self.n_batch):
            chunk, wanted = entries[start:start + self.n_batch], []
            for i, (seq, pos, token, key) in enumerate(chunk):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, pos, 1
                batch.seq_id[i][0] = seq
                batch.logits[i] = key is not None
                if key is not None:
                    wanted.append((key, i))
            batch.n_tokens = len(chunk)
            rc = self._lib.llama_decode(self.ctx, batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode failed ({rc}) on {len(chunk)} tokens in a {self.n_ctx}-cell cache")
            for key, i in wanted:
                on_logits(key, i)

    def prefill(self, groups: Sequence[Sequence[Sequence[int]]], on_logits) -> list[list[int]]:
        """Clear the cache and evaluate every group's prompts; returns each group's
        sequence ids. on_logits((group, member), row) at each prompt's last token.

        Tokens that several prompts share are evaluated once, in one of them, and copied
        to the others (`prefix_levels`): the instructions all prompts share, a question
        shared by its two answer orders, an answer order shared by its repeats and hinted
        prompts. The segments of one level of that tree go in one batch."""
        total = sum(len(group) for group in groups)
        if total > self.n_seq:
            raise ValueError(f"{total} sequences for a {self.n_seq}-sequence context")
        lib, memory = self._lib, self.memory
        lib.llama_memory_clear(memory, True)
        everything = [ids for group in groups for ids in group]
        keys = [(g, m) for g, group in enumerate(groups) for m in range(len(group))]
        for level in prefix_levels(everything):
            entries = []
            for seg in level:
                seq, want = seg.members[0], len(seg.members) == 1
                entries += [(seq, pos, everything[seq][pos], keys[seq] if want and pos == seg.end - 1 else None)
                            for pos in range(seg.start, seg.end)]
            self.decode(entries, on_logits)
            for seg in level:
                for other in seg.members[1:]:
                    lib.llama_memory_seq_cp(memory, seg.members[0], other, seg.start, seg.end)
        seq_ids, base = [], 0
        for group in groups:
            seq_ids.append(list(range(base, base + len(group))))
            base += len(group)
        return seq_ids

    def rewind(self, seq: int, pos: int) -> None:
        """Forget sequence `seq` from position `pos` on."""
        self._lib.llama_memory_seq_rm(self.memory, seq, pos, -1)

    def step(self, tokens: dict[int, tuple[int, int]], on_logits) -> None:
        """One token for each live sequence: {seq: (pos, token)}; on_logits(seq, row)."""
        self.decode([(seq, pos, token, seq) for seq, (pos, token) in tokens.items()], on_logits)

    def close(self) -> None:
        if getattr(self, "batch", None) is not None:
            self._lib.llama_batch_free(self.batch)
            self.batch = None
        if getattr(self, "ctx", None):
            self._lib.llama_free(self.ctx)
            self.ctx = None


# ---------------------------------------------------------------- backends


class GGUFChatTemplate:
    """A GGUF's chat template (tokenizer.chat_template) rendered by llama-cpp-python's
    Jinja formatter behind the one method of a Hugging Face tokenizer that the prompt
    functions use (`apply_chat_template(..., tokenize=False)`), so that
    `check_chat_template` and `render_prompt` treat it exactly as they treat the model's
    tokenizer in training: the system text folded for templates that need it (Gemma 2,
    Mistral v0.3), and `date_string` passed (Llama 3.x would print today's date)."""

    def __init__(self, template: str, *, bos_token: str, eos_token: str, name: str = "the GGUF",
                 special_texts: tuple[str, ...] = ()):
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        self.name_or_path = name
        self.special_texts = special_texts  # what prompts.special_texts reads of a HF tokenizer
        self._formatters = {flag: Jinja2ChatFormatter(template=template, eos_token=eos_token, bos_token=bos_token,
                                                      add_generation_prompt=flag) for flag in (False, True)}

    def apply_chat_template(self, messages: list[dict], tokenize: bool = False, add_generation_prompt: bool = False,
                            **kwargs) -> str:
        if tokenize:
            raise ValueError("GGUFChatTemplate renders text only; tokenize with the GGUF backend")
        return self._formatters[bool(add_generation_prompt)](messages=messages, **kwargs).prompt


class GGUFBackend:
    """llama-cpp-python: chat template from the GGUF, grammar-held generation."""

    name = "gguf"
    constrained = True  # a grammar holds generation to the judgment's JSON

    def __init__(self, path, *, n_ctx=None, n_threads=None, use_extra_bufts=False, verbose=False,
                 n_parallel: int = 4, parallel_ctx: int | None = None, lora_path=None, parallel_verdict: bool = False):
        import llama_cpp

        self.path = Path(path)
        self.lora_path = Path(lora_path) if lora_path else None
        self.llm, self.meta = load_llama(path, n_ctx=n_ctx, n_threads=n_threads, use_extra_bufts=use_extra_bufts,
                                         verbose=verbose, lora_path=lora_path)
        self.lora_meta = read_lora_metadata(lora_path) if lora_path else {}
        self.n_ctx = self.llm.n_ctx()
        chat_template = self.meta.get("tokenizer.chat_template")
        if not chat_template:
            raise InputError(f"{path}: the GGUF file has no chat template (tokenizer.chat_template)")
        model = self.llm._model
        bos, eos = self.llm.token_bos(), self.llm.token_eos()
        # Control tokens: llama.cpp with special=True reads their text in a prompt as the token.
        control = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_UNKNOWN
        special = tuple(model.token_get_text(t) for t in range(self.llm.n_vocab()) if model.token_get_attr(t) & control)
        self.chat_template = GGUFChatTemplate(chat_template, bos_token=model.token_get_text(bos) if bos != -1 else "",
                                              eos_token=model.token_get_text(eos) if eos != -1 else "",
                                              name=str(self.path), special_texts=special)
        # The date training gave the chat template (export records it): prompts render as trained.
        self.chat_date = (self.lora_meta.get(GGUF_CHAT_DATE_KEY) or self.meta.get(GGUF_CHAT_DATE_KEY)
                          or DEFAULT_CHAT_DATE)
        self.vocab = model.vocab
        self._llama_cpp = llama_cpp
        self._grammar = None
        # Parallel judging (generate_many, next_logits_many): n_parallel pairs, both
        # orders each, in a second context on the same weights, made on first use.
        self.n_parallel = max(1, int(n_parallel))
        self.parallel_ctx = parallel_ctx or 2 * self.n_ctx
        # Verdict mode only evaluates prompts, and on a CPU that is compute-bound: one prompt
        # at a time in the main context, reusing the KV cache of the prefix it shares with
        # the prompt before, beats the prompts together in one batch (which attend over the
        # whole unified cache): benchmarks/kv_layout.py, docs/benchmarks.md. So
        # Judge.compare_many judges verdict mode one pair at a time unless this is set.
        self.parallel_verdict = bool(parallel_verdict)
        self._parallel: ParallelDecoder | None = None
        # Named LoRA adapters loaded on the same weights (add_adapter), one active at a time.
        self.adapters: dict[str, tuple[object, Path, dict]] = {}
        self.active_adapter: str | None = None
        # Free the model before interpreter shutdown tears down the modules that
        # Llama.__del__ needs (else Python prints an ignored TypeError at exit).
        ref = weakref.ref(self)
        atexit.register(lambda: ref() is not None and ref().close())

    def default_template(self) -> dict | None:
        """The judge template stored in the GGUF (or its LoRA) by `conj-lite export`."""
        raw = self.lora_meta.get(GGUF_TEMPLATE_KEY) or self.meta.get(GGUF_TEMPLATE_KEY)
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            raise InputError(f"{self.path}: metadata {GGUF_TEMPLATE_KEY} is not valid JSON") from None

    def render(self, messages: list[dict]) -> str:
        """The chat template stored in the GGUF, used as training used the model's own:
        system text folded when the template needs it, the date pinned (render_prompt)."""
        try:
            return render_prompt(self.chat_template, messages)
        except InputError:
            raise
        except Exception as exc:
            raise InputError(f"{self.path}: the GGUF chat template cannot render the judge prompt: {exc}") from None

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.llm.detokenize(list(ids)).decode("utf-8", errors="replace")

    def next_logits(self, ids: Sequence[int]):
        """Logits of the token after `ids`, reusing the KV cache of a shared prefix."""
        import numpy as np

        ptr = self._evaluate(ids)
        return np.ctypeslib.as_array(ptr, shape=(self.llm.n_vocab(),)).copy()

    def _evaluate(self, ids: Sequence[int]):
        """Evaluate `ids` in the main context, keeping the KV cache of the prefix they
        share with what it holds; returns the last token's logits (a float pointer)."""
        llm, ids = self.llm, list(ids)
        keep = 0
        for a, b in zip(llm._input_ids.tolist(), ids):
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
        return self._llama_cpp.llama_get_logits_ith(llm.ctx, -1)

    def set_template(self, template: JudgeTemplate) -> None:
        """The judgment grammar, plus what is needed to read the verdict while generating;
        how the judge prompt goes through the GGUF's chat template is decided here, as
        training decided it on the same template and date (check_chat_template)."""
        check_chat_template(self.chat_template, template, self.chat_date)
        self._grammar = self._checked(judgment_grammar(template))
        self._closing = self._checked(closing_grammar(template))
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

    def _run(self, ids: list[int], grammar: str, limit: int, before: list[int]):
        """Greedy generation after ids under `grammar` (GBNF); `before` are the tokens of
        the judgment generated so far (ids ends with them). Returns (new tokens,
        finished, p1), p1 read from the logits of the step that writes the verdict digit."""
        llm, lib, new, finished, p1 = self.llm, self._llama_cpp, [], False, None
        text = llm.detokenize(before) if before else b""
        held = GreedyGrammar(lib, self.vocab, grammar, llm.n_vocab())
        try:
            ptr = self._evaluate(ids)
            while True:
                token = held.pick(ptr)
                if lib.llama_vocab_is_eog(self.vocab, token):
                    finished = True
                    break
                full = text + llm.detokenize([token])  # detokenize() joins the pieces one by one
                if p1 is None:
                    p1 = self._watch_p1(token, text, full, lambda: ptr)
                new.append(token)
                text = full
                if len(new) >= limit:
                    break
                llm.eval([token])
                ptr = lib.llama_get_logits_ith(llm.ctx, -1)
        finally:
            held.close()
        return new, finished, (None if p1 is None or p1 < 0 else p1)

    def _watch_p1(self, token: int, text: bytes, full: bytes, logits) -> float | None:
        """None while the verdict digit is not written yet; at the token that writes it,
        P(slot 1) from that step's logits (`logits()`: a float pointer), or -1.0 when it
        cannot be read there (then it is read later, the canonical way)."""
        if b"1" not in full[len(text):] and b"2" not in full[len(text):]:
            return None
        match = self._verdict_at.match(full)
        if not match or len(full) <= match.end():
            return None
        p1 = self._digit_p1(token, full, len(text), match.end(), logits())
        return -1.0 if p1 is None else p1

    def _digit_p1(self, token: int, full: bytes, start: int, digit_at: int, ptr=None) -> float | None:
        """P(slot 1) at the step that sampled `token`, the token holding the verdict digit:
        its logit against the logit of the same piece with the other digit (`ptr`: that
        step's logits, default the main context's last)."""
        piece, index = full[start:], digit_at - start
        if not 0 <= index < len(piece) or piece[index:index + 1] not in (b"1", b"2"):
            return None
        digit = piece[index:index + 1]
        other = piece[:index] + (b"2" if digit == b"1" else b"1") + piece[index + 1:]
        twin = self.llm.tokenize(other, add_bos=False, special=False)
        if len(twin) != 1:
            return None
        if ptr is None:
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
            keep = self._clean_point(out)
            if keep > 0:
                _, _, p1 = self._run(ids + out[:keep], self._closing, CLOSE_LIMIT, out[:keep])
        return Generation(self.detokenize(out), finished, len(out), p1)

    def _clean_point(self, out: list[int]) -> int:
        """How many of a cut judgment's tokens end at a clean point of its rationale
        (inside the string, not within an escape): where the closing grammar takes over."""
        keep = len(out)
        while keep > 0 and not self._in_body.fullmatch(self.llm.detokenize(out[:keep])):
            keep -= 1
        return keep

    # -- several LoRA adapters on one base

    def add_adapter(self, name: str, path: str | Path) -> dict:
        """Load the GGUF LoRA `path` on this model's weights as `name` (not yet active);
        returns its metadata."""
        if self.lora_path is not None:
            raise InputError("a judge opened with lora_path holds that adapter only; open the base to add adapters")
        meta = read_lora_metadata(path)
        if meta.get("general.architecture") != self.meta["general.architecture"]:
            raise InputError(f"{path}: a LoRA for {meta.get('general.architecture')!r}, but {self.path} is "
                             f"{self.meta['general.architecture']!r}")
        lib = self._llama_cpp
        from llama_cpp._utils import suppress_stdout_stderr

        with suppress_stdout_stderr(disable=self.llm.verbose):
            adapter = lib.llama_adapter_lora_init(self.llm._model.model, str(path).encode("utf-8"))
        if not adapter:
            raise InputError(f"{path}: llama.cpp cannot load this LoRA on {self.path} (does it fit the base?)")
        self.adapters[name] = (adapter, Path(path), meta)  # freed with the model
        return meta

    def use_adapter(self, name: str | None) -> None:
        """Judge with the adapter `name` (None: the base alone) from now on."""
        if name == self.active_adapter:
            return
        if name is not None and name not in self.adapters:
            raise InputError(f"unknown adapter {name!r}; loaded: {', '.join(self.adapters) or 'none'}")
        chosen = [self.adapters[name][0]] if name is not None else []
        set_adapters(self.llm.ctx, chosen, [1.0] * len(chosen))
        if self._parallel is not None:
            set_adapters(self._parallel.ctx, chosen, [1.0] * len(chosen))
        self.llm.reset()  # the cached prompt was computed with other weights
        self.active_adapter = name

    # -- parallel sequences

    def parallel(self) -> ParallelDecoder:
        """The parallel decoder (2 sequences per pair, n_parallel pairs), made on first use."""
        if self._parallel is None:
            self._parallel = ParallelDecoder(self.llm, 2 * self.n_parallel, self.parallel_ctx)
            if self.active_adapter is not None:
                set_adapters(self._parallel.ctx, [self.adapters[self.active_adapter][0]], [1.0])
        return self._parallel

    def next_logits_many(self, groups: Sequence[Sequence[Sequence[int]]]) -> list[list]:
        """next_logits for many token lists at once, in groups (the two orders of a pair):
        a group's common prefix is evaluated once and copied to its other sequences."""
        import numpy as np

        decoder, n_vocab = self.parallel(), self.llm.n_vocab()
        groups = [[list(ids) for ids in group] for group in groups]
        out = [[None] * len(group) for group in groups]
        for wave in waves(groups, decoder.n_seq, decoder.n_ctx):
            def keep(key, row, wave=wave):
                g, m = key
                ptr = decoder.logits(row)
                out[wave[g]][m] = np.ctypeslib.as_array(ptr, shape=(n_vocab,)).copy()

            decoder.prefill([groups[i] for i in wave], keep)
        return out

    def generate_many(self, groups: Sequence[Sequence[Sequence[int]]], max_new_tokens: int) -> list[list[Generation]]:
        """generate() for many prompts decoded together (greedy, each sequence held by
        its own grammar sampler): the judgments of one at a time, up to floating-point
        rounding of the batched decode (a near-tie token can go the other way). Shared
        prompt prefixes are evaluated once and copied. Judgments cut off at
        max_new_tokens are closed in their own sequences, together."""
        decoder = self.parallel()
        groups = [[list(ids) for ids in group] for group in groups]
        results: list[list[Generation | None]] = [[None] * len(group) for group in groups]
        for wave in waves(groups, decoder.n_seq, decoder.n_ctx, extra=max_new_tokens + CLOSE_LIMIT):
            samplers = []
            try:
                states = self._generate_wave(decoder, [groups[i] for i in wave], max_new_tokens, samplers)
            finally:
                for held in samplers:
                    held.close()
            for (g, m), state in states.items():
                p1 = state["p1"]
                results[wave[g]][m] = Generation(self.detokenize(state["new"]), state["finished"], len(state["new"]),
                                                 None if p1 is None or p1 < 0 else p1)
        return results

    def _generate_wave(self, decoder: ParallelDecoder, groups, max_new_tokens: int, samplers: list) -> dict:
        """One wave of generate_many: {(group, member): state}. A state's tokens are
        decoded at positions start, start + 1, ... of its sequence."""
        lib, llm, n_vocab = self._llama_cpp, self.llm, self.llm.n_vocab()

        def state(grammar: str, start: int, limit: int, text: bytes = b"", closing: bool = False) -> dict:
            samplers.append(GreedyGrammar(lib, self.vocab, grammar, n_vocab))
            return {"held": samplers[-1], "new": [], "text": text, "p1": None, "finished": False, "done": False,
                    "start": start, "limit": limit, "closing": closing}

        def sample(state: dict, row: int) -> None:
            token = state["held"].pick(decoder.logits(row))
            if lib.llama_vocab_is_eog(self.vocab, token):
                state["finished"] = state["done"] = True
                return
            full = state["text"] + llm.detokenize([token])
            if state["p1"] is None:
                state["p1"] = self._watch_p1(token, state["text"], full, lambda: decoder.logits(row))
            state["new"].append(token)
            state["text"] = full
            # a closing is done once the verdict digit is read
            state["done"] = len(state["new"]) >= state["limit"] or (state["closing"] and state["p1"] is not None)

        def run(by_seq: dict[int, dict]) -> None:
            while live := {seq: (s["start"] + len(s["new"]) - 1, s["new"][-1])
                           for seq, s in by_seq.items() if not s["done"]}:
                decoder.step(live, lambda seq, row: sample(by_seq[seq], row))

        states = {(g, m): state(self._grammar, len(ids), max_new_tokens)
                  for g, group in enumerate(groups) for m, ids in enumerate(group)}
        seq_ids = decoder.prefill(groups, lambda key, row: sample(states[key], row))
        by_seq = {seq_ids[g][m]: states[g, m] for g, m in states}
        run(by_seq)
        # Cut off before the verdict: back to the rationale's last clean point, in the
        # same sequence (its prompt stays in the cache), and on under the closing grammar.
        closing, first = {}, {}
        for seq, s in by_seq.items():
            keep = self._clean_point(s["new"]) if s["p1"] is None and not s["finished"] else 0
            if keep > 0:
                at = s["start"] + keep - 1  # the last kept token, decoded again for its logits
                decoder.rewind(seq, at)
                closing[seq] = state(self._closing, at + 1, CLOSE_LIMIT, llm.detokenize(s["new"][:keep]), closing=True)
                first[seq] = (at, s["new"][keep - 1])
        if closing:
            decoder.step(first, lambda seq, row: sample(closing[seq], row))
            run(closing)
            for seq, c in closing.items():
                by_seq[seq]["p1"] = c["p1"]
        return states

    def close(self) -> None:
        if self._parallel is not None:
            self._parallel.close()
            self._parallel = None
        if self.llm is not None:
            self.llm.close()
            self.llm = None


class HFBackend:
    """transformers: the chat template of the tokenizer, free greedy generation."""

    name = "hf"
    constrained = False  # free generation: the reply is read with parsing.parse_verdict

    def __init__(self, model, tokenizer, *, n_ctx: int | None = None, source: str = "", template=None,
                 chat_date: str | None = None):
        self.model, self.tokenizer, self.source, self.template = model, tokenizer, source, template
        self.chat_date = chat_date or DEFAULT_CHAT_DATE  # the date training gave the chat template
        limit = getattr(model.config, "max_position_embeddings", None) or DEFAULT_CTX
        self.n_ctx = n_ctx if n_ctx else min(DEFAULT_CTX, limit)
        first = next(model.parameters())
        self.device, self.dtype = first.device, str(first.dtype).removeprefix("torch.")

    def default_template(self):
        """The judge template recorded with the model or adapter (name, dict or None)."""
        return self.template

    def set_template(self, template: JudgeTemplate) -> None:
        """Free generation (parse_verdict reads the reply); the prompt goes through the
        tokenizer's chat template as training decided it, with the date training used."""
        check_chat_template(self.tokenizer, template, self.chat_date)

    def render(self, messages: list[dict]) -> str:
        return render_prompt(self.tokenizer, messages)

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def next_logits(self, ids: Sequence[int]):
        import torch

        with torch.inference_mode():
            # one prompt at a time, no padding: on a CPU, faster than padded batches (masked attention)
            logits = self.model(torch.tensor([list(ids)], device=self.device), logits_to_keep=1).logits[0, -1]
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


# ---------------------------------------------------------------- the registry


BACKENDS: dict[str, Callable[..., Backend]] = {}


def register_backend(name: str, opener: Callable[..., Backend]) -> None:
    """Make `opener(spec, **options)` the backend called `name`."""
    BACKENDS[name] = opener


def open_backend(name: str, spec, **options) -> Backend:
    """The backend `name` on `spec` (a file, directory or id); options such as n_ctx,
    n_threads go to its opener, which ignores those of other backends."""
    try:
        opener = BACKENDS[name]
    except KeyError:
        raise InputError(f"unknown judge backend {name!r}; known: {', '.join(BACKENDS)}") from None
    return opener(spec, **options)


def open_gguf(path: str | Path, *, n_ctx: int | None = None, n_threads: int | None = None,
              use_extra_bufts: bool = False, verbose: bool = False, n_parallel: int = 4,
              parallel_ctx: int | None = None, parallel_verdict: bool = False,
              lora_path: str | Path | None = None, chat_date: str | None = None, **_) -> GGUFBackend:
    """llama-cpp-python on a GGUF file (with a GGUF LoRA `lora_path` applied at run
    time). `chat_date` overrides the date the file records. Options of other backends
    are ignored."""
    backend = GGUFBackend(path, n_ctx=n_ctx, n_threads=n_threads, use_extra_bufts=use_extra_bufts, verbose=verbose,
                          n_parallel=n_parallel, parallel_ctx=parallel_ctx, parallel_verdict=parallel_verdict,
                          lora_path=lora_path)
    if chat_date:
        backend.chat_date = chat_date
    return backend


def open_hf(model_dir: str | Path, *, adapter: str | Path | None = None, base: str | None = None,
            n_ctx: int | None = None, n_threads: int | None = None, dtype: str = "float32",
            chat_date: str | None = None, **_) -> HFBackend:
    """transformers: a merged model directory, a LoRA adapter directory (its base is read
    from conj_lite_train.json / adapter_config.json, or `base`), `model_dir` = base with
    `adapter`, or a hub model id. `chat_date` overrides the date training recorded.
    Options of other backends are ignored."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

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
        model = model.merge_and_unload()  # judged as exported: one matmul per projection, not three
    model.eval()
    tok_dir = adapter_path if adapter_path and (adapter_path / "tokenizer_config.json").is_file() else base_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    except (OSError, ValueError) as exc:
        raise InputError(f"{tok_dir}: cannot load the tokenizer: {exc}") from None
    if not getattr(tokenizer, "chat_template", None):
        raise InputError(f"{tok_dir}: the tokenizer has no chat template")
    return HFBackend(model, tokenizer, n_ctx=n_ctx, source=str(model_dir), template=info.get("template"),
                     chat_date=chat_date or info.get("chat_date"))


register_backend("gguf", open_gguf)
register_backend("hf", open_hf)
