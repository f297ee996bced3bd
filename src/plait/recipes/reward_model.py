"""Reward-model training (``plait rm``): a scalar head on a decoder learns which of two
responses people (or a hidden scorer) prefer.

One step:

    1. the next batch of pairs    (chosen and rejected side by side, one padded batch)
    2. both responses' scores     (the decoder's last token through the head)
    3. the pairwise loss          (Bradley-Terry, optional margin and centring), an
                                  optimizer step

Held-out pairs are scored before training, every ``rm.eval_every`` steps and at the end:
pairwise accuracy against the labels, against the hidden truth when the pairs carry true
scores (the built-in ``reverse`` task's do), the score distribution (per ``source`` column
when there is one) and calibration (expected calibration error, reliability plot). The run
directory holds ``metrics.jsonl``, ``checkpoints/`` (resumed as ``plait train``'s are) and
``reward_model/``, an ``AutoModelForSequenceClassification`` directory.
"""

from __future__ import annotations

import torch

from plait import algos
from plait.config import Config
from plait.models.loading import save_model_dir
from plait.models.reward_model import load_reward_model, padded_batch, sequence_scores
from plait.recipes.pairs import (
    PACK_TOKENS,
    PairJob,
    pair_experience,
    prompt_ids,
    prompt_key,
    truth_of,
)
from plait.recipes.stepjob import rank_job, run_step_job
from plait.telemetry.metrics import read_metrics
from plait.telemetry.plots import plot_metrics, plot_reliability, plot_score_distribution
from plait.train.forward import packed_sequence_scores
from plait.train.optim import build_optimizer

_STATS = ("accuracy", "margin", "chosen", "rejected", "center_penalty")
_PANELS = (("pairwise loss", ("loss/pairwise",)),
           ("pairs judged right", ("eval/accuracy", "eval/accuracy_vs_truth", "train/accuracy")),
           ("calibration error", ("eval/ece",)))


