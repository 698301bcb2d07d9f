"""Sampling engines: what runs the policy in stage S1.

An engine renders the judge prompts with the policy's chat template, counts tokens, and
writes n judgments per prompt inside the judgment frame, every judgment from its own
seeded stream: the frame, the seeds and the draw are `frame.FrameSampler`, shared by all
engines, so a judgment depends on its key and not on its batch. It also says which
policy it samples from (`policy()`, recorded in sampled_from.json). Two ship:

  transformers  HF `generate` on the model directory, the round's adapter merged in;
                the default on a GPU (4-bit, unsloth), and wherever llama.cpp is not.
  llama.cpp     llama-cpp-python on an f32 GGUF of the policy: the packaged model's own
                GGUF (`base.gguf`, the weights training dequantized) rewritten in f32, or
                the model directory converted by the export stage's converter; a round's
                adapter as a GGUF LoRA applied at run time (each made once, cached). The
                sequences of a batch decode together in one context
                (`judging.backends.ParallelDecoder`), and every token their prompts
                share is evaluated once (the prefix tree of the batch's prompts): the
                instructions, a question for its two answer orders, an order's plain
                prompt for its repeats and hinted prompts.

`sampling.engine: auto` takes llama.cpp on a CPU when llama-cpp-python is installed and
the model has a GGUF or a local directory to convert, transformers otherwise.

A new engine is a class with the `SamplingEngine` methods, an opener registered with
`register_engine("name", opener)`, and its name in `config.SAMPLING_ENGINES`.
"""

from __future__ import annotations

import gc
import importlib.util
import os
import warnings
from pathlib import Path
from typing import Callable, Protocol, Sequence

from .artifacts import fingerprint_id, path_identity
from .config import POLICY_GGUF_TYPE, Recipe, SamplingConfig
from .errors import InputError
from .frame import FrameSampler, apply_repetition_penalty, ll_tokenizer_for, round_trip_problem
from .judging.backends import GGUFBackend, ParallelDecoder, cells_needed
from .models import cuda_available, load_for_sampling, resolve_runtime
from .packaged import BASE_GGUF
from .prompts import JudgeTemplate, check_chat_template, render_prompt
from .sampling import eos_token_ids
from .sampling import generate as hf_generate
from .system import exclusive
from .tiny import cache_root

Outputs = list[list[tuple[str, str, int]]]  # per prompt, per sample: (text, finish reason, new tokens)


class SamplingEngine(Protocol):
    """What stage S1 needs from the thing that runs the policy."""

    name: str
    source: str  # the policy in words: "model dir + adapter", for the console
    mixed_counts: bool  # True: one call may mix sample counts, and neighbouring prompts share their prefix

    def prepare(self, template: JudgeTemplate, date_string: str, texts: Sequence[str]) -> None:
        """Check the chat template (as training will use it, with `date_string`) and that
        the tokenizer reads `texts` (the frame's own text, a few answers) back unchanged;
        an InputError naming the model otherwise."""

    def render(self, messages: list[dict], prefix: str = "") -> str:
        """The prompt text: chat template + generation prompt + the prefilled `prefix`."""

    def count_tokens(self, text: str) -> int: ...

    def generate(self, prompts: list[str], counts: list[int], cfg: SamplingConfig, *, seeds: list[int],
                 grammars: list[str | None] | None = None, closing_tokens: int = 0,
                 max_new_tokens: int | None = None) -> Outputs:
        """counts[i] samples of prompts[i]; `seeds` and `grammars` per sequence, prompt-major
        (the samples of prompt 0, then of prompt 1, ...). Per prompt, per sample: (text,
        "stop"|"length", new tokens). A token the grammar refuses raises frame.FrameError."""

    def policy(self) -> dict:
        """What it samples from, for provenance: the engine and the files it runs."""

    def close(self) -> None: ...


def tokenizer_problem(texts: Sequence[str], encode, decode, where: str, what: str = "tokenizer") -> None:
    """An InputError naming `where` when `decode(encode(text))` is not `text` for one of
    `texts`: the grammar and the model would read the tokens differently, and every
    framed judgment would fail (issue 22, item 15)."""
    problem = round_trip_problem(texts, encode, decode)
    if problem:
        raise InputError(f"{where}: the {what} does not read its own tokens back ({problem}); frame sampling would "
                         "fail on every judgment. Rebuild the model directory with a tokenizer that decodes "
                         "what it encodes (for a GGUF converted by transformers: its byte-level decoder)")


