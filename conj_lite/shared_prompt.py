"""DPO + alpha*SFT with each pair's prompt computed once.

TRL's DPOTrainer runs a pair as two rows, prompt + chosen and prompt + rejected, and
takes the logits of the whole vocabulary at every position of both. A judge's pair
shares a prompt of a hundred or more tokens and differs in a few: verdict-only, chosen
and rejected are the verdict and the turn's end. Here a pair is one row,

    prompt | chosen | rejected

in which the rejected tokens do not see the chosen ones (a block attention mask) and
take the positions the chosen ones have (position ids), so each completion is read
exactly as in its own row. Logits are taken only where a completion token is predicted.
The forward and backward passes cover the prompt once instead of twice, and no
vocabulary-sized tensor over the prompt exists.

The loss terms are TRL's for Con-J's objectives (loss_type sigmoid and sft, with their
weights); `tests/test_shared_prompt.py` checks loss and gradients against TRL's own
two-row computation on the same pairs. With the sft term alone (training.objective=sft,
the supervised ceiling and RISE's warm-up) a row is prompt | chosen, and no reference
pass runs. Anything else DPOTrainer offers (other loss types, label smoothing, WPO
weighting, liger) is refused here and trains with TRL's DPOTrainer as it is.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F

PROMPT, CHOSEN, REJECTED, PAD = 0, 1, 2, 3
SUPPORTED_LOSSES = {"sigmoid", "sft"}


def truncate(prompt: list[int], chosen: list[int], rejected: list[int], max_length: int | None):
    """Keep the start, as TRL does for each of its two rows: the prompt up to
    `max_length`, each completion up to what is left."""
    if max_length is None:
        return prompt, chosen, rejected
    prompt = prompt[:max_length]
    room = max_length - len(prompt)
    return prompt, chosen[:room], rejected[:room]


def pack(prompt: list[int], chosen: list[int], rejected: list[int], max_length: int | None = None):
    """One pair's row, truncated to `max_length`: (ids, position ids, segments)."""
    prompt, chosen, rejected = truncate(prompt, chosen, rejected, max_length)
    p, c, r = len(prompt), len(chosen), len(rejected)
    ids = prompt + chosen + rejected
    positions = list(range(p + c)) + list(range(p, p + r))
    segments = [PROMPT] * p + [CHOSEN] * c + [REJECTED] * r
    return ids, positions, segments


def predictors(p: int, c: int, r: int) -> tuple[list[int], list[int]]:
    """Where in the row each chosen and each rejected token is predicted: the position
    before it in its own branch (the prompt's last token for each completion's first)."""
    chosen = list(range(p - 1, p + c - 1))
    rejected = ([p - 1] if r else []) + list(range(p + c, p + c + r - 1))
    return chosen, rejected


def branch_mask(segments: torch.Tensor) -> torch.Tensor:
    """(batch, 1, L, L) boolean attention mask, True where a query may attend: causal, the
    prompt seen by everything after it, each completion only by itself, padding by no
    one (a padding query sees itself, so no attention row is empty)."""
    length = segments.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=segments.device).tril()
    query, key = segments[:, :, None], segments[:, None, :]
    allowed = causal & (key != PAD) & ((key == PROMPT) | (key == query))
    allowed |= torch.eye(length, dtype=torch.bool, device=segments.device)
    return allowed[:, None]


def _pad(rows: list[list[int]], value: int, multiple: int = 1) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0)
    width = -(-width // multiple) * multiple
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long).reshape(len(rows), width)


