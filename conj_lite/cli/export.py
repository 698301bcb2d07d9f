"""`conj-lite export`: merge an adapter and write GGUF files (stage S4 on its own).

The options that are recipe fields (`export.*`) come from ExportConfig with its
defaults; the rest say where things are."""

from __future__ import annotations

from pathlib import Path

from ..config import ExportConfig
from ..errors import InputError
from ..export import CONVERTER_OUTTYPES, MERGE_DTYPES, QUANT_TYPES, export_gguf, parse_quant_types
from ..pipeline import final_adapter_of
from .options import add_config_args, config_from_args

EXPORT_FIELDS = ("outtype", "quant_types", "llama_cpp_dir", "verify", "ollama_modelfile")


def add_command(subparsers) -> None:
    p = subparsers.add_parser(
        "export",
        help="S4: merge the adapter and write GGUF files (f16 + quantized) with llama.cpp's converter",
        description="Merge the LoRA adapter into 16-bit weights (OUT/merged), convert it with llama.cpp's own "
        "converter (OUT/gguf/<name>-f16.gguf) and quantize it in-process (OUT/gguf/<name>-<type>.gguf). "
        "Finished outputs are skipped on a re-run. Known quantization types: " + ", ".join(QUANT_TYPES) + ".",
    )
    p.add_argument("--out", required=True, help="run directory: reads the adapter its recipe trained last "
                   "(OUT/adapter, or OUT/round-N/adapter after `rounds: N`), writes OUT/merged and OUT/gguf")
    p.add_argument("--adapter", help="LoRA adapter (or transformers model) directory; default: the run's final "
                   "adapter (see --out)")
    p.add_argument("--base", help="base model id or path; default: the one recorded with the adapter")
    add_config_args(
        p, ExportConfig, EXPORT_FIELDS,
        flags={"quant_types": ["--quant", "--quant-types"], "llama_cpp_dir": ["--llama-cpp", "--llama-cpp-dir"],
               "ollama_modelfile": ["--ollama", "--ollama-modelfile"]},
        choices={"outtype": CONVERTER_OUTTYPES}, metavars={"llama_cpp_dir": "DIR", "verify": "N"},
    )
    p.add_argument("--name", default="judge", help="file name stem: gguf/<name>-<type>.gguf (default judge)")
    p.add_argument("--template", help="judge template to embed (default: the one recorded with the adapter)")
    p.add_argument("--merge-dtype", default="auto", choices=MERGE_DTYPES,
                   help="dtype of the merged weights (auto: the base's bf16/f16, else float16)")
    p.add_argument("--verify-data", metavar="PATH", help="pairs for --verify (default: built-in sanity pairs)")
    p.add_argument("--threads", type=int, default=0, help="quantization/verify threads (0: all cores)")
    p.add_argument("--force", action="store_true", help="redo every step even if its output is up to date")
    p.set_defaults(func=run)


def run(args) -> int:
    out = Path(args.out)
    # a run directory: the adapter its recipe trained last (round-N/adapter after `rounds: N`)
    adapter = Path(args.adapter) if args.adapter else (final_adapter_of(out) or out / "adapter")
    if not args.adapter and not adapter.exists():
        raise InputError(f"{adapter}: no adapter here; train first (conj-lite train) or pass --adapter")
    cfg = config_from_args(ExportConfig, args, EXPORT_FIELDS)
    export_gguf(
        adapter,
        out,
        outtype=cfg.outtype,
        quant_types=parse_quant_types(cfg.quant_types),
        llama_cpp_dir=cfg.llama_cpp_dir,
        verify=cfg.verify,
        ollama_modelfile=cfg.ollama_modelfile,
        base=args.base,
        template=args.template,
        name=args.name,
        merge_dtype=args.merge_dtype,
        verify_data=args.verify_data,
        threads=args.threads,
        force=args.force,
    )
    return 0
