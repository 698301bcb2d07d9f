"""Judging: a trained judge at work, on one pair or a whole data set.

    from conj_lite.judging import open_judge, evaluate, write_report
    judge = open_judge("runs/tiny/gguf/judge-q4_k_m.gguf")        # or a model/adapter dir, "tiny", a hub id
    judge.compare("What is 7 + 5?", "12", "13").verdict          # "A"
    report = evaluate(judge, pairs)                               # accuracy both ways, bias, calibration

Modules, each using only those above it:

  verdicts     the pure core: verdict position and grammar, P(answer 1) from two logits, results
  backends     the `Backend` protocol and its registry: gguf (llama-cpp-python), hf (transformers)
  judge        `Judge` (both orders, context fitting, P(A better)) and `open_judge(spec)`
  batch        `judge_pairs`: the one resumable loop over a data set; `judge_file` into a JSONL
  calibration  pure metrics: ECE, reliability bins, the risk-controlled threshold
  selective    abstain below the calibrated threshold; marks judged records
  probes       bias probes: position, verbosity padding, injected instructions
  evaluation   `evaluate` and the report (report.json, report.md, plots)
  verify       `verify_export`: each GGUF against the merged model it came from
"""

from .backends import BACKENDS, Backend, GGUFBackend, HFBackend, open_backend, register_backend
from .batch import JudgeFileSummary, judge_file, judge_pairs, pair_key
from .evaluation import EvalReport, PairOutcome, evaluate, print_report, write_report
from .judge import Judge, choose_backend, open_judge
from .verdicts import MODES, JudgeResult, OrderJudgment, combine
from .verify import VerifyReport, verify_export

__all__ = [
    "BACKENDS", "Backend", "GGUFBackend", "HFBackend", "open_backend", "register_backend",
    "JudgeFileSummary", "judge_file", "judge_pairs", "pair_key",
    "EvalReport", "PairOutcome", "evaluate", "print_report", "write_report",
    "Judge", "choose_backend", "open_judge",
    "MODES", "JudgeResult", "OrderJudgment", "combine",
    "VerifyReport", "verify_export",
]
