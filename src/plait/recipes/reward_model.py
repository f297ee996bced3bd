"""Reward-model training (``plait rm``): a scalar head on a decoder learns which of two
responses people (or a hidden scorer) prefer.

One step:

    1. the next batch of pairs    (chosen and rejected side by side, one padded batch)
    2. both responses' scores     (the decoder's last token through the head)
    3. the pairwise loss          (Bradley-Terry, optional margin and centring; or the
                                  advantage-model loss), an optimizer step

With ``rm.objective=advantage`` it trains an advantage model (Peng et al. 2023): each step
takes whole prompts, and the loss holds each prompt's mean score over its distinct
responses at 0 and the scores within a bound (algos.advantage_model_loss), so the scores
of different sub-tasks share one scale.

Held-out pairs are scored before training, every ``rm.eval_every`` steps and at the end:
pairwise accuracy against the labels, against the hidden truth when the pairs carry true
scores (the built-in ``reverse`` task's do), the score distribution (per ``source`` column
when there is one) and calibration (expected calibration error, reliability plot). The run
directory holds ``metrics.jsonl``, ``checkpoints/`` (resumed as ``plait train``'s are) and
``reward_model/``, an ``AutoModelForSequenceClassification`` directory.
"""

from __future__ import annotations

import json

import torch

from plait import algos
from plait.config import Config
from plait.models.loading import save_model_dir
from plait.models.reward_model import load_reward_model, padded_batch, sequence_scores
from plait.recipes.pairs import (
    PACK_TOKENS,
    PairJob,
    PromptGroups,
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
_AM_STATS = ("bound_penalty", "advantage_std")  # the advantage-model loss's own
# the score bound of an advantage model unless rm.score_bound says otherwise
ADVANTAGE_BOUND = 5.0
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
        rm = config.rm
        self.advantage = rm.objective == "advantage"
        self.center_coef = rm.center_coef if rm.center_coef is not None else \
            float(self.advantage)
        self.score_bound = rm.score_bound if rm.score_bound is not None else \
            (ADVANTAGE_BOUND if self.advantage else None)
        # the advantage-model loss (distinct responses, bound) whenever a bound is set
        self.am_loss = self.advantage or self.score_bound is not None
        if self.advantage:  # whole prompts a step: each prompt's mean sees all its pairs
            self.batches = PromptGroups(self.train_rows, seed=config.train.seed)

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
        self.training(self.model)
        if not rows:  # more ranks than prompts in the batch: this rank adds nothing
            loss = self.no_rows_loss(self.model.parameters())
            names = _STATS + (_AM_STATS if self.am_loss else ())
            stats, groups = dict.fromkeys(names, 0.0), 0
        else:
            chosen, rejected = self.scores(rows)                              # 2
            margin = None
            if rm.margin_field is not None:
                margin = torch.tensor([float(row[rm.margin_field]) for row in rows],
                                      device=chosen.device)
            ids = prompt_ids(rows, chosen.device)
            groups = int(ids.max()) + 1
            if self.am_loss:
                loss, stats = self.advantage_loss(batch, rows, chosen, rejected, ids, margin)
            else:
                totals = None
                if self.dist.active:
                    totals = (len(batch), len({prompt_key(row) for row in batch}))
                loss, stats = algos.bradley_terry_loss(                       # 3
                    chosen, rejected, margin=margin, center_coef=self.center_coef,
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

    def advantage_loss(self, batch: list[dict], rows: list[dict], chosen: torch.Tensor,
                       rejected: torch.Tensor, ids: torch.Tensor,
                       margin: torch.Tensor | None) -> tuple[torch.Tensor, dict]:
        """The advantage-model loss of this rank's ``rows`` of ``batch`` (each prompt's
        pairs on one rank): responses known by their prompt and text, so a response in
        several pairs counts once in its prompt's mean and the bound."""
        keys: dict[tuple, int] = {}

        def key(row: dict, side: str) -> int:
            return keys.setdefault((prompt_key(row), json.dumps(row[side])), len(keys))

        device = chosen.device
        chosen_keys = torch.tensor([key(r, "chosen") for r in rows], device=device)
        rejected_keys = torch.tensor([key(r, "rejected") for r in rows], device=device)
        totals = None
        if self.dist.active:
            everything = {(prompt_key(r), json.dumps(r[side])) for r in batch
                          for side in ("chosen", "rejected")}
            totals = (len(batch), len({prompt_key(r) for r in batch}), len(everything))
        return algos.advantage_model_loss(                                   # 3
            chosen, rejected, prompt_ids=ids, chosen_keys=chosen_keys,
            rejected_keys=rejected_keys, center_coef=self.center_coef, bound=self.score_bound,
            bound_coef=self.config.rm.bound_coef, margin=margin, totals=totals)

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
        # a tie counts one half, as against the labels
        labelled = (chosen > rejected).double() + 0.5 * (chosen == rejected)
        better = truth_of(self.eval_rows)
        right = None
        if better is not None:  # every pair carries its true scores
            right = torch.where(better, chosen > rejected, rejected > chosen).double() + \
                0.5 * (chosen == rejected)
            result["eval/accuracy_vs_truth"] = float(right.mean())
        sources = {row.get("source") for row in self.eval_rows}
        if len(sources) > 1 and None not in sources:
            for source in sorted(map(str, sources)):
                rows = [i for i, row in enumerate(self.eval_rows) if str(row["source"]) == source]
                picked = torch.cat([chosen[rows], rejected[rows]])
                result[f"eval/score_mean/{source}"] = float(picked.mean())
                result[f"eval/score_std/{source}"] = float(picked.std()) \
                    if picked.numel() > 1 else 0.0
                result[f"eval/accuracy/{source}"] = float(labelled[rows].mean())
                if right is not None:
                    result[f"eval/accuracy_vs_truth/{source}"] = float(right[rows].mean())
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
        summary["objective"] = self.config.rm.objective
        summary["center_coef"], summary["score_bound"] = self.center_coef, self.score_bound
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