# ---------------------------------------------------------------- transformers


class TransformersEngine:
    """HF `generate`, batched, the prompt's KV cache shared by its samples (sampling.generate)."""

    name = "transformers"
    mixed_counts = False  # generate's return sequences are one count per call

    def __init__(self, model, tokenizer, *, source: str = "", share_prompts: bool = True):
        self.model, self.tokenizer, self.source, self.share_prompts = model, tokenizer, source, share_prompts

    def prepare(self, template: JudgeTemplate, date_string: str, texts: Sequence[str]) -> None:
        check_chat_template(self.tokenizer, template, date_string)
        encode = lambda text: self.tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
        tokenizer_problem(texts, encode, self.tokenizer.decode, self.source)
        ll = ll_tokenizer_for(self.tokenizer, eos_token_ids(self.model, self.tokenizer))
        tokenizer_problem(texts, encode, lambda ids: ll.decode_bytes(list(ids)).decode("utf-8", "replace"),
                          self.source, "grammar's view of the tokenizer")

    def render(self, messages: list[dict], prefix: str = "") -> str:
        return render_prompt(self.tokenizer, messages, prefix)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False).input_ids)

    def generate(self, prompts, counts, cfg, *, seeds, grammars=None, closing_tokens=0, max_new_tokens=None) -> Outputs:
        out: list = [None] * len(prompts)
        starts = [sum(counts[:i]) for i in range(len(counts))]
        for n in sorted(set(counts)):  # one generate call per sample count
            chosen = [i for i, c in enumerate(counts) if c == n]
            rows = [starts[i] + j for i in chosen for j in range(n)]
            samples = hf_generate(self.model, self.tokenizer, [prompts[i] for i in chosen], n, cfg,
                                  seeds=[seeds[r] for r in rows], grammars=[grammars[r] for r in rows] if grammars else None,
                                  closing_tokens=closing_tokens, max_new_tokens=max_new_tokens,
                                  share_prompts=self.share_prompts)
            for i, result in zip(chosen, samples):
                out[i] = result
        return out

    def policy(self) -> dict:
        return {"engine": self.name}  # the model and adapter are the sampling record's own inputs

    def close(self) -> None:
        self.model = None
        gc.collect()


def open_transformers(base: str, adapter: Path | None, recipe: Recipe, console=None) -> TransformersEngine:
    runtime = resolve_runtime(recipe.model)
    model, tokenizer = load_for_sampling(base, recipe.model, runtime, adapter=adapter)
    # unsloth's fast inference keeps its own cache: its prompts are not shared (untested here)
    return TransformersEngine(model, tokenizer, source=f"{base} + {adapter}" if adapter else base,
                              share_prompts=not runtime.use_unsloth)


# ---------------------------------------------------------------- llama.cpp

MAX_SEQUENCES = 256  # llama.cpp's limit on sequences in one context (LLAMA_MAX_SEQ)