@dataclass
class SharedPromptCollator:
    """Batches of TRL-tokenized pairs (prompt_ids, chosen_ids, rejected_ids, and
    ref_*_logps when precomputed) as one row per pair."""

    pad_token_id: int
    max_length: int | None = None
    pad_to_multiple_of: int = 1
    rejected: bool = True  # False: the SFT term alone, which never reads the rejected branch

    def __call__(self, examples: list[dict]) -> dict:
        ids, positions, segments = [], [], []
        targets = {"chosen": ([], []), "rejected": ([], [])}
        for ex in examples:
            rejected = ex["rejected_ids"] if self.rejected else []
            branches = truncate(ex["prompt_ids"], ex["chosen_ids"], rejected, self.max_length)
            row_ids, row_pos, row_seg = pack(*branches)
            ids.append(row_ids)
            positions.append(row_pos)
            segments.append(row_seg)
            p, c, r = map(len, branches)
            at_chosen, at_rejected = predictors(p, c, r)
            targets["chosen"][0].append(at_chosen)
            targets["chosen"][1].append(row_ids[p:p + c])
            targets["rejected"][0].append(at_rejected)
            targets["rejected"][1].append(row_ids[p + c:])
        m = self.pad_to_multiple_of
        seg = _pad(segments, PAD, m)
        batch = {
            "input_ids": _pad(ids, self.pad_token_id, m),
            "position_ids": _pad(positions, 0, m),
            "attention_mask": branch_mask(seg),
            "segments": seg,
        }
        for name, (at, tokens) in targets.items():
            batch[f"{name}_at"] = _pad(at, 0)
            batch[f"{name}_tokens"] = _pad(tokens, 0)
            batch[f"{name}_mask"] = _pad([[1] * len(t) for t in tokens], 0)
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            if key in examples[0]:
                batch[key] = torch.tensor([float(ex[key]) for ex in examples])
        return batch


def completion_logps(model, batch: dict) -> dict:
    """Per-token log-probabilities of the chosen and rejected tokens (zero where masked),
    from one forward pass that makes logits only at the positions that predict them."""
    at = torch.cat([batch["chosen_at"], batch["rejected_at"]], dim=1)
    keep = at.unique()  # sorted: the row positions whose logits are needed
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"], use_cache=False, logits_to_keep=keep)
    rows = torch.arange(at.shape[0], device=at.device)[:, None]
    logits = out.logits[rows, torch.searchsorted(keep, at)].float()  # (batch, chosen + rejected tokens, vocab)
    tokens = torch.cat([batch["chosen_tokens"], batch["rejected_tokens"]], dim=1)
    mask = torch.cat([batch["chosen_mask"], batch["rejected_mask"]], dim=1)
    logsumexp = logits.logsumexp(-1)
    token_logps = (logits.gather(-1, tokens[..., None]).squeeze(-1) - logsumexp) * mask
    n = batch["chosen_at"].shape[1]
    return {"chosen": token_logps[:, :n], "rejected": token_logps[:, n:], "logits": logits.detach(),
            "logsumexp": logsumexp.detach(), "mask": mask}


