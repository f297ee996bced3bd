"""Preference losses: Bradley-Terry reward modelling and offline preference optimisation.

Shapes: P preference pairs; every input is a ``[P]`` tensor of one number per pair (a
reward model's score, or a response's summed or averaged log-probability).

Papers and plait's choices:
- Bradley-Terry pairwise loss, -log σ(s_c - s_r - m) (Ouyang et al. 2022, arXiv 2203.02155,
  eq. 1; DeepSpeed-Chat scores the last token). The margin m per pair is Llama 2's
  (Touvron et al. 2023, arXiv 2307.09288, eq. 2), 0 when not given.
- Centring (the Advantage Model, Peng et al. 2023, arXiv 2309.10202): the model should score
  advantage, whose mean over a prompt's responses is 0, so score distributions stay alike
  across prompts and tasks. Its exact terms are not published; plait adds
  ``center_coef`` x the mean over prompts of (that prompt's mean score)², each prompt's
  mean taken over the chosen and rejected scores of all its pairs.
- The Advantage Model (same paper), :func:`advantage_model_loss`: scores are advantages
  a(x, y) = r(x, y) - E_{y'~π}[r(x, y')]. plait's form: the pairwise term above, plus
  ``center_coef`` x the mean over prompts of (the prompt's mean advantage over its
  *distinct* responses, each counted once however many pairs hold it; with pairs of the
  policy's own samples that mean estimates E_π[a], which should be 0), plus
  ``bound_coef`` x the mean over distinct responses of max(0, |a| - bound)² (scores kept
  within ±bound, so no task's scores outgrow the others').
- DPO (Rafailov et al. 2023, arXiv 2305.18290, eq. 7): -log σ(β h) with
  h = (log π(y_c) - log π_ref(y_c)) - (log π(y_r) - log π_ref(y_r)); ``label_smoothing`` ε
  gives conservative DPO, -(1-ε) log σ(β h) - ε log σ(-β h).
- IPO (Azar et al. 2023, arXiv 2310.12036, eq. 17): (h - 1/(2β))²; pass log-probabilities
  averaged over each response's tokens, as the paper's implementation does.
- SimPO (Meng et al. 2024, arXiv 2405.14734, eq. 6), reference-free:
  -log σ(β (ā_c - ā_r) - γ) with ā the response's log-probability averaged over its tokens.
- Calibration of a reward model's pairwise judgement P(chosen ≻ rejected) = σ(s_c - s_r):
  each pair's confidence is max(p, 1 - p) and it is right when it favours the chosen
  response; the expected calibration error is Σ_b (n_b / N) |accuracy_b - confidence_b| over
  equal-width confidence bins on [0.5, 1] (Guo et al. 2017, arXiv 1706.04599, eq. 3).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["DPO_LOSS_TYPES", "advantage_model_loss", "bradley_terry_loss", "dpo_loss",
           "pairwise_calibration", "simpo_loss"]

DPO_LOSS_TYPES = ("sigmoid", "ipo")


def _check_pairs(*tensors: torch.Tensor) -> None:
    shape = tensors[0].shape
    if len(shape) != 1 or shape[0] == 0:
        raise ValueError(f"expected one value per pair, [P] with P >= 1, got shape {tuple(shape)}")
    for tensor in tensors[1:]:
        if tensor.shape != shape:
            raise ValueError(f"pair tensors differ in shape: {tuple(shape)} vs "
                             f"{tuple(tensor.shape)}")


def _accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Fraction of pairs ranked right; a tie counts one half."""
    return ((chosen > rejected).float() + 0.5 * (chosen == rejected).float()).mean()


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, *,
                       margin: torch.Tensor | None = None, center_coef: float = 0.0,
                       prompt_ids: torch.Tensor | None = None,
                       totals: tuple[int, int] | None = None
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Pairwise reward-model loss, mean over pairs, plus the optional centring penalty.

    Args:
        chosen, rejected: [P] scores of the preferred and the other response.
        margin: [P] how much more the chosen response should score (Llama 2's margin).
        center_coef: weight of the mean squared per-prompt mean score.
        prompt_ids: [P] int, pairs with the same id share a prompt (default: each pair
            its own prompt).
        totals: (pairs, prompts) of the whole batch when these pairs are one rank's share
            of it (each prompt's pairs all in one share): the loss is then this share's
            part of the batch's loss (sums over the share divided by the batch's counts),
            and the parts of all shares add up to it.

    Returns:
        (scalar loss, stats): ``accuracy`` (ties count half), ``margin`` (mean s_c - s_r),
        ``chosen`` and ``rejected`` (mean scores), ``center_penalty`` (unweighted).
    """
    _check_pairs(chosen, rejected, *(t for t in (margin, prompt_ids) if t is not None))
    if center_coef < 0:
        raise ValueError(f"center_coef must be >= 0, got {center_coef}")
    gap = chosen - rejected
    pair_losses = -F.logsigmoid(gap - margin if margin is not None else gap)
    if prompt_ids is None:
        prompt_means = (chosen + rejected) / 2
    else:
        _, index = torch.unique(prompt_ids, return_inverse=True)
        groups = int(index.max()) + 1
        sums = torch.zeros(groups, dtype=chosen.dtype, device=chosen.device)
        sums = sums.index_add(0, index, chosen).index_add(0, index, rejected)
        counts = torch.zeros(groups, dtype=chosen.dtype, device=chosen.device)
        counts = counts.index_add(0, index, torch.full_like(chosen, 2.0))
        prompt_means = sums / counts
    penalty = prompt_means.pow(2).mean()
    if totals is None:
        loss = pair_losses.mean()
        if center_coef:
            loss = loss + center_coef * penalty
    else:
        loss = pair_losses.sum() / totals[0]
        if center_coef:
            loss = loss + center_coef * prompt_means.pow(2).sum() / totals[1]
    stats = {"accuracy": _accuracy(chosen, rejected), "margin": gap.mean(),
             "chosen": chosen.mean(), "rejected": rejected.mean(), "center_penalty": penalty}
    return loss, {key: value.detach() for key, value in stats.items()}


def advantage_model_loss(chosen: torch.Tensor, rejected: torch.Tensor, *,
                         prompt_ids: torch.Tensor, chosen_keys: torch.Tensor,
                         rejected_keys: torch.Tensor, center_coef: float = 1.0,
                         bound: float | None = None, bound_coef: float = 1.0,
                         margin: torch.Tensor | None = None,
                         totals: tuple[int, int, int] | None = None
                         ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Advantage-model loss: pairwise term, per-prompt centring over distinct responses
    and a bound on the scores (see the module doc).

    Args:
        chosen, rejected: [P] advantage scores of the preferred and the other response.
        prompt_ids: [P] int, pairs with the same id share a prompt.
        chosen_keys, rejected_keys: [P] int ids of the responses: equal ids are one
            response (of one prompt), counted once in its prompt's mean and the bound.
        center_coef: weight of the mean squared per-prompt mean advantage.
        bound: scores beyond ±bound are penalised (None: no bound term).
        bound_coef: weight of the bound term.
        margin: [P] how much more the chosen response should score.
        totals: (pairs, prompts, responses) of the whole batch when these pairs are one
            rank's share of it (each prompt's pairs in one share): the loss is then this
            share's part of the batch's loss, the parts of all shares adding up to it.

    Returns:
        (scalar loss, stats): ``accuracy``, ``margin``, ``chosen``, ``rejected`` (means),
        ``center_penalty`` and ``bound_penalty`` (unweighted, means over this share),
        ``advantage_std`` (spread of the distinct responses' scores).
    """
    _check_pairs(chosen, rejected, prompt_ids, chosen_keys, rejected_keys,
                 *(t for t in (margin,) if t is not None))
    if center_coef < 0 or bound_coef < 0:
        raise ValueError(f"center_coef and bound_coef must be >= 0, got {center_coef}, "
                         f"{bound_coef}")
    if bound is not None and bound <= 0:
        raise ValueError(f"bound must be > 0, got {bound}")
    gap = chosen - rejected
    pair_losses = -F.logsigmoid(gap - margin if margin is not None else gap)
    # the distinct responses: a key's score is the same in every pair holding it (one
    # forward of one sequence), so its first appearance stands for it
    scores = torch.cat([chosen, rejected])
    keys, prompts = torch.cat([chosen_keys, rejected_keys]), torch.cat([prompt_ids, prompt_ids])
    distinct, first = torch.unique(keys, return_inverse=True)
    pick = torch.full((len(distinct),), len(keys), dtype=torch.long, device=keys.device)
    pick = pick.scatter_reduce(0, first, torch.arange(len(keys), device=keys.device), "amin")
    response_scores, response_prompts = scores[pick], prompts[pick]
    _, group = torch.unique(response_prompts, return_inverse=True)
    groups = int(group.max()) + 1
    sums = torch.zeros(groups, dtype=scores.dtype, device=scores.device).index_add(
        0, group, response_scores)
    counts = torch.zeros(groups, dtype=scores.dtype, device=scores.device).index_add(
        0, group, torch.ones_like(response_scores))
    prompt_means = sums / counts
    excess = torch.zeros_like(response_scores) if bound is None else \
        (response_scores.abs() - bound).clamp(min=0).pow(2)
    pairs_total, prompts_total, responses_total = totals or (len(chosen), groups,
                                                             len(distinct))
    loss = pair_losses.sum() / pairs_total
    if center_coef:
        loss = loss + center_coef * prompt_means.pow(2).sum() / prompts_total
    if bound is not None and bound_coef:
        loss = loss + bound_coef * excess.sum() / responses_total
    stats = {"accuracy": _accuracy(chosen, rejected), "margin": gap.mean(),
             "chosen": chosen.mean(), "rejected": rejected.mean(),
             "center_penalty": prompt_means.pow(2).mean(), "bound_penalty": excess.mean(),
             "advantage_std": response_scores.std() if len(distinct) > 1
             else torch.zeros((), dtype=scores.dtype, device=scores.device)}
    return loss, {key: value.detach() for key, value in stats.items()}


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
             reference_chosen: torch.Tensor, reference_rejected: torch.Tensor, *,
             beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO (``sigmoid``) or IPO (``ipo``) loss, mean over pairs, against a frozen reference.

    Args:
        policy_chosen, policy_rejected: [P] log-probabilities of each response under the
            policy (summed over its tokens for DPO, averaged for IPO).
        reference_chosen, reference_rejected: [P] the same under the reference (detached).
        beta: the inverse temperature β (> 0).
        loss_type: ``"sigmoid"`` (DPO) or ``"ipo"``.
        label_smoothing: ε in [0, 0.5), the assumed rate of flipped labels (sigmoid only).

    Returns:
        (scalar loss, stats): the implicit rewards β(log π - log π_ref) as ``chosen_reward``
        and ``rejected_reward`` (means), ``reward_margin`` and ``reward_accuracy``.
    """
    _check_pairs(policy_chosen, policy_rejected, reference_chosen, reference_rejected)
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {DPO_LOSS_TYPES}, got {loss_type!r}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if label_smoothing and loss_type != "sigmoid":
        raise ValueError("label_smoothing applies to loss_type='sigmoid' only")
    chosen_ratio = policy_chosen - reference_chosen
    rejected_ratio = policy_rejected - reference_rejected
    h = chosen_ratio - rejected_ratio
    if loss_type == "ipo":
        losses = (h - 1 / (2 * beta)).pow(2)
    else:
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h)
        if label_smoothing:
            losses = losses - label_smoothing * F.logsigmoid(-beta * h)
    chosen_reward = beta * chosen_ratio.detach()
    rejected_reward = beta * rejected_ratio.detach()
    stats = {"chosen_reward": chosen_reward.mean(), "rejected_reward": rejected_reward.mean(),
             "reward_margin": (chosen_reward - rejected_reward).mean(),
             "reward_accuracy": _accuracy(chosen_reward, rejected_reward)}
    return losses.mean(), stats


def simpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, *,
               beta: float, gamma: float = 0.0
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SimPO loss, mean over pairs: no reference model, length-normalised rewards.

    Args:
        policy_chosen, policy_rejected: [P] log-probabilities averaged over each
            response's tokens.
        beta: reward scale β (> 0).
        gamma: target reward margin γ (>= 0).

    Returns:
        (scalar loss, stats): rewards β ā as ``chosen_reward`` / ``rejected_reward``
        (means), ``reward_margin`` and ``reward_accuracy``.
    """
    _check_pairs(policy_chosen, policy_rejected)
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    chosen_reward, rejected_reward = beta * policy_chosen, beta * policy_rejected
    loss = -F.logsigmoid(chosen_reward - rejected_reward - gamma).mean()
    chosen_reward, rejected_reward = chosen_reward.detach(), rejected_reward.detach()
    stats = {"chosen_reward": chosen_reward.mean(), "rejected_reward": rejected_reward.mean(),
             "reward_margin": (chosen_reward - rejected_reward).mean(),
             "reward_accuracy": _accuracy(chosen_reward, rejected_reward)}
    return loss, stats


def pairwise_calibration(chosen: torch.Tensor, rejected: torch.Tensor, bins: int = 10
                         ) -> tuple[float, list[dict[str, float]]]:
    """Expected calibration error of σ(s_c - s_r), and the reliability table behind it.

    Args:
        chosen, rejected: [P] scores.
        bins: equal-width confidence bins on [0.5, 1] (the last one closed).

    Returns:
        (ECE, one dict per non-empty bin: ``low``, ``high``, ``pairs``, ``confidence``
        (mean), ``accuracy``); a tie (p = 0.5) counts as half right.
    """
    _check_pairs(chosen, rejected)
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    p = torch.sigmoid((chosen - rejected).double())
    confidence = torch.maximum(p, 1 - p)
    right = (p > 0.5).double() + 0.5 * (p == 0.5).double()
    index = ((confidence - 0.5) * 2 * bins).long().clamp(max=bins - 1)
    ece, table = 0.0, []
    for b in range(bins):
        members = index == b
        count = int(members.sum())
        if not count:
            continue
        mean_confidence = float(confidence[members].mean())
        accuracy = float(right[members].mean())
        ece += count / len(p) * abs(accuracy - mean_confidence)
        table.append({"low": 0.5 + b / (2 * bins), "high": 0.5 + (b + 1) / (2 * bins),
                      "pairs": count, "confidence": mean_confidence, "accuracy": accuracy})
    return ece, table
