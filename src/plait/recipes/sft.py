"""Supervised fine-tuning on (prompt, answer) pairs: the warm start before RL.

The loss is next-token cross-entropy on the answer tokens and the closing EOS
only (prompt tokens are context), averaged over answer tokens.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from plait.config import OptimConfig, SFTConfig
from plait.data.datasets import DataError, PromptIterator
from plait.errors import TrainingDiverged
from plait.models.loading import save_model_dir
from plait.parallel import fsdp
from plait.parallel.heartbeat import report
from plait.telemetry.metrics import MetricsLogger
from plait.telemetry.progress import ProgressBar
from plait.train.optim import build_optimizer
from plait.train.supervised import IGNORE, sft_batch, sft_loss


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
    sft_metrics = MetricsLogger(session.run_dir / "sft", tensorboard=cfg.run.tensorboard) \
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
    models.policy.eval()
    bar.close()
    if sft_metrics is not None:
        sft_metrics.close()
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
