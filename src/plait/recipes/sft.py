"""Supervised fine-tuning: ``plait sft`` (:class:`SFTTrainer`), and the warm start of
``plait train`` before RL (:func:`warm_start`).

The loss is next-token cross-entropy on the answer tokens and the closing EOS (or a
conversation's assistant turns) only, prompt tokens being context, averaged over those
tokens.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable

import torch

from plait.config import Config, ConfigError, OptimConfig, SFTConfig
from plait.data.datasets import DataError, PromptIterator, load_text_rows
from plait.errors import TrainingDiverged
from plait.models.loading import PromptEncoder, load_causal_lm, save_model_dir
from plait.parallel import fsdp
from plait.parallel.heartbeat import report
from plait.recipes.stepjob import StepJob, metrics_logger, rank_job, run_step_job
from plait.runtime import inputs
from plait.telemetry.metrics import read_metrics
from plait.telemetry.plots import plot_metrics
from plait.telemetry.progress import ProgressBar
from plait.train.forward import drives_layers, position_ids_from_mask, segment_logits
from plait.train.optim import build_optimizer
from plait.train.supervised import (
    IGNORE,
    SupervisedEncoder,
    next_token_stats,
    packed_examples,
    padded_examples,
    sft_batch,
    sft_loss,
)


def check_sft_rows(rows: list[dict], who: str = "the SFT warm start",
                   instead: str = "set sft.steps=0") -> None:
    """Every row needs an answer to imitate; name the first that lacks one."""
    for index, row in enumerate(rows):
        if row.get("answer") is None:
            raise DataError(f"{who} needs an 'answer' field, but train row {index + 1} has "
                            f"only {sorted(row)}; map a column with "
                            f"data.fields={{answer: COLUMN}} or {instead}")


def _sft_step_loss(model, tokenizer, batch, encode_prompt, device, dist):
    """The loss to backpropagate and the batch's mean loss (to report)."""
    if dist is None:
        input_ids, attention_mask, labels = sft_batch(batch, encode_prompt, tokenizer)
        loss = sft_loss(model, input_ids.to(device), attention_mask.to(device),
                        labels.to(device))
        return loss, loss.detach()
    lo, hi = dist.shard_bounds(len(batch))
    input_ids, attention_mask, labels = sft_batch(batch[lo:hi], encode_prompt, tokenizer)
    summed = sft_loss(model, input_ids.to(device), attention_mask.to(device),
                      labels.to(device), reduction="sum")
    totals = torch.tensor([float((labels[:, 1:] != IGNORE).sum()), float(summed.detach())],
                          dtype=torch.float64)
    dist.all_reduce(totals, kind="metrics")
    loss = summed / totals[0].item() * dist.world_size
    return loss, torch.tensor(totals[1].item() / totals[0].item())


