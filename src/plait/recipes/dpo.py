"""Offline preference optimisation (``plait dpo``): the policy learns from pairs directly,
with no reward model and no generation in the loop.

One step:

    1. the next batch of pairs      (chosen and rejected side by side, one padded batch)
    2. the policy's log-probability of each response (summed over its tokens, and their
                                     count for the length-normalised losses)
    3. the loss against the reference's log-probabilities, computed once for every pair
       before training and kept (DPO, IPO), or without a reference (SimPO); an optimizer
       step

Held-out pairs are scored before training, every ``dpo.eval_every`` steps and at the end:
the loss, the share of pairs whose implicit reward ranks them as labelled (and as the
hidden truth ranks them, for the built-in task), the reward margin; and, for the built-in
task, the greedy answers' true score on held-out prompts. The trained policy is saved as
``dpo_model/`` (an ``AutoModelForCausalLM`` directory); checkpoints resume exactly.
"""

from __future__ import annotations

import torch

from plait import algos
from plait.config import Config
from plait.models.loading import freeze, load_causal_lm, save_model_dir
from plait.recipes.pairs import PACK_TOKENS, PairJob, pair_experience, truth_of
from plait.recipes.stepjob import rank_job, run_step_job
from plait.runtime import inputs
from plait.telemetry.metrics import read_metrics
from plait.telemetry.plots import plot_metrics
from plait.train.forward import response_logprobs
from plait.train.optim import build_optimizer

_STATS = ("chosen_reward", "rejected_reward", "reward_margin", "reward_accuracy")
_PANELS = (("preference loss", ("loss/preference", "eval/loss")),
           ("pairs ranked right", ("eval/accuracy", "eval/accuracy_vs_truth",
                                   "train/reward_accuracy")),
           ("held-out true score (greedy)", ("eval/true_score",)))


