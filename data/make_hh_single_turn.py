"""Write data/hh_harmless_single_turn.jsonl.gz: the single-turn conversations of
Anthropic HH-RLHF harmless-base test (MIT), lines unchanged.

    python data/make_hh_single_turn.py [PATH/TO/harmless-base-test.jsonl.gz]

A line is kept when both transcripts have exactly one Human and one Assistant turn.
The output is written with a fixed gzip header (no name, time 0), so the same input
gives the same bytes.
"""

import gzip
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE.parent.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"
OUT = HERE / "hh_harmless_single_turn.jsonl.gz"


def single_turn(line: str) -> bool:
    row = json.loads(line)
    return all(row[k].count("\n\nHuman:") == 1 and row[k].count("\n\nAssistant:") == 1 for k in ("chosen", "rejected"))


def main(source: Path = SOURCE) -> int:
    with gzip.open(source, "rt", encoding="utf-8") as handle:
        kept = [line for line in handle if line.strip() and single_turn(line)]
    with OUT.open("wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as handle:
        handle.write("".join(kept).encode("utf-8"))
    print(f"{len(kept)} single-turn conversations -> {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else SOURCE))