def make_trainer_class():
    """DPOTrainer with the shared-prompt step (TRL is imported here, after unsloth)."""
    from accelerate.utils import is_peft_model
    from trl import DPOTrainer
    from trl.models.utils import disable_gradient_checkpointing
    from trl.trainer.utils import use_adapter

    class SharedPromptDPOTrainer(DPOTrainer):
        """TRL's DPOTrainer (data preparation, schedule, checkpoints, logging) with the
        pair's prompt computed once in each step: `conj_lite.shared_prompt`."""

        def __init__(self, model, args, processing_class, reference_logps=None, **kwargs):
            # reference_logps(dataset, max_length, name) -> (chosen, rejected): the reference's
            # log-probabilities of every row of the dataset TRL calls `name` ("train", "eval"),
            # computed elsewhere (conj_lite/reference.py).
            self._reference_logps = reference_logps
            losses = set(args.loss_type if isinstance(args.loss_type, list) else [args.loss_type])
            if (losses - SUPPORTED_LOSSES or args.label_smoothing or args.use_weighting or args.ld_alpha is not None
                    or args.use_liger_kernel or args.f_divergence_type != "reverse_kl"):
                raise ValueError(f"the shared-prompt DPO step trains loss types {sorted(SUPPORTED_LOSSES)} without "
                                 "label smoothing, weighting, ld_alpha, liger or f-divergences; use TRL's DPOTrainer")
            tokenizer = getattr(processing_class, "tokenizer", processing_class)
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            # With the SFT term alone (training.objective=sft) a row is prompt | chosen: no
            # rejected branch and no reference pass, only the chosen judgment's tokens.
            self.dpo_term = "sigmoid" in losses
            # Given here, not after: TRL precomputes the reference log-probabilities inside __init__.
            kwargs["data_collator"] = SharedPromptCollator(pad, args.max_length, args.pad_to_multiple_of or 1,
                                                           rejected=self.dpo_term)
            super().__init__(model=model, args=args, processing_class=processing_class, **kwargs)
            if self.aux_loss_enabled or self._is_vision_dataset:
                raise ValueError("the shared-prompt DPO step trains text-only models without router losses; "
                                 "use TRL's DPOTrainer")

        def _precompute_ref_logps(self, dataset, name, batch_size):
            if self._reference_logps is None:
                return super()._precompute_ref_logps(dataset, name, batch_size)
            chosen, rejected = self._reference_logps(dataset, self.args.max_length, name)
            return dataset.add_column("ref_chosen_logps", chosen).add_column("ref_rejected_logps", rejected)

        def _reference(self):
            if self.ref_model is None and is_peft_model(self.model):
                model = self.accelerator.unwrap_model(self.model)
                return self.model, use_adapter(model, adapter_name="ref" if "ref" in model.peft_config else None)
            return self.ref_model or self.model, contextlib.nullcontext()

        def _compute_ref_log_probs(self, model, inputs):
            ref_model, context = self._reference()
            with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs), \
                    context:
                ref = completion_logps(ref_model, inputs)
            return ref["chosen"].sum(1), ref["rejected"].sum(1)

        def _compute_loss(self, model, inputs, return_outputs):
            mode = "train" if self.model.training else "eval"
            policy = completion_logps(model, inputs)
            chosen_logps, rejected_logps = policy["chosen"].sum(1), policy["rejected"].sum(1)
            chosen_logratios = rejected_logratios = None
            if self.dpo_term:
                if self.precompute_ref_logps:
                    ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
                else:
                    ref_chosen, ref_rejected = self._compute_ref_log_probs(model, inputs)
                chosen_logratios = chosen_logps - ref_chosen
                rejected_logratios = rejected_logps - ref_rejected
            chosen_mask = inputs["chosen_mask"].bool()
            loss = 0.0
            for loss_type, weight in zip(self.loss_types, self.loss_weights, strict=True):
                if loss_type == "sigmoid":
                    term = -F.logsigmoid(self.beta * (chosen_logratios - rejected_logratios)).mean()
                else:  # sft: token-mean cross-entropy on the chosen completions
                    term = -policy["chosen"][chosen_mask].mean()
                loss = loss + term * weight
            self._log(mode, inputs, policy, chosen_logps, rejected_logps, chosen_logratios, rejected_logratios)
            return (loss, SimpleNamespace(logits=None)) if return_outputs else loss

        def _log(self, mode, inputs, policy, chosen_logps, rejected_logps, chosen_logratios, rejected_logratios):
            gather = self.accelerator.gather_for_metrics
            metrics = self._metrics[mode]
            mask = policy["mask"].bool()
            logits = policy["logits"][mask]  # entropy = logsumexp - E_p[logit]
            entropy = policy["logsumexp"][mask] - (logits.softmax(-1) * logits).sum(-1)
            metrics["entropy"].append(gather(entropy.mean()).mean().item())
            if mode == "train":
                self._total_train_tokens += gather((inputs["segments"] != PAD).sum()).sum().item()
            metrics["num_tokens"] = [self._total_train_tokens]
            chosen_mask = inputs["chosen_mask"].bool()
            chosen_logits = policy["logits"][:, :chosen_mask.shape[1]]
            hits = (chosen_logits.argmax(-1) == inputs["chosen_tokens"]) & chosen_mask
            metrics["mean_token_accuracy"].append((gather(hits.sum()).sum() / gather(chosen_mask.sum()).sum()).item())
            if chosen_logratios is None:  # the SFT term alone: no rewards, no rejected branch
                metrics["logps/chosen"].append(gather(chosen_logps.detach()).mean().item())
                return
            chosen_rewards = self.beta * chosen_logratios.detach()
            rejected_rewards = self.beta * rejected_logratios.detach()
            metrics["rewards/chosen"].append(gather(chosen_rewards).mean().item())
            metrics["rewards/rejected"].append(gather(rejected_rewards).mean().item())
            metrics["rewards/accuracies"].append(gather((chosen_rewards > rejected_rewards).float()).mean().item())
            metrics["rewards/margins"].append(gather(chosen_rewards - rejected_rewards).mean().item())
            metrics["logps/chosen"].append(gather(chosen_logps.detach()).mean().item())
            metrics["logps/rejected"].append(gather(rejected_logps.detach()).mean().item())

    return SharedPromptDPOTrainer