class LlamaCppEngine:
    """llama-cpp-python on a GGUF of the policy (and a GGUF LoRA), held to the frame by
    the same FrameSampler as transformers: llguidance over llama.cpp's own vocabulary."""

    name = "llama.cpp"
    mixed_counts = True  # prompts of one example go together: their shared prompt is evaluated once

    def __init__(self, gguf: str | Path, *, lora: str | Path | None = None, n_ctx: int = 2048,
                 n_threads: int | None = None, source: str = "", files: dict | None = None):
        # The judge's GGUF backend: a safe load (no repacked CPU buffers), the GGUF's chat template.
        self.backend = GGUFBackend(gguf, n_ctx=n_ctx, n_threads=n_threads, lora_path=lora)
        self.llm = self.backend.llm
        self.gguf, self.lora = Path(gguf), Path(lora) if lora else None
        self.source = source or (f"{gguf} + {lora}" if lora else str(gguf))
        self.files = files or {}
        self._decoder: ParallelDecoder | None = None
        import llama_cpp

        vocab, eos = self.backend.vocab, llama_cpp.llama_vocab_eos(self.backend.vocab)
        # Every end-of-generation token ends a judgment; the EOS first (what a finished row writes).
        self.eos_ids = [eos] + [t for t in range(self.llm.n_vocab())
                                if t != eos and llama_cpp.llama_vocab_is_eog(vocab, t)]
        self._ll = None

    def ll_tokenizer(self):
        """llguidance's view of llama.cpp's vocabulary (about a second; made on first use)."""
        if self._ll is None:
            import llguidance.llamacpp

            with warnings.catch_warnings():  # its reading of the vocabulary warns once per token (49k)
                warnings.filterwarnings("ignore", "llama_token_get_attr is deprecated", DeprecationWarning)
                self._ll = llguidance.llamacpp.lltokenizer_from_vocab(self.backend.vocab, eos_token=self.eos_ids)
        return self._ll

    def prepare(self, template: JudgeTemplate, date_string: str, texts: Sequence[str]) -> None:
        check_chat_template(self.backend.chat_template, template, date_string)
        tokenizer_problem(texts, self.tokenize, self.detokenize, str(self.gguf))
        ll = self.ll_tokenizer()
        tokenizer_problem(texts, self.tokenize, lambda ids: ll.decode_bytes(list(ids)).decode("utf-8", "replace"),
                          str(self.gguf), "grammar's view of the tokenizer")

    def render(self, messages: list[dict], prefix: str = "") -> str:
        return render_prompt(self.backend.chat_template, messages, prefix)

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.llm.detokenize(list(ids)).decode("utf-8", errors="replace")

    def count_tokens(self, text: str) -> int:
        return len(self.tokenize(text))

    def decoder(self, n_seq: int, cells: int) -> ParallelDecoder:
        """A context for n_seq sequences and `cells` KV cells, grown when a batch needs more."""
        d = self._decoder
        if d is None or d.n_seq < n_seq or d.n_ctx < cells:
            if d is not None:
                d.close()
            n_seq = max(n_seq, d.n_seq if d else 0)
            cells = max(cells, d.n_ctx if d else 0)
            self._decoder = ParallelDecoder(self.llm, n_seq, -(-cells // 256) * 256, flash_attn=True)
        return self._decoder

    def generate(self, prompts, counts, cfg, *, seeds, grammars=None, closing_tokens=0, max_new_tokens=None) -> Outputs:
        import torch

        out, threads = [], torch.get_num_threads()
        # The draw is small work; torch's idle OpenMP workers would spin on the cores llama.cpp decodes on.
        torch.set_num_threads(1)
        try:
            start = row = 0
            while start < len(prompts):  # waves of at most MAX_SEQUENCES sequences
                end, rows = start + 1, counts[start]
                while end < len(prompts) and rows + counts[end] <= MAX_SEQUENCES:
                    rows += counts[end]
                    end += 1
                out += self._wave(prompts[start:end], counts[start:end], cfg, seeds[row:row + rows],
                                  grammars[row:row + rows] if grammars else None, closing_tokens,
                                  max_new_tokens or cfg.max_new_tokens)
                start, row = end, row + rows
        finally:
            torch.set_num_threads(threads)
        return out

    def _wave(self, prompts, counts, cfg, seeds, grammars, closing_tokens, budget) -> Outputs:
        import numpy as np
        import torch

        ids = [self.tokenize(p) for p in prompts]
        starts = [sum(counts[:i]) for i in range(len(counts))]  # rows are prompt-major
        owner = [i for i, c in enumerate(counts) for _ in range(c)]  # row -> prompt
        rows = len(owner)
        every = [ids[owner[r]] for r in range(rows)]  # a row is a sequence: its prompt, then its judgment
        decoder = self.decoder(rows, cells_needed(every, budget))
        sampler = FrameSampler(None, grammars or [None] * rows, seeds, temperature=cfg.temperature, top_p=cfg.top_p,
                               top_k=cfg.top_k, max_new_tokens=budget, eos_ids=self.eos_ids,
                               closing_tokens=closing_tokens,
                               ll_tokenizer=self.ll_tokenizer() if grammars and any(grammars) else None)
        n_vocab = self.llm.n_vocab()
        logits = np.empty((rows, n_vocab), dtype=np.float32)

        def keep(row, i):
            logits[row] = np.ctypeslib.as_array(decoder.logits(i), shape=(n_vocab,))

        decoder.prefill([every], lambda key, i: keep(key[1], i))  # one group: row r is sequence r
        new: list[list[int]] = [[] for _ in range(rows)]
        stopped = [False] * rows
        live, step, eos = list(range(rows)), 0, set(self.eos_ids)
        while live:
            scores = torch.from_numpy(logits[live])
            if cfg.repetition_penalty != 1.0:  # as transformers: over the prompt and the tokens so far
                seen = [ids[owner[r]] + new[r] for r in live]
                width = max(len(s) for s in seen)
                seen = torch.tensor([s + [s[0]] * (width - len(s)) for s in seen])
                scores = apply_repetition_penalty(scores, seen, cfg.repetition_penalty)
            chosen = sampler.choose(scores, step, rows=live).tolist()
            sampler.advance(live, chosen)
            step += 1
            going = []
            for row, token in zip(live, chosen):
                if token in eos:
                    stopped[row] = True
                else:
                    new[row].append(token)
                    if len(new[row]) < budget:
                        going.append(row)
            live = going
            if live:
                decoder.step({r: (len(ids[owner[r]]) + len(new[r]) - 1, new[r][-1]) for r in live}, keep)
        results = [(self.detokenize(new[r]).strip(), "stop" if stopped[r] else "length", len(new[r]))
                   for r in range(rows)]
        return [results[starts[i]:starts[i] + counts[i]] for i in range(len(prompts))]

    def policy(self) -> dict:
        return {"engine": self.name, "gguf": path_identity(self.gguf), "lora": path_identity(self.lora),
                **self.files}

    def close(self) -> None:
        if self._decoder is not None:
            self._decoder.close()
            self._decoder = None
        self.backend.close()


def gguf_of(base: str) -> Path | None:
    """The GGUF a model directory ships with (a packaged model's base.gguf), if any."""
    path = Path(base) / BASE_GGUF
    return path if path.is_file() else None


def can_convert(base: str) -> bool:
    """A local HF model directory, which the export stage's converter can turn into a GGUF."""
    return (Path(base) / "config.json").is_file()


def llama_cpp_installed() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def gguf_engine(choice: str, base: str) -> str:
    """A recipe's choice of transformers or llama.cpp for work on the model's own weights
    (training.ref_engine, data.heldout_engine); auto: llama.cpp on a CPU when
    llama-cpp-python is installed and the model has a GGUF or can be converted to one."""
    if choice != "auto":
        return choice
    if cuda_available() or not llama_cpp_installed() or not (gguf_of(base) or can_convert(base)):
        return "transformers"
    return "llama.cpp"


def choose_engine(choice: str, base: str) -> str:
    """The engine `sampling.engine` names; auto: llama.cpp on a CPU when llama-cpp-python is
    installed and the model has a GGUF or can be converted to one, transformers otherwise."""
    if choice != "auto":
        if choice not in ENGINES:
            raise InputError(f"sampling.engine: unknown engine {choice!r}; known: auto, {', '.join(ENGINES)}")
        return choice
    return gguf_engine(choice, base)


def engine_inputs(name: str, base: str, adapter: Path | None, kind: str) -> dict:
    """What an engine will read, for sampled_from.json's inputs, found without loading or
    converting anything: the engine, and for llama.cpp the GGUF it runs (the model's own,
    or one converted from the model directory, as `kind`) and how the adapter becomes a
    GGUF LoRA."""
    if name != "llama.cpp":
        return {"name": name}
    shipped = gguf_of(base)
    return {"name": name, "gguf": path_identity(shipped) if shipped else "the model directory", "as": kind,
            "lora": "the adapter as a GGUF LoRA" if adapter else None, "llama_cpp_python": _llama_cpp_version()}


def _llama_cpp_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("llama_cpp_python")
    except metadata.PackageNotFoundError:
        return None


def _converted(kind: str, source: Path, build: Callable[[Path], None]) -> Path:
    """A GGUF made from `source` by `build(out_path)`, cached by the source's identity
    (~/.cache/conj-lite/gguf/<kind>-<id>.gguf); a failed build leaves nothing. Processes
    that ask at once (the GPU check's training workers) build it once: the others wait."""
    key = fingerprint_id({"source": path_identity(source), "llama_cpp_python": _llama_cpp_version()})
    out = cache_root() / "gguf" / f"{kind}-{key}.gguf"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with exclusive(out):
        if not out.is_file():
            staging = out.with_name(f"{out.name}.{os.getpid()}.building")
            try:
                build(staging)
                os.replace(staging, out)
            finally:
                staging.unlink(missing_ok=True)
    return out


def policy_gguf(base: str, adapter: Path | None, recipe: Recipe, console=None, *, setting: str = "sampling.engine",
                instead: str = "sample with HF generate", kind: str = POLICY_GGUF_TYPE) -> tuple[Path, Path | None, dict]:
    """(model GGUF, GGUF LoRA or None, what was converted) of the policy, made once and
    cached: the model's own GGUF (a packaged model's base.gguf, the weights training
    dequantized) rewritten as `kind` (f32: POLICY_GGUF_TYPE; f16; q8_0), or else its
    directory converted to such a GGUF by the export stage's converter; the adapter
    converted to a GGUF LoRA of the same type (f32 for a quantized `kind`: llama.cpp applies
    a LoRA beside the weights, whatever their type). A model with neither a GGUF nor a
    directory to convert is an InputError that names the recipe `setting` and what to set it to."""
    from .export import UNQUANTIZED_FTYPES, convert_lora_to_gguf, convert_to_gguf, find_converter, quantize_gguf
    from .prompts import load_template
    from .system import usable_cpus

    instead = f"set {setting}=transformers to {instead} instead"
    lora_kind = kind if kind in UNQUANTIZED_FTYPES else "f32"
    shipped = gguf_of(base)
    if shipped is not None:
        gguf = _converted(f"model-{kind}", shipped, lambda out: quantize_gguf(
            shipped, out, kind, threads=usable_cpus(), allow_requantize=True))
        files = {"gguf_from": {"file": path_identity(shipped)["digest"], "as": kind}}
    elif can_convert(base):
        if console is not None:
            console.print(f"sample: converting {base} to an {kind} GGUF for llama.cpp (once, cached)", highlight=False)
        template = load_template(recipe.prompts.template)
        try:
            gguf = _converted(f"model-{kind}", Path(base), lambda out: convert_to_gguf(
                Path(base), out, find_converter(console=console), outtype=kind, template=template,
                name="policy", log_path=out.with_name(out.name + ".log")))
        except InputError as exc:
            raise InputError(f"{base}: cannot convert the model to a GGUF for {setting}=llama.cpp: {exc}\n"
                             f"{instead}") from None
        files = {"gguf_from": {"model": path_identity(base)["digest"], "as": kind}}
    else:
        raise InputError(f"{base}: {setting}=llama.cpp needs a GGUF of the policy, and this model has none "
                         f"and is not a local model directory to convert; {instead}")
    lora = None
    if adapter is not None:
        try:
            lora = _converted(f"lora-{lora_kind}", Path(adapter), lambda out: convert_lora_to_gguf(
                adapter, out, base, converter=find_converter(console=console, lora=True), outtype=lora_kind,
                log_path=out.with_name(out.name + ".log")))
        except InputError as exc:
            raise InputError(f"{adapter}: cannot convert the adapter to a GGUF LoRA for {setting}=llama.cpp: "
                             f"{exc}\n{instead}") from None
        files["lora_from"] = {"adapter": path_identity(adapter)["digest"], "as": lora_kind}
    return gguf, lora, files


def open_llama_cpp(base: str, adapter: Path | None, recipe: Recipe, console=None) -> LlamaCppEngine:
    if not llama_cpp_installed():
        raise InputError('sampling.engine=llama.cpp needs llama-cpp-python: pip install "conj-lite[export]" '
                         "(or set sampling.engine=transformers)")
    gguf, lora, files = policy_gguf(base, adapter, recipe, console, kind=recipe.sampling.gguf_type)
    source = f"{gguf}" + (f" + {lora} (the adapter {adapter})" if lora else "")
    return LlamaCppEngine(gguf, lora=lora, n_ctx=recipe.model.max_seq_length, source=source, files=files)


# ---------------------------------------------------------------- the registry


ENGINES: dict[str, Callable[..., SamplingEngine]] = {}


def register_engine(name: str, opener: Callable[..., SamplingEngine]) -> None:
    """Make `opener(base, adapter, recipe, console=None)` the engine called `name`."""
    ENGINES[name] = opener


def open_engine(name: str, base: str, adapter: Path | None, recipe: Recipe, console=None) -> SamplingEngine:
    """The engine `name` ("auto" resolved first) on the policy base (+ adapter)."""
    return ENGINES[choose_engine(name, base)](base, adapter, recipe, console=console)


register_engine("transformers", open_transformers)
register_engine("llama.cpp", open_llama_cpp)
