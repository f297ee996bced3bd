"""Pure RL and preference-learning math: tensors in, tensors out; no I/O, logging or devices."""

from plait.algos.advantages import (
    ESTIMATORS,
    NEEDS_CRITIC,
    AdvantageInputs,
    broadcast_seq_advantages,
    gae_advantages,
    grpo_advantages,
    outcome_to_token_rewards,
    register_estimator,
    reinforce_pp_advantages,
    rloo_advantages,
)
from plait.algos.aggregation import (
    LOSS_AGG_MODES,
    aggregate_loss,
    masked_mean,
    masked_var,
    masked_whiten,
)
from plait.algos.dapo import group_has_signal, overlong_penalty
from plait.algos.grpovi import (
    grpovi_adjust,
    grpovi_adjust_groups,
    sequence_weights_from_logprobs,
)
from plait.algos.kl import (
    KL_ESTIMATORS,
    adaptive_kl_coef,
    ema_update,
    kl_estimate,
    kl_penalty_rewards,
)
from plait.algos.policy_loss import (
    LOG_RATIOS,
    OFF_POLICY_MODES,
    RATIO_LEVELS,
    entropy_from_logits,
    off_policy_weights,
    ppo_policy_loss,
    register_log_ratio,
    sequence_logprob,
    value_loss,
)
from plait.algos.preference import (
    DPO_LOSS_TYPES,
    bradley_terry_loss,
    dpo_loss,
    pairwise_calibration,
    simpo_loss,
)

__all__ = [
    "DPO_LOSS_TYPES",
    "ema_update",
    "bradley_terry_loss",
    "dpo_loss",
    "pairwise_calibration",
    "simpo_loss",
    "ESTIMATORS",
    "NEEDS_CRITIC",
    "AdvantageInputs",
    "register_estimator",
    "LOG_RATIOS",
    "OFF_POLICY_MODES",
    "register_log_ratio",
    "off_policy_weights",
    "KL_ESTIMATORS",
    "LOSS_AGG_MODES",
    "RATIO_LEVELS",
    "adaptive_kl_coef",
    "aggregate_loss",
    "broadcast_seq_advantages",
    "entropy_from_logits",
    "gae_advantages",
    "group_has_signal",
    "grpo_advantages",
    "grpovi_adjust",
    "grpovi_adjust_groups",
    "kl_estimate",
    "kl_penalty_rewards",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "outcome_to_token_rewards",
    "overlong_penalty",
    "ppo_policy_loss",
    "reinforce_pp_advantages",
    "rloo_advantages",
    "sequence_logprob",
    "sequence_weights_from_logprobs",
    "value_loss",
]