def supervised_warm_start(model, tokenizer, rows: list[dict], cfg: SFTConfig, *,
                          encode_prompt: Callable[[str], list[int]], seed: int,
                          device: torch.device, on_step: Callable[[int, float], None] | None = None,
                          dist=None, optimizer_implementation: str = "auto",
                          autocast: Callable[[], contextlib.AbstractContextManager] | None = None
                          ) -> list[float]:
    """Train ``model`` in place for ``cfg.steps`` steps; returns the loss of each step.

    With ``dist`` (sharded ranks, whose backward averages gradients over ranks), every rank
    draws the same batch and trains its contiguous share of the rows; the loss is
    normalised by the batch's total answer tokens, so the update is the one-process one.
    ``autocast``: the context the forwards run in (the session's model.dtype compute)."""
    optim_cfg = OptimConfig(lr=cfg.lr, warmup_steps=cfg.warmup_steps, schedule="cosine",
                            min_lr_ratio=0.1, max_grad_norm=1.0,
                            implementation=optimizer_implementation)
    optimizer, scheduler = build_optimizer(model.parameters(), optim_cfg, total_steps=cfg.steps)
    data = PromptIterator(rows, seed=seed + 1)
    model.train()
    losses = []
    for step in range(cfg.steps):
        batch = data.next_batch(cfg.batch_size)
        with autocast() if autocast is not None else contextlib.nullcontext():
            loss, value = _sft_step_loss(model, tokenizer, batch, encode_prompt, device, dist)
        if not torch.isfinite(value):
            raise FloatingPointError(f"SFT loss became {float(value)} at step {step + 1}; "
                                     "lower sft.lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), optim_cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        losses.append(value.item())
        if on_step is not None:
            on_step(step + 1, losses[-1])
    return losses


def warm_start(session) -> None:
    """The RL job's start: evaluate the initial model, then (sft.steps > 0) fine-tune it
    on the training rows' answers, save it as ``sft_model/`` (the reference of the RL
    stage) and evaluate it again. Sharded ranks each train their share of every batch;
    otherwise rank 0 trains and the others take its weights."""
    cfg, dist = session.config, session.dist
    if cfg.sft.steps > 0:
        check_sft_rows(session.train_rows)
    session.evaluate("initial")
    if cfg.sft.steps <= 0:
        return
    report("supervised warm start")
    if session.models.sharded:  # every rank trains its shard of each SFT batch
        _train_and_save(session)
    else:
        if dist.is_main:
            _train_and_save(session)
        dist.barrier()
        # every rank continues from rank 0's warm-started weights
        dist.broadcast_tensors(list(session.policy.state_dict().values()), src=0,
                               kind="weights")
    session.state["reference_dir"] = str(session.run_dir / "sft_model")
    session.evaluate("after_sft")


def _train_and_save(session) -> None:
    cfg, models = session.config, session.models
    main = session.dist.is_main
    bar = ProgressBar(cfg.sft.steps, "sft", disable=None if cfg.run.progress else True,
                      silent=not main)
    # the warm start's trackers run beside the job's (wandb/, mlruns/), named <run>-sft
    sft_metrics = metrics_logger(cfg, session.run_dir / "sft", tracker_dir=session.run_dir,
                                 run_name=f"{session.run_dir.resolve().name}-sft") \
        if main else None

    def on_step(step: int, loss: float) -> None:
        bar.update(1, loss=loss)
        if sft_metrics is not None:
            sft_metrics.log(step, {"sft/loss": loss})

    try:
        supervised_warm_start(models.policy, session.tokenizer, session.train_rows, cfg.sft,
                              encode_prompt=session.encode_prompt, seed=cfg.train.seed,
                              device=session.device, on_step=on_step,
                              dist=session.dist if models.sharded else None,
                              optimizer_implementation=cfg.optim.implementation,
                              autocast=models.autocast)
    except FloatingPointError as err:
        raise TrainingDiverged(str(err)) from None
    finally:  # end the trackers' runs on an error too
        if sft_metrics is not None:
            sft_metrics.close()
    models.policy.eval()
    bar.close()
    model = models.policy
    if models.sharded:  # every rank joins the gathering; rank 0 writes
        weights, _ = fsdp.full_state(models.policy)
        if not main:
            return
        model = fsdp.plain_model(models.twins["policy"], weights)
    try:
        save_model_dir(model, session.tokenizer, session.run_dir / "sft_model")
    finally:
        if model is not models.policy:
            fsdp.release(model)


# ---------------------------------------------------------------------- plait sft

_PANELS = (("next-token loss (answer tokens)", ("loss/sft", "eval/loss")),
           ("answer tokens predicted", ("train/token_accuracy", "eval/token_accuracy")),
           ("held-out greedy accuracy", ("eval/accuracy",)))


class SFTTrainer(StepJob):
    """One ``plait sft`` job: model.path fine-tuned on supervised examples.

    One step:

        1. the next batch of examples  (prompt and answer, plain text, or a conversation)
        2. their tokens, padded one example per row or packed (``sft.packing``)
        3. next-token loss on the answer / assistant tokens only, averaged over them;
           an optimizer step

    Held-out examples are scored before training, every ``sft.eval_every`` steps and at
    the end: loss and token accuracy, and for a built-in task the greedy answers'
    accuracy on held-out prompts. The model is saved as ``sft_model/``."""

    NAME = "policy"
    COMMAND = "sft"

    def load_data(self) -> tuple[list[dict], list[dict]]:
        config, data = self.config, self.config.data
        if config.sft.steps <= 0:
            raise ConfigError("plait sft trains for sft.steps steps, which is 0 (the default "
                              "that leaves plait train without a warm start); set "
                              "sft.steps=N")
        self.encode_prompt = PromptEncoder(self.tokenizer, config.model.chat_template)
        self.encode = SupervisedEncoder(self.tokenizer, self.encode_prompt)
        if data.train_path is not None:
            options = dict(split=data.split, fields=data.fields or None)
            train = load_text_rows(data.train_path, **options)
            if data.eval_path is not None:
                held_out = load_text_rows(data.eval_path, **options)[:data.num_eval]
            elif len(train) > data.num_eval:
                held_out, train = train[-data.num_eval:], train[:-data.num_eval]
            else:
                raise ConfigError(f"data.train_path has {len(train)} rows, not enough to hold "
                                  f"out data.num_eval={data.num_eval}; set data.eval_path or "
                                  "lower data.num_eval")
        else:
            self.task = inputs.job_task(config)
            train = self.task.make_rows(data.num_train, seed=config.train.seed, split="train")
            held_out = self.task.make_rows(data.num_eval, seed=config.train.seed, split="test")
            check_sft_rows(train, "plait sft", "use data rows with answers")
        return self._encoded(train, "training"), self._encoded(held_out, "held-out")

    def _encoded(self, rows: list[dict], which: str) -> list[dict]:
        """Rows with their tokens (``_ids``, ``_learn``), within sft.max_length."""
        limit, kept = self.config.sft.max_length, []
        for index, row in enumerate(rows):
            ids, learn = self.encode(row)
            if not any(learn[1:]):
                raise DataError(f"{which} row {index + 1} has no answer tokens to learn")
            if len(ids) > limit:
                if self.config.sft.bad_rows == "error":
                    raise DataError(f"{which} row {index + 1} has {len(ids)} tokens, more "
                                    f"than sft.max_length={limit}; raise it, or set "
                                    "sft.bad_rows=drop to leave such rows out")
                self.dropped["too_long"] += 1
                continue
            kept.append({**row, "_ids": ids, "_learn": learn})
        if not kept:
            raise DataError(f"no {which} row is within sft.max_length={limit} tokens")
        return kept

    def build(self) -> None:
        config, sft = self.config, self.config.sft
        self.policy = load_causal_lm(self.model_dir, config.model.attn_implementation,
                                     key="model.path").to(self.device)
        self.packed = sft.packing
        if sft.packing and not drives_layers(self.policy):
            if self.dist.is_main:
                print(f"plait: note: sft.packing: plait does not drive the layers of a "
                      f"{self.policy.config.model_type!r} model with "
                      f"{config.model.attn_implementation!r} attention; examples are padded "
                      "one per row instead", flush=True)
            self.packed = False
        optim = dataclasses.replace(config.optim, warmup_steps=sft.warmup_steps)
        self.optimizer, self.scheduler = build_optimizer(
            self.policy.parameters(), optim, lr=sft.lr, total_steps=sft.steps)

    def saved_models(self) -> dict:
        return {self.NAME: self.policy}

    def compile_models(self) -> None:
        if not self.config.sft.packing:
            raise ConfigError("train.compile compiles plait sft's packed passes: set "
                              "sft.packing=true, or train.compile=false")
        super().compile_models()

    def data_summary(self) -> dict:
        return {"examples": len(self.train_rows), "eval_examples": len(self.eval_rows)}

    def shown(self, metrics: dict) -> dict:
        shown = {"loss": metrics["loss/sft"]}
        if "eval/loss" in metrics:
            shown["eval_loss"] = metrics["eval/loss"]
        return shown

    # ------------------------------------------------------------------ the step

    def stats(self, rows: list[dict]) -> tuple[torch.Tensor, int, int]:
        """Summed loss over the rows' learned tokens, their count, and how many of them
        are the model's most likely next token."""
        examples = [(row["_ids"], row["_learn"]) for row in rows]
        pad = self.tokenizer.pad_token_id
        if self.packed:
            ids, positions, segment, labels = (t.to(self.device) for t in packed_examples(
                examples, self.config.sft.max_length, pad))
            logits = segment_logits(self.policy, ids, positions, segment)
        else:
            ids, mask, labels = (t.to(self.device) for t in padded_examples(examples, pad))
            logits = self.policy(input_ids=ids, attention_mask=mask,
                                 position_ids=position_ids_from_mask(mask),
                                 use_cache=False).logits
        return next_token_stats(logits, labels)

    def step(self) -> dict[str, float]:
        batch = self.batches.next_batch(self.config.sft.batch_size)           # 1
        rows, _ = self.share(batch)
        self.training(self.policy)
        if rows:
            summed, tokens, correct = self.stats(rows)                        # 2
        else:
            summed = self.no_rows_loss(self.policy.parameters())
            tokens = correct = 0
        total_tokens, total_loss, total_correct = self.all_sum(
            [tokens, float(summed.detach()), correct])
        loss = summed / max(total_tokens, 1)                                  # 3
        self.check_finite(total_loss, "SFT", "sft.lr")
        norm = self.clip_and_step(loss, self.policy.parameters())
        return {"loss/sft": total_loss / max(total_tokens, 1), "grad_norm": norm,
                "lr": self.scheduler.get_last_lr()[0],
                "train/token_accuracy": total_correct / max(total_tokens, 1),
                "train/tokens": total_tokens}

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self, tag: str, chunk: int = 64) -> dict[str, float]:
        self.policy.eval()
        loss, tokens, correct = 0.0, 0, 0
        for start in range(0, len(self.eval_rows), chunk):
            summed, n, right = self.stats(self.eval_rows[start:start + chunk])
            loss, tokens, correct = loss + float(summed), tokens + n, correct + right
        result = {"eval/loss": loss / max(tokens, 1),
                  "eval/token_accuracy": correct / max(tokens, 1)}
        if self.task is not None:
            result["eval/accuracy"] = self.greedy_task_score(self.policy, self.eval_rows,
                                                             self.encode_prompt)
        self.state["evals"][tag] = result
        return result

    # ------------------------------------------------------------------ outputs

    def write_outputs(self, summary: dict) -> None:
        out = save_model_dir(self.policy, self.tokenizer, self.run_dir / "sft_model")
        summary["sft_model_dir"] = str(out)
        plot_metrics(read_metrics(self.run_dir / "metrics.jsonl"), self.run_dir / "metrics.png",
                     panels=_PANELS, title="supervised fine-tuning")


def train_sft(config: Config) -> dict:
    """Run a ``plait sft`` job end to end (on runtime.num_ranks processes) and return its
    summary."""
    return run_step_job(SFTTrainer, config, run_rank)


def run_rank(config: Config, world) -> dict:
    """One rank of a launched ``plait sft`` job."""
    return rank_job(SFTTrainer, config, world)