class DPOTrainer(PairJob):
    """One ``plait dpo`` job: model.path trained on pairs against a frozen reference."""

    NAME = "policy"
    COMMAND = "dpo"

    def build(self) -> None:
        config, dpo = self.config, self.config.dpo
        self.policy = load_causal_lm(self.model_dir, config.model.attn_implementation,
                                     key="model.path").to(self.device)
        for index, row in enumerate(self.train_rows + self.eval_rows):
            row["_pair"] = index  # the row of the reference cache
        self.reference_logps = None
        if dpo.loss != "simpo":  # the reference's log-probs of every pair, once
            ref_dir = config.model.ref_path or self.model_dir
            reference = freeze(load_causal_lm(
                ref_dir, config.model.attn_implementation,
                key="model.ref_path" if config.model.ref_path else "model.path"
            ).to(self.device))
            with torch.no_grad():
                rows = self.train_rows + self.eval_rows
                sums = [self.logps(reference, rows[i:i + 64])[0] for i in range(0, len(rows), 64)]
            self.reference_logps = torch.cat(sums)  # [pairs, 2]: chosen, rejected
            del reference
        self.optimizer, self.scheduler = build_optimizer(
            self.policy.parameters(), config.optim, lr=dpo.lr, total_steps=dpo.steps)
        self.task = inputs.job_task(config) if config.pairs.train_path is None else None

    def saved_models(self) -> dict:
        return {self.NAME: self.policy}

    def shares_response_prefix(self) -> bool:
        """DPO's sigmoid loss reads a pair through the difference of its responses'
        summed log-probabilities, so the tokens both responses begin with (whose terms
        are equal in both) are left out; its logged chosen and rejected rewards are then
        those of the rest (their margin is unchanged). IPO and SimPO average over each
        whole response."""
        return self.config.dpo.loss == "sigmoid"

    def shown(self, metrics: dict) -> dict:
        shown = {"loss": metrics["loss/preference"], "acc": metrics["train/reward_accuracy"]}
        if "eval/accuracy" in metrics:
            shown["eval_acc"] = metrics["eval/accuracy"]
        return shown

    # ------------------------------------------------------------------ the step

    def logps(self, model, rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """``[P, 2]`` log-probabilities of the chosen and rejected responses (summed over
        their tokens after the pair's shared start, end token included: see
        :meth:`shares_response_prefix`) and ``[P, 2]`` their token counts. A pair's
        shared start is computed once and both responses attend to it, packed into
        sequences with no padding (:func:`response_logprobs` with shared prompts), which
        equals the forward of each ``[prompt | response]`` row."""
        batch = pair_experience(rows, self.encode, self.tokenizer.pad_token_id
                                ).to(self.device)
        token = response_logprobs(model, batch, share_prompts=True, pack_tokens=PACK_TOKENS)
        summed = (token * batch.response_mask).sum(-1)
        counts = batch.response_mask.sum(-1)
        return (torch.stack([summed[0::2], summed[1::2]], -1),
                torch.stack([counts[0::2], counts[1::2]], -1))

    def loss(self, rows: list[dict], logps=None) -> tuple[torch.Tensor, dict]:
        """The preference loss of ``rows`` and its statistics (``logps``: the policy's
        :meth:`logps` of them, when already computed)."""
        dpo = self.config.dpo
        summed, counts = logps or self.logps(self.policy, rows)                 # 2
        if dpo.loss == "simpo":
            mean = summed / counts.clamp(min=1)
            return algos.simpo_loss(mean[:, 0], mean[:, 1], beta=dpo.beta,      # 3
                                    gamma=dpo.simpo_gamma)
        reference = self.reference_logps[torch.tensor([row["_pair"] for row in rows])]
        reference = reference.to(summed.device)
        if dpo.loss == "ipo":  # IPO compares per-token averages
            summed, reference = summed / counts.clamp(min=1), reference / counts.clamp(min=1)
        return algos.dpo_loss(summed[:, 0], summed[:, 1], reference[:, 0], reference[:, 1],
                              beta=dpo.beta, loss_type=dpo.loss,
                              label_smoothing=dpo.label_smoothing)

    def step(self) -> dict[str, float]:
        batch = self.batches.next_batch(self.config.dpo.batch_size)           # 1
        rows, weight = self.share(batch)
        self.training(self.policy)
        if rows:
            loss, stats = self.loss(rows)
            loss = loss * weight  # this share's part of the batch's mean
            stats = {key: float(value) for key, value in stats.items()}
        else:  # more ranks than pairs in the batch: this rank adds nothing
            loss = self.no_rows_loss(self.policy.parameters())
            stats = dict.fromkeys(_STATS, 0.0)
        stats = self.weighted_mean(stats, weight)
        (loss_value,) = self.all_sum([float(loss.detach())])
        self.check_finite(loss_value, "preference", "dpo.lr")
        norm = self.clip_and_step(loss, self.policy.parameters())
        return {"loss/preference": loss_value, "grad_norm": norm,
                "lr": self.scheduler.get_last_lr()[0],
                **{f"train/{key}": value for key, value in stats.items()}}

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self, tag: str, chunk: int = 64) -> dict[str, float]:
        """Held-out pairs as the policy's implicit reward ranks them; the greedy answers'
        true score on the built-in task."""
        self.policy.eval()
        losses, margins, right, truth_right = [], [], [], []
        better = truth_of(self.eval_rows)
        for start in range(0, len(self.eval_rows), chunk):
            rows = self.eval_rows[start:start + chunk]
            logps = self.logps(self.policy, rows)
            loss, stats = self.loss(rows, logps)
            losses.append(float(loss) * len(rows))
            margins.append(float(stats["reward_margin"]) * len(rows))
            right.append(float(stats["reward_accuracy"]) * len(rows))
            if better is not None:  # the implicit reward's ranking against the truth
                truth_right.append(self._agrees_with_truth(rows, logps,
                                                           better[start:start + chunk]))
        n = len(self.eval_rows)
        result = {"eval/loss": sum(losses) / n, "eval/accuracy": sum(right) / n,
                  "eval/reward_margin": sum(margins) / n}
        if truth_right:
            result["eval/accuracy_vs_truth"] = sum(truth_right) / n
        if self.task is not None:
            result["eval/true_score"] = self.greedy_task_score(
                self.policy, self.eval_rows, self.encode.encode.prompt)
        self.state["evals"][tag] = result
        return result

    def _agrees_with_truth(self, rows: list[dict], logps, better: torch.Tensor) -> float:
        """Pairs of ``rows`` whose implicit-reward order is the true order (a count; ties
        count one half, as in the accuracy against the labels)."""
        dpo = self.config.dpo
        summed, counts = logps
        if dpo.loss == "simpo":
            margin = (summed / counts.clamp(min=1)) @ torch.tensor([1.0, -1.0],
                                                                   device=summed.device)
        else:
            reference = self.reference_logps[torch.tensor([r["_pair"] for r in rows])]
            ratio = summed - reference.to(summed.device)
            if dpo.loss == "ipo":
                ratio = ratio / counts.clamp(min=1)
            margin = ratio[:, 0] - ratio[:, 1]
        margin = margin.cpu()  # a tie (the policy still its reference) counts one half
        right = torch.where(better, margin > 0, margin < 0).double() + 0.5 * (margin == 0)
        return float(right.sum())

    # ------------------------------------------------------------------ outputs

    def write_outputs(self, summary: dict) -> None:
        out = save_model_dir(self.policy, self.tokenizer, self.run_dir / "dpo_model")
        summary["dpo_model_dir"] = str(out)
        plot_metrics(read_metrics(self.run_dir / "metrics.jsonl"), self.run_dir / "metrics.png",
                     panels=_PANELS, title=f"preference optimisation ({self.config.dpo.loss})")


def train_dpo(config: Config) -> dict:
    """Run a ``plait dpo`` job end to end (on runtime.num_ranks processes) and return
    its summary."""
    return run_step_job(DPOTrainer, config, run_rank)


def run_rank(config: Config, world) -> dict:
    """One rank of a launched ``plait dpo`` job."""
    return rank_job(DPOTrainer, config, world)