class RewardModelTrainer(PairJob):
    """One ``plait rm`` job: a scalar head on model.path's decoder, trained on pairs."""

    NAME = "reward_model"
    COMMAND = "rm"

    def build(self) -> None:
        config = self.config
        self.model = load_reward_model(self.model_dir, pad_token_id=self.tokenizer.pad_token_id,
                                       seed=config.train.seed,
                                       attn_implementation=config.model.attn_implementation,
                                       key="model.path").to(self.device)
        self.optimizer, self.scheduler = build_optimizer(
            self.model.parameters(), config.optim, lr=config.rm.lr, total_steps=config.rm.steps)

    def saved_models(self) -> dict:
        return {self.NAME: self.model}

    def shown(self, metrics: dict) -> dict:
        shown = {"loss": metrics["loss/pairwise"], "acc": metrics["train/accuracy"]}
        if "eval/accuracy" in metrics:
            shown["eval_acc"] = metrics["eval/accuracy"]
        return shown

    # ------------------------------------------------------------------ the step

    def scores(self, rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores of the chosen and the rejected responses, ``[P]`` each: a pair's
        prompt computed once and its two responses packed after it (no padding), or, for
        a model whose layers plait does not drive, both sequences as padded rows."""
        batch = pair_experience(rows, self.encode, self.tokenizer.pad_token_id)
        scores = packed_sequence_scores(self.model, batch.to(self.device), PACK_TOKENS)
        if scores is not None:
            return scores[0::2], scores[1::2]
        encoded = [self.encode(row) for row in rows]
        ids, mask = padded_batch([c for c, _ in encoded] + [r for _, r in encoded],
                                  self.tokenizer.pad_token_id)
        scores = sequence_scores(self.model, ids.to(self.device), mask.to(self.device))
        return scores[:len(rows)], scores[len(rows):]

    def step(self) -> dict[str, float]:
        rm = self.config.rm
        batch = self.batches.next_batch(rm.batch_size)                        # 1
        rows, weight = self.share(batch, key=prompt_key)
        self.model.train()
        if not rows:  # more ranks than prompts in the batch: this rank adds nothing
            loss = self.no_rows_loss(self.model.parameters())
            stats, groups = dict.fromkeys(_STATS, 0.0), 0
        else:
            chosen, rejected = self.scores(rows)                              # 2
            margin = None
            if rm.margin_field is not None:
                margin = torch.tensor([float(row[rm.margin_field]) for row in rows],
                                      device=chosen.device)
            ids = prompt_ids(rows, chosen.device)
            groups = int(ids.max()) + 1
            totals = None
            if self.dist.active:
                totals = (len(batch), len({prompt_key(row) for row in batch}))
            loss, stats = algos.bradley_terry_loss(                           # 3
                chosen, rejected, margin=margin, center_coef=rm.center_coef,
                prompt_ids=ids, totals=totals)
            stats = {key: float(value) for key, value in stats.items()}
        penalty = stats.pop("center_penalty")
        stats = self.weighted_mean(stats, weight)
        loss_value, penalty_sum, group_total = self.all_sum(
            [float(loss.detach()), penalty * groups, groups])
        stats["center_penalty"] = penalty_sum / max(group_total, 1)
        self.check_finite(loss_value, "reward-model", "rm.lr")
        norm = self.clip_and_step(loss, self.model.parameters())
        return {"loss/pairwise": loss_value, "grad_norm": norm,
                "lr": self.scheduler.get_last_lr()[0],
                **{f"train/{key}": value for key, value in stats.items()}}

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self, tag: str, chunk: int = 64) -> dict[str, float]:
        """Scores of every held-out pair and what they say about the model."""
        self.model.eval()
        parts = [self.scores(self.eval_rows[i:i + chunk])
                 for i in range(0, len(self.eval_rows), chunk)]
        chosen = torch.cat([c for c, _ in parts]).double().cpu()
        rejected = torch.cat([r for _, r in parts]).double().cpu()
        _, stats = algos.bradley_terry_loss(chosen, rejected)
        ece, table = algos.pairwise_calibration(chosen, rejected)
        both = torch.cat([chosen, rejected])
        result = {"eval/accuracy": float(stats["accuracy"]), "eval/ece": ece,
                  "eval/margin": float(stats["margin"]), "eval/score_mean": float(both.mean()),
                  "eval/score_std": float(both.std()) if both.numel() > 1 else 0.0}
        better = truth_of(self.eval_rows)
        if better is not None:  # every pair carries its true scores
            right = torch.where(better, chosen > rejected, rejected > chosen).double() + \
                0.5 * (chosen == rejected)  # a tie counts one half, as against the labels
            result["eval/accuracy_vs_truth"] = float(right.mean())
        sources = {row.get("source") for row in self.eval_rows}
        if len(sources) > 1 and None not in sources:
            for source in sorted(map(str, sources)):
                rows = [i for i, row in enumerate(self.eval_rows) if str(row["source"]) == source]
                picked = torch.cat([chosen[rows], rejected[rows]])
                result[f"eval/score_mean/{source}"] = float(picked.mean())
                result[f"eval/score_std/{source}"] = float(picked.std()) \
                    if picked.numel() > 1 else 0.0
        self.state["evals"][tag] = result
        self.state["reliability"] = table
        self._scores = {"chosen": chosen.tolist(), "rejected": rejected.tolist()}
        if len(sources) > 1 and None not in sources:
            self._scores = {
                str(source): [v for row, c, r in zip(self.eval_rows, chosen.tolist(),
                                                     rejected.tolist(), strict=True)
                              if str(row["source"]) == str(source) for v in (c, r)]
                for source in sorted(map(str, sources))}
        return result

    # ------------------------------------------------------------------ outputs

    def write_outputs(self, summary: dict) -> None:
        out = save_model_dir(self.model, self.tokenizer, self.run_dir / self.NAME)
        summary["reward_model_dir"] = str(out)
        evals = self.state["evals"]
        plot_metrics(read_metrics(self.run_dir / "metrics.jsonl"), self.run_dir / "metrics.png",
                     panels=_PANELS, title="reward model")
        plot_reliability(self.state["reliability"], self.run_dir / "reliability.png",
                         title=f"held-out calibration (ECE {evals['final']['eval/ece']:.3f})")
        plot_score_distribution(self._scores, self.run_dir / "scores.png",
                                title="held-out scores after training")


def train_reward_model(config: Config) -> dict:
    """Run a ``plait rm`` job end to end (on runtime.num_ranks processes) and return its
    summary."""
    return run_step_job(RewardModelTrainer, config, run_rank)


def run_rank(config: Config, world) -> dict:
    """One rank of a launched ``plait rm`` job."""
    return rank_job(RewardModelTrainer, config, world)
