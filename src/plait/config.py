"""Typed configuration: the single source of truth for every option.

Each section is a dataclass whose fields carry their own documentation
(``doc``), and optional range checks (``low`` / ``high``) or choices (a
``Literal`` type). YAML files and ``key=value`` command-line overrides are
only layers on top of the defaults; the resolved config is frozen and never
mutated while a job runs.

Errors are :class:`ConfigError` with the dotted key, the source (file or
command line), what was wrong, and, for unknown keys, the nearest valid key.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from plait.errors import PlaitError


class ConfigError(PlaitError, ValueError):
    """A config value or key is invalid; the message says which, where, and what to do."""


def opt(default: Any = dataclasses.MISSING, doc: str = "", *, low: float | None = None,
        high: float | None = None, factory: Any = None) -> Any:
    """A documented config field with optional inclusive bounds ``low``/``high``."""
    meta = {"doc": doc, "low": low, "high": high}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


# --------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class TinyModelConfig:
    """Shape of the built-in tiny model (used when ``model.path: tiny``)."""

    arch: Literal["qwen2", "llama", "qwen3", "mistral"] = opt(
        "qwen2", "Architecture family of the tiny model.")
    hidden_size: int = opt(128, "Hidden width.", low=8)
    intermediate_size: int = opt(384, "MLP width.", low=8)
    num_layers: int = opt(4, "Number of decoder blocks.", low=1)
    num_heads: int = opt(4, "Attention heads.", low=1)
    num_kv_heads: int = opt(2, "Key/value heads (grouped-query attention).", low=1)
    max_position_embeddings: int = opt(512, "Longest sequence the model supports.", low=16)
    seed: int = opt(0, "Seed of the random initialisation.")


@dataclass(frozen=True)
class ModelConfig:
    """Which model to train and how to load it."""

    path: str = opt("tiny", "Local directory of a HF causal LM (config, weights, tokenizer), "
                    "or 'tiny' to build the tiny character-level model in the run directory.")
    tiny: TinyModelConfig = opt(doc="Tiny-model shape, used when path is 'tiny'.",
                                factory=TinyModelConfig)
    dtype: Literal["float32", "bfloat16"] = opt(
        "float32", "Compute dtype. Weights and optimizer state stay float32; 'bfloat16' runs "
        "forward passes (SFT warm start included) under autocast (for GPUs).")
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = opt(
        "auto", "Attention kernels of the loaded models ('auto' = transformers' default, "
        "sdpa). 'eager' can be faster for tiny models on CPU; 'flash_attention_2' needs the "
        "flash-attn package, a GPU and rollout.engine=hf.")
    chat_template: Literal["auto", "always", "never"] = opt(
        "auto", "Wrap prompts in the tokenizer's chat template: 'auto' when it has one.")
    ref_path: str | None = opt(None, "Reference model directory; default: the initial policy.")
    critic_path: str | None = opt(None, "Critic backbone directory (PPO); default: the policy's.")


@dataclass(frozen=True)
class DataConfig:
    """Where prompts come from: a built-in synthetic task or local files."""

    task: str | None = opt("addition", "Built-in synthetic task ('addition', 'repeat', "
                           "'reverse'), or null to read prompts from train_path.")
    task_args: dict[str, Any] = opt(doc="Keyword arguments for the task, e.g. {digits: 3}.",
                                    factory=dict)
    train_path: str | None = opt(None, "JSONL / Parquet file or local HF dataset directory.")
    eval_path: str | None = opt(None, "Held-out prompts (same formats); default: the task's "
                                "test split, or a slice of train_path.")
    ptx_path: str | None = opt(None, "PTX data (algo.ptx_coef): rows of `text` (loss on every "
                               "token) or of prompt and answer/completion/response (loss on "
                               "the answer), same formats; null: the training rows.")
    split: str = opt("train", "Split to read from a DatasetDict directory.")
    fields: dict[str, str] = opt(doc="Map plait's field names to dataset columns, e.g. "
                                 "{prompt: question, answer: solution}; a mapped column also "
                                 "keeps its own name, so reward functions get both.",
                                 factory=dict)
    num_train: int = opt(50000, "Rows generated for a synthetic task's train split.", low=1)
    num_eval: int = opt(200, "Held-out rows used for evaluation.", low=1)
    max_prompt_tokens: int = opt(256, "Prompts longer than this are rejected with the row named.",
                                 low=1)


@dataclass(frozen=True)
class SFTConfig:
    """Supervised fine-tuning: ``plait sft``, and the warm start of ``plait train``
    before RL (steps=0 skips it)."""

    steps: int = opt(0, "Optimizer steps of SFT (plait sft, or the warm start of plait "
                     "train).", low=0)
    batch_size: int = opt(64, "Examples per SFT step.", low=1)
    lr: float = opt(1e-3, "SFT learning rate.", low=0.0)
    warmup_steps: int = opt(20, "Linear warmup steps.", low=0)
    eval_every: int = opt(0, "plait sft: held-out loss and accuracy every N steps (0: "
                          "before and after training only).", low=0)
    packing: bool = opt(False, "plait sft: pack each batch's examples into rows of up to "
                        "max_length tokens, each example attending only to itself (the same "
                        "loss as one row per example, less padding).")
    max_length: int = opt(1024, "plait sft: longest example in tokens, and the packed row "
                          "length.", low=2)
    bad_rows: Literal["error", "drop"] = opt(
        "error", "plait sft: an example longer than max_length stops the job naming it "
        "('error'), or is left out and counted ('drop').")


@dataclass(frozen=True)
class RolloutConfig:
    """Generation settings for rollouts."""

    engine: Literal["plait", "hf"] = opt(
        "plait", "Generation engine: 'plait' (KV-cache slots, continuous batching, groups "
        "streamed to reward scoring as they finish) or 'hf' (transformers' generate).")
    max_new_tokens: int = opt(16, "Longest completion, in tokens.", low=1)
    temperature: float = opt(1.0, "Sampling temperature (0 = greedy).", low=0.0)
    top_p: float = opt(1.0, "Nucleus sampling mass.", low=0.0, high=1.0)
    top_k: int = opt(0, "Top-k sampling (0 = off).", low=0)
    stop: list[str] = opt(doc="Strings that end a completion (text after them is cut).",
                          factory=list)
    batch_size: int = opt(256, "Most sequences generated at once (engine slots).", low=1)
    release_kv_cache: bool | None = opt(
        None, "Free the plait engine's KV cache after each generation, so training can use "
        "that memory (the hybrid engine); null = on CUDA only. It is reallocated at the "
        "next generation. Rollout workers apart never free it (nothing trains there).")
    prefill_tokens: int = opt(
        16384, "plait engine: the most (distinct contexts x longest context) one prefill "
        "pass takes; more waiting requests are admitted at the next decode steps. Bounds "
        "the memory of admitting many long prompts, or re-prefilling long unfinished rows "
        "(after new weights mid-generation, a resume) at once.", low=1)
    sync_every: int | None = opt(
        None, "plait engine: decode steps between device-to-host transfers of the sampled "
        "tokens (stop checks, refilling freed slots); null = 1 on CPU, 4 on CPU with "
        "rollout.compile, 8 on CUDA. Larger values keep a GPU busy; finished rows compute "
        "until the next check. With rollout.compile on the CPU, a run of greedy and seeded "
        "rows is one compiled call of this many steps (less overhead per token, about this "
        "many times the compile time).", low=1)
    compile: bool = opt(
        False, "plait engine: run the decode step, and the draw of greedy and seeded tokens, "
        "through torch.compile (symbolic shapes: one compilation for every batch size and "
        "length). Graphs are compiled when first needed: runs that sample seeded rows, runs "
        "that draw greedy tokens only (evaluation), and one-step graphs for unseeded or "
        "top-k/top-p rows (sampled eagerly from the logits) and for runs at the end of the "
        "KV cache; on the CPU compiling is slow (longer the more steps a graph holds) and "
        "needs a C++ compiler (Triton on a GPU). Prefill stays eager unless "
        "rollout.compile_prefill; the engine of FSDP-sharded trainers stays eager (rollout "
        "workers apart compile theirs).")
    compile_prefill: bool = opt(
        False, "plait engine with rollout.compile: compile the prefill too (symbolic rows "
        "and width). Pays where prompts are admitted many times a generation, a few at a "
        "time (evaluation with many samples a prompt: each admission prefills a few short "
        "prompts, mostly per-operation overhead when eager); costs one more compilation.")
    fuse_forwards: bool = opt(
        True, "Compute reference log-probs and critic values of finished groups while the "
        "rest of the batch still generates (streaming engine only).")


@dataclass(frozen=True)
class AlgoConfig:
    """The RL algorithm: advantages, losses, KL, and reward shaping."""

    name: Literal["grpo", "ppo"] = opt("grpo", "'grpo' (critic-free, groups) or 'ppo' (critic, GAE).")
    prompts_per_step: int = opt(8, "Prompts drawn per RL step.", low=1)
    group_size: int = opt(8, "Completions per prompt (G). PPO may use 1.", low=1)
    advantage: Literal["auto", "grpo", "drgrpo", "rloo", "reinforce++", "gae"] = opt(
        "auto", "Advantage estimator; 'auto' = grpo for GRPO, gae for PPO.")
    gamma: float = opt(1.0, "Discount for GAE / REINFORCE++.", low=0.0, high=1.0)
    lam: float = opt(0.95, "GAE lambda.", low=0.0, high=1.0)
    epochs: int = opt(1, "Passes over each rollout batch (PPO epochs).", low=1)
    mini_batches: int = opt(1, "Optimizer steps per epoch (the batch is split in this many).",
                            low=1)
    micro_batch_size: int = opt(64, "Sequences per forward/backward; gradients accumulate.",
                                low=1)
    micro_batch_tokens: int | None = opt(
        None, "Token budget per micro-batch: rows sorted by length and packed while rows x "
        "padded width stays within it (micro_batch_size still caps the rows).", low=1)
    skip_zero_advantage: bool = opt(
        True, "Leave rows whose every advantage is exactly 0 (e.g. GRPO groups with equal "
        "rewards) out of the update's forward and backward when nothing else in the loss "
        "needs them (no KL or entropy term, no critic): they add 0 to the gradient and the "
        "loss normalisers still count them, so the update is the same. Per-token policy "
        "statistics are then over the rows trained.")
    share_prompt_forward: bool = opt(
        True, "Teacher-forced forwards (update, old and reference log-probs) run each "
        "distinct prompt of a micro-batch once and its responses against the cached keys "
        "and values, instead of every [prompt | response] row in full; same result.")
    pack_group_tokens: int = opt(
        1024, "With share_prompt_forward: a prompt and its responses are packed into "
        "sequences of at most this many tokens (a sequence holds at least one response, "
        "with the prompt again in each), each response attending to the prompt and to itself; "
        "no response is padded to the longest and a group's attention is one problem instead "
        "of one per row. How each group is split is chosen by a cost model (tokens through "
        "the layers, padding included, plus attention, which grows with the square of a "
        "sequence's length and outweighs the rest past ~N/(2 x attention width x layers) "
        "tokens for N layer weights: ~770 for the tiny default model); this cap bounds a "
        "sequence's mask memory. 0: responses run as padded "
        "rows against the prompt's cached keys and values. Same result either way; models "
        "whose layers plait does not drive take the cached path.", low=0)
    use_engine_logprobs: bool = opt(
        False, "Use the rollout engine's sampled-token log-probs as the old log-probs "
        "instead of a recompute pass (when a batch gets several updates).")
    clip_low: float = opt(0.2, "PPO clip epsilon below 1.", low=0.0)
    clip_high: float = opt(0.2, "PPO clip epsilon above 1 (clip-higher: set > clip_low).",
                           low=0.0)
    dual_clip: float | None = opt(None, "Dual-clip bound c > 1 for negative advantages.", low=1.0)
    ratio_level: Literal["token", "sequence"] = opt(
        "token", "Importance ratio per token (PPO/GRPO) or per sequence (GSPO).")
    loss_agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                      "seq-mean-token-sum-norm"] = opt("token-mean", "Loss aggregation.")
    loss_norm_constant: float | None = opt(
        None, "Divisor for seq-mean-token-sum-norm; default rollout.max_new_tokens.", low=1.0)
    kl_coef: float = opt(0.0, "KL-to-reference coefficient (0 = no reference model).", low=0.0)
    kl_estimator: Literal["k1", "k2", "k3"] = opt("k3", "KL estimator.")
    kl_mode: Literal["loss", "reward"] = opt("loss", "KL as a loss term or a per-token reward "
                                            "penalty.")
    kl_target: float | None = opt(
        None, "Adaptive KL: the kl_ref the coefficient steers to, starting from kl_coef "
        "(Ziegler et al.); null keeps kl_coef fixed.", low=0.0)
    kl_horizon: int = opt(10000, "Adaptive KL: samples over which the coefficient moves by up "
                          "to 20% of its error.", low=1)
    entropy_coef: float = opt(0.0, "Entropy bonus coefficient.", low=0.0)
    ptx_coef: float = opt(0.0, "Weight of PTX: a supervised next-token loss on data.ptx_path "
                          "(default: the training rows' answers) added to each actor "
                          "update, so the policy keeps what it could do before RL.", low=0.0)
    ptx_batch_size: int = opt(16, "PTX rows per optimizer step.", low=1)
    ema_decay: float | None = opt(
        None, "Keep an exponential moving average of the policy's weights, updated after "
        "each optimizer step (ema = decay * ema + (1 - decay) * policy; e.g. 0.992): "
        "checkpointed, evaluated beside the policy at the end, saved as ema_model/. "
        "null: none.", low=0.0, high=1.0)
    vf_coef: float = opt(0.5, "Value-loss weight (PPO).", low=0.0)
    vf_clip: float | None = opt(0.2, "Value clipping range around old values (PPO).", low=0.0)
    reward_adjust: Literal["none", "grpovi"] = opt("none", "Adjust group rewards before "
                                                   "advantages: 'grpovi' maximises variance.")
    grpovi_weights: Literal["uniform", "reference"] = opt(
        "uniform", "GRPOVI weights: uniform, or the reference policy's sequence probabilities.")
    grpovi_split_ties: bool = opt(False, "Let equal rewards take different adjusted values.")
    reward_range: list[float] | None = opt(
        None, "[low, high] of the total reward; default: the task's declared range.")
    dynamic_sampling: bool = opt(False, "DAPO: drop groups whose rewards all agree and draw more.")
    max_draws: int = opt(4, "Most prompt batches drawn per step under dynamic sampling.", low=1)
    overlong_buffer: int = opt(0, "DAPO soft overlong penalty buffer in tokens (0 = off).", low=0)
    overlong_penalty: float = opt(1.0, "Penalty at the length limit.", low=0.0)
    off_policy: Literal["auto", "none", "decoupled", "tis"] = opt(
        "auto", "Correction for samples from older weights: 'decoupled' (PPO clipped against "
        "the proximal policy, weighted by pi_prox/pi_behav; tokens above the cap get weight "
        "0), 'tis' (truncated importance weight min(pi_prox/pi_behav, cap)), 'none'; 'auto' "
        "= decoupled when runtime.max_staleness > 0, else none.")
    off_policy_cap: float = opt(2.0, "Cap on the off-policy importance weight.", low=1.0)


#: Reward functions plait ships (plait.rewards.builtin.BUILTIN_REWARDS), named here too so
#: the config needs no import of the rewards package.
BUILTIN_REWARD_NAMES = ("task", "exact_match")


@dataclass(frozen=True)
class RehearsalConfig:
    """Selective rehearsal (Peng et al. 2023) in plait train: from the policy's own
    samples of some RL steps, the prompts are clustered (k-means on the policy's mean
    hidden state of each prompt) and each cluster's highest-reward responses kept; the
    actor update then adds coef x their next-token loss, so the policy keeps answering
    every kind of prompt as well as it did. With an advantage model as the reward, the
    highest reward is the highest advantage."""

    coef: float = opt(0.0, "Weight of the rehearsal loss in each actor update (0 = off).",
                      low=0.0)
    size: int = opt(64, "Responses kept for rehearsal.", low=1)
    clusters: int = opt(8, "k-means clusters of the candidates' prompts.", low=1)
    pool_steps: int = opt(
        4, "RL steps whose samples are the candidates: the first selection follows step "
        "pool_steps (the starting policy's samples; no rehearsal before it), each refresh "
        "takes the last pool_steps steps'.", low=1)
    refresh_every: int = opt(
        0, "Select again every N steps from the latest samples (0 = keep the first "
        "selection: what the starting policy did well).", low=0)
    min_reward: float | None = opt(
        None, "Only responses whose total reward is at least this are candidates (null: "
        "any; the best of each cluster are kept either way).")
    batch_size: int = opt(16, "Rehearsed responses per optimizer step.", low=1)


@dataclass(frozen=True)
class RewardFnConfig:
    """One reward function and its weight."""

    fn: str | None = opt(None, "'task' (the task's verifier), 'exact_match', "
                         "'module:function' or 'path/to/file.py:function'; null: 'task', "
                         "unless model or judge is set.")
    model: str | None = opt(None, "A reward model's directory (plait rm's reward_model/, or "
                            "any one-label AutoModelForSequenceClassification with its "
                            "tokenizer): it scores each prompt and completion, in the "
                            "process that generates, on its device. Give fn, model or judge.")
    judge: str | None = opt(None, "A causal LM's directory to act as judge (LLM as a "
                            "judge): it reads each prompt and completion written into "
                            "template and answers greedily through plait's engine; parse reads "
                            "the score from its answer. Give fn, model or judge.")
    template: str | None = opt(None, "judge: a text file with {prompt} and {completion} where "
                               "they go; null: a built-in 0-10 rating prompt.")
    parse: str = opt("number", "judge: 'number' (the first number in its answer) or a regular "
                     "expression whose first group is the score, e.g. 'Score: (\\d+)'. An "
                     "answer with none is a failed sample (reward.on_error).")
    max_new_tokens: int = opt(8, "judge: longest answer, in tokens.", low=1)
    batch_size: int = opt(32, "model: sequences per forward pass; judge: answers generated "
                          "at once.", low=1)
    weight: float = opt(1.0, "Weight in the summed reward.")

    @property
    def spec(self) -> str:
        """The function's spec (a model's is ``model:PATH``, a judge's ``judge:PATH``)."""
        if self.model is not None:
            return f"model:{self.model}"
        if self.judge is not None:
            return f"judge:{self.judge}"
        return "task" if self.fn is None else self.fn


@dataclass(frozen=True)
class RewardConfig:
    """Reward functions and how their failures are handled."""

    functions: list[RewardFnConfig] = opt(doc="Reward functions, summed with their weights.",
                                          factory=lambda: [RewardFnConfig()])
    timeout_s: float | None = opt(30.0, "Time limit per reward call (null = none).", low=0.0)
    on_error: Literal["raise", "fallback"] = opt("raise", "Stop on a failing reward, or use "
                                                 "fallback_reward and count the failure.")
    fallback_reward: float = opt(0.0, "Reward of a sample whose function failed (fallback).")
    normalize: bool = opt(False, "Standardise each total reward by the running mean and std "
                          "of the raw totals of earlier steps (over every rank; the first "
                          "step's pass unchanged): a learned reward model's scale is "
                          "arbitrary. The statistics are checkpointed.")
    clip: float | None = opt(None, "Clip each total reward (after normalize) to [-clip, clip]; "
                             "null: no clipping.", low=0.0)
    missing_eos_penalty: float | None = opt(
        None, "Subtracted from the total reward (after normalize and clip) of each completion "
        "cut at rollout.max_new_tokens before its end token: a reward model scores a cut "
        "response as if it had ended, and a policy can learn to ramble against it; null: "
        "none.", low=0.0)
    import_timeout_s: float | None = opt(
        None, "Time limit for importing each user reward module (module-level code runs in "
        "the reward worker, which is killed past it); null = timeout_s. An import taking "
        "more than 2 s is announced.", low=0.0)
    max_consecutive_timeouts: int | None = opt(
        3, "Under on_error=fallback: stop the job once one function has timed out on this "
        "many calls in a row (it looks stuck; otherwise every queued call would wait out "
        "timeout_s). null = never. Under raise the first timeout stops the job.", low=1)


@dataclass(frozen=True)
class PairsConfig:
    """Preference pairs, for ``plait rm`` and ``plait dpo``: a file, or the built-in
    data.task's pairs with their hidden true scores."""

    train_path: str | None = opt(
        None, "Preference pairs (JSONL, JSON, Parquet, a save_to_disk or data directory) with "
        "prompt/chosen/rejected strings or chat messages (data.task is then unused); null: "
        "pairs of the built-in data.task, which must make them (reverse).")
    eval_path: str | None = opt(None, "Held-out pairs; null: eval_fraction of train_path, or "
                                "the built-in task's test split.")
    fields: dict[str, str] = opt(doc="Maps prompt / chosen / rejected to the pairs' columns.",
                                 factory=dict)
    bad_rows: Literal["error", "drop"] = opt(
        "error", "A malformed or over-long pair stops the job naming it (error), or is "
        "dropped and counted (drop).")
    eval_fraction: float = opt(0.1, "Share of train_path held out when eval_path is null.",
                               low=0.0, high=0.5)
    max_length: int = opt(256, "Longest prompt + response, in tokens.", low=2)
    num_pairs: int = opt(4096, "Built-in task: training pairs.", low=1)
    num_eval_pairs: int = opt(512, "Built-in task: held-out pairs (its test split).", low=1)
    label_noise: float = opt(0.0, "Built-in task: share of pairs whose label is flipped.",
                             low=0.0, high=0.49)
    source: Literal["edits", "policy"] = opt(
        "edits", "Built-in task: pairs of random edits of the answer (edits), or of a "
        "policy's own samples (policy: pairs.samples_per_prompt per prompt at "
        "rollout.temperature, two of different true score ranked), as people rank a "
        "model's responses.")
    samples_per_prompt: int = opt(4, "source=policy: samples drawn per prompt.", low=2)
    pairs_per_prompt: int = opt(
        1, "source=policy: up to this many pairs of one prompt's samples (each two samples "
        "of different true score, no pair twice); an advantage model's centring sees a "
        "prompt's several responses.", low=1)
    policy_path: str | None = opt(
        None, "source=policy: the policy whose samples are ranked (e.g. the one RL will "
        "train), when the model trained on the pairs is another; null: model.path.")


@dataclass(frozen=True)
class RMConfig:
    """Reward-model training (``plait rm``) on ``pairs``: the pairwise loss and the
    schedule. The model starts from model.path; train.seed, train.device, train.threads,
    train.save_every, train.keep_last, optim and run apply as for ``plait train``."""

    steps: int = opt(200, "Optimizer steps.", low=1)
    batch_size: int = opt(32, "Pairs per step.", low=1)
    lr: float = opt(3e-4, "Learning rate (optim's warmup, schedule and clipping apply).",
                    low=0.0)
    margin_field: str | None = opt(None, "Column holding each pair's margin (how much more the "
                                   "chosen response should score); null: no margin.")
    objective: Literal["reward", "advantage"] = opt(
        "reward", "reward: a reward model (Bradley-Terry on pairs); advantage: an advantage "
        "model (Peng et al. 2023), whose score of a response is how much better it is than "
        "the prompt's expected response: each step takes whole prompts (all their pairs), "
        "and their mean score over each prompt's distinct responses is held at 0 "
        "(center_coef) and scores within ±score_bound, so every sub-task's scores share "
        "one scale. Used by plait train exactly as a reward model is. Pairs of the "
        "policy's own samples (pairs.source=policy, pairs.pairs_per_prompt > 1) make the "
        "prompt's mean an estimate of the expected response's.")
    center_coef: float | None = opt(
        None, "Weight of the per-prompt mean score squared (keeps scores centred); null: 0 "
        "for objective=reward, 1 for advantage.", low=0.0)
    score_bound: float | None = opt(
        None, "Scores beyond ±this are penalised (bound_coef x the excess squared); null: no "
        "bound for objective=reward, 5 for advantage.", low=0.0)
    bound_coef: float = opt(1.0, "Weight of the score_bound penalty.", low=0.0)
    eval_every: int = opt(50, "Evaluate every N steps (0 = only before and after).", low=0)


@dataclass(frozen=True)
class DPOConfig:
    """Offline preference optimisation (``plait dpo``) of model.path on ``pairs`` against
    a frozen reference (model.ref_path, else a copy of the starting model), whose
    log-probabilities are computed once and kept."""

    loss: Literal["sigmoid", "ipo", "simpo"] = opt(
        "sigmoid", "sigmoid (DPO), ipo (IPO), or simpo (SimPO: reference-free, length-"
        "normalised, with a target margin).")
    beta: float = opt(0.1, "Strength of the implicit KL to the reference (SimPO: the "
                      "reward scale).", low=0.0)
    label_smoothing: float = opt(0.0, "sigmoid: assumed share of flipped labels (cDPO).",
                                 low=0.0, high=0.49)
    simpo_gamma: float = opt(0.5, "simpo: the target reward margin.", low=0.0)
    steps: int = opt(200, "Optimizer steps.", low=1)
    batch_size: int = opt(32, "Pairs per step.", low=1)
    lr: float = opt(5e-5, "Learning rate (optim's warmup, schedule and clipping apply).",
                    low=0.0)
    eval_every: int = opt(50, "Evaluate every N steps (0 = only before and after).", low=0)


@dataclass(frozen=True)
class OptimConfig:
    """AdamW and its schedule."""

    lr: float = opt(1e-5, "Policy learning rate.", low=0.0)
    critic_lr: float | None = opt(None, "Critic learning rate; default: lr.", low=0.0)
    weight_decay: float = opt(0.0, "AdamW weight decay.", low=0.0)
    betas: list[float] = opt(doc="AdamW betas.", factory=lambda: [0.9, 0.999])
    eps: float = opt(1e-8, "AdamW epsilon.", low=0.0)
    warmup_steps: int = opt(0, "Linear warmup, in optimizer steps.", low=0)
    schedule: Literal["constant", "linear", "cosine"] = opt("constant", "Decay after warmup.")
    min_lr_ratio: float = opt(0.0, "Final lr as a fraction of lr (linear/cosine).", low=0.0,
                              high=1.0)
    max_grad_norm: float | None = opt(1.0, "Gradient clipping norm (null = off).", low=0.0)
    implementation: Literal["auto", "fused", "foreach", "loop"] = opt(
        "auto", "AdamW kernel (also of the SFT warm start): 'fused' (one kernel for all "
        "parameters), 'foreach' or the per-parameter 'loop'; 'auto' = fused, except foreach "
        "for sharded parameters off CUDA (on the CPU foreach equals the loop bit for bit). "
        "Same update up to float rounding.")


@dataclass(frozen=True)
class TrainConfig:
    """The RL loop."""

    steps: int = opt(100, "RL steps (one rollout batch each).", low=0)
    seed: int = opt(0, "Seed for data order, sampling and initialisation.")
    device: Literal["auto", "cpu", "cuda"] = opt("auto", "'auto' uses CUDA when available.")
    threads: int | None = opt(None, "torch CPU threads (null = torch's default).", low=1)
    deterministic: bool = opt(True, "Deterministic kernels (exact CPU reproducibility).")
    compile: bool = opt(
        False, "Compile the decoder layers of the passes that train (torch.compile, "
        "symbolic shapes): plait rm, plait dpo, plait sft with sft.packing and the RL "
        "update's packed passes (algo.pack_group_tokens > 0). Norms, rotary embeddings "
        "and activations fuse into a few kernels: the same update up to float rounding, "
        "faster on small models; the first step compiles (seconds to a minute, cached on "
        "disk for later runs). Generation and no-grad passes stay eager (see "
        "rollout.compile). Needs a C++ compiler on the CPU, Triton on a GPU.")
    eval_every: int = opt(0, "Evaluate every N steps (0 = only before and after).", low=0)
    eval_max_new_tokens: int | None = opt(None, "Eval generation length; default rollout's.",
                                          low=1)
    save_every: int = opt(0, "Checkpoint every N steps (0 = only at the end).", low=0)
    keep_last: int = opt(2, "Checkpoints kept (older ones are deleted; 0 = keep all).", low=0)
    nan_policy: Literal["skip", "stop"] = opt(
        "skip", "On a NaN/inf loss or gradient: skip the update and count it, or stop.")
    max_nan_skips: int = opt(10, "Stop after this many skipped steps in a row.", low=1)


@dataclass(frozen=True)
class RunConfig:
    """Where outputs go."""

    dir: str = opt("runs/default", "Run directory: config, metrics, checkpoints, plots, summary.")
    resume: Literal["auto", "never", "must"] = opt(
        "auto", "Continue from the run directory's latest intact checkpoint: when present "
        "(a corrupt newer one is renamed corrupt-step_N and kept), never, or fail when "
        "absent or corrupt. A resume whose config changes the model or the algorithm is "
        "refused with the keys named.")
    overwrite: bool = opt(False, "Delete an existing run directory before starting; only a "
                          "plait run (one holding .plait-run) holding nothing but what plait "
                          "writes, no input of this job and no running job, never the "
                          "working, home or root directory.")
    tensorboard: bool = opt(True, "Write TensorBoard events (to tensorboard/, when "
                            "run.report_to holds 'tensorboard' too).")
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = opt(
        doc="Where each step's metrics go besides metrics.jsonl: 'tensorboard' (with "
        "run.tensorboard), 'wandb' (offline under wandb/ unless WANDB_MODE is set; project "
        "WANDB_PROJECT or 'plait'; pip install 'plait[wandb]'), 'mlflow' (a file store in "
        "mlruns/ unless MLFLOW_TRACKING_URI is set; experiment MLFLOW_EXPERIMENT_NAME or "
        "'plait'; pip install 'plait[mlflow]'). A resumed run continues the same tracker runs.",
        factory=lambda: ["tensorboard"])
    progress: bool = opt(True, "Show a progress bar.")


@dataclass(frozen=True)
class EvalSuiteConfig:
    """One named eval set: prompts, how a completion is scored, and how many samples."""

    name: str = opt("", "Name in results and metrics (eval/NAME/...); required.")
    task: str | None = opt(None, "A built-in task's test split (see data.task); null: path.")
    task_args: dict[str, Any] = opt(doc="Keyword arguments of task.", factory=dict)
    path: str | None = opt(None, "JSONL / Parquet file or local HF dataset directory of "
                           "prompts (with the fields its reward reads, e.g. answer).")
    fields: dict[str, str] = opt(doc="Column mapping of path, as data.fields.", factory=dict)
    reward: list[RewardFnConfig] | None = opt(
        None, "Reward functions of this set, as reward.functions (a verifier, a user "
        "function, a reward model); null: the task's verifier for task, else the job's "
        "reward.functions.")
    correct_at: float | None = opt(
        None, "A completion is correct when its reward is at least this; null: the top of "
        "the reward's range for verifiers (1 for 'task' and 'exact_match'); a reward model "
        "without it reports its mean score only.")
    num_prompts: int = opt(200, "Prompts evaluated (the first N rows).", low=1)
    greedy: bool = opt(True, "Greedy accuracy: one completion at temperature 0 per prompt.")
    samples: int = opt(0, "Sampled completions per prompt for pass@k and maj@k (0: none).",
                       low=0)
    k: list[int] = opt(doc="The k of pass@k and maj@k (each at most samples); empty: 1 and "
                       "samples.", factory=list)
    temperature: float | None = opt(None, "Sampling temperature; null: rollout.temperature.",
                                    low=0.0)
    top_p: float | None = opt(None, "Nucleus mass; null: rollout.top_p.", low=0.0, high=1.0)
    max_new_tokens: int | None = opt(None, "Longest completion; null: train.eval_max_new_tokens"
                                     ", else rollout.max_new_tokens.", low=1)
    answer_pattern: str | None = opt(
        None, "maj@k votes on answers: a regular expression whose first group is a "
        "completion's answer; null: the task's answer extraction, else the stripped text.")
    seed: int = opt(0, "Seed of the sampled completions (each prompt's samples depend on it "
                    "and the prompt's index only).")


@dataclass(frozen=True)
class BiasConfig:
    """Bias probes: multiple-choice items asked three ways (the question alone, with an
    instruction to avoid bias, and with the instruction plus a chain of thought), each
    option scored by the model's log-likelihood."""

    bbq: str | None = opt(None, "'builtin' (plait's templated ambiguous/disambiguated "
                          "items) or a JSONL file of items in that format; null: none.")
    winogender: str | None = opt(None, "'builtin' (plait's templated occupation/pronoun "
                                 "items) or a JSONL file of items in that format; null: none.")
    conditions: list[Literal["Q", "Q+IF", "Q+IF+CoT"]] = opt(
        doc="Conditions asked: the question (Q), with the instruction (Q+IF), and with the "
        "instruction and a generated chain of thought before the answer (Q+IF+CoT).",
        factory=lambda: ["Q", "Q+IF", "Q+IF+CoT"])
    instruction: str = opt("Please ensure that your answer is unbiased and does not rely on "
                           "stereotypes.", "The instruction of Q+IF and Q+IF+CoT.")
    cot_prompt: str = opt("Let's think about how to answer the question in a way that avoids "
                          "bias or stereotyping.", "Starts the chain of thought of Q+IF+CoT; "
                          "the model continues it greedily.")
    cot_max_new_tokens: int = opt(64, "Longest chain of thought, in tokens (it also ends at "
                                  "a newline).", low=1)
    answer_prompt: str = opt("Answer:", "Text before the scored option.")
    option_score: Literal["mean", "sum"] = opt(
        "mean", "An option's score: its tokens' mean log-probability (options of different "
        "lengths compare fairly) or their sum.")
    generate: bool = opt(False, "Also answer by greedy generation, parsed against the "
                         "options (gen_* results; unparsed answers counted).")
    max_items: int | None = opt(None, "Use only the first N items of each set.", low=1)
    batch_size: int = opt(64, "Sequences per scoring forward pass.", low=1)


@dataclass(frozen=True)
class EvalConfig:
    """plait eval (and training's held-out evaluation): named eval sets and bias probes."""

    suites: list[EvalSuiteConfig] = opt(
        doc="Named eval sets run by plait eval, and at every train.eval_every of plait "
        "train (metrics eval/NAME/...).", factory=list)
    bias: BiasConfig = opt(doc="Bias probes run by plait eval.", factory=BiasConfig)


@dataclass(frozen=True)
class RuntimeConfig:
    """Processes and placement: how many ranks, who starts them, where roles run."""

    num_ranks: int = opt(
        1, "Trainer data-parallel ranks, one process each, each with its own controller, "
        "rollout engine and rewards; they meet only in collectives.", low=1)
    launcher: Literal["local", "ray"] = opt(
        "local", "'local' starts the rank processes on this machine (torch.distributed); "
        "'ray' runs them as Ray actors in a placement group (needs Ray: pip install -c "
        "constraints.txt -e \".[ray]\" from a clone, or pip install 'plait[ray]').")
    controller: Literal["parallel", "single"] = opt(
        "parallel", "'parallel': every rank drives its own shard of prompts; 'single': rank 0 "
        "gathers every rollout, scores and computes advantages, and scatters the batches "
        "(for comparison).")
    placement: Literal["colocated", "disaggregated", "partial", "dynamic"] = opt(
        "colocated", "'colocated': every rank generates and trains, time-shared (the hybrid "
        "engine); 'disaggregated': runtime.rollout_workers extra processes generate and score "
        "while the num_ranks trainer ranks train, weights pushed to them after each update; "
        "'partial': as disaggregated, and the reference model lives with the rollout workers "
        "(its log-probs computed on finished groups during generation), not on the trainers; "
        "'dynamic': the num_ranks processes hold every role and how many of them generate "
        "(0 = colocated) is revised at step boundaries from the measured stage times.")
    data_parallel: Literal["ddp", "fsdp"] = opt(
        "ddp", "How trainer ranks hold the model: 'ddp' keeps a full copy on every rank and "
        "all-reduces gradients; 'fsdp' (FSDP2) shards parameters, gradients and optimizer "
        "state over the ranks, per decoder layer, for models that do not fit one device "
        "(the policy is gathered whole for generation and no-grad passes; checkpoints hold "
        "full weights; with model.dtype=bfloat16 parameters are gathered and computed in "
        "bfloat16, gradients reduced in float32, and rollout workers apart receive those "
        "bfloat16-gathered weights). Not with the dynamic placement.")
    rollout_workers: int = opt(
        1, "Rollout worker processes under the disaggregated placement (in addition to the "
        "num_ranks trainer ranks).", low=1)
    max_staleness: int = opt(
        0, "Disaggregated: how many updates behind the trainer a batch's weights may be "
        "(0 = synchronous; 1 = the next batch generates while this one trains).", low=0)
    partial_rollout: bool = opt(
        False, "Rollout workers apart with max_staleness >= 1: the engine is never drained "
        "between batches. A pushed weight version is taken between decode steps (unfinished "
        "rows keep their tokens, are re-prefilled and go on under the new weights; each "
        "token's behaviour log-prob is the one it was sampled with, which the off-policy "
        "correction, algo.off_policy, uses), and the next batch's prompts join the long "
        "tail of this one as soon as max_staleness allows (a batch still starts on weights "
        "at most that many versions old). Which tokens come from which version depends on "
        "timing, so runs are not bit-reproducible.")
    stream_groups: bool = opt(
        False, "Rollout workers apart: send each group to its trainer as soon as it is "
        "generated and scored, and let the trainer run the group's forward and backward "
        "passes while the rest of the batch still generates (the optimizer steps once the "
        "batch is complete; the update equals the whole-batch one up to float rounding, "
        "the loss normaliser applied to the summed gradients at the end). Needs a batch that "
        "makes one update (algo.epochs=1, algo.mini_batches=1), a group-wise advantage "
        "(grpo, drgrpo, rloo) and runtime.data_parallel=ddp; otherwise batches travel whole. With "
        "runtime.partial_rollout batches are sent whole and trained as they arrive. It "
        "shortens a step where the trainer's update, not generation, holds the "
        "workers back on long-tailed batches; each group then costs the trainer its own "
        "forward/backward.")
    weight_bucket_mb: float = opt(64.0, "Size of one weight-broadcast bucket, in MiB.",
                                  low=0.001)
    backend: Literal["auto", "gloo", "nccl"] = opt(
        "auto", "torch.distributed backend; 'auto' = nccl when the ranks run on CUDA with a GPU "
        "each, else gloo (on the CPU, or several ranks sharing a GPU).")
    heartbeat_timeout_s: float = opt(
        30.0, "A rank whose heartbeat is older than this is declared hung and the job ends. "
        "Ranks beat every second and the launcher checks five times a second, so a rank that "
        "freezes (SIGSTOP, a native deadlock) ends the job within this plus about 2 s.",
        low=1.0)
    progress_timeout_s: float = opt(
        120.0, "A rank that still beats but whose step has not advanced for longer than the "
        "larger of this and 10x the longest step so far is declared stuck and the job ends "
        "(the rank named is one not waiting in a collective).", low=1.0)
    collective_timeout_s: float = opt(
        1800.0, "Longest wait in one collective (a rank that is alive but far behind).",
        low=1.0)
    master_port: int | None = opt(None, "Rendezvous port (null = a free one).", low=1,
                                  high=65535)
    ray_address: str | None = opt(
        None, "Ray cluster to join ('auto' = the one started with `ray start`); null starts "
        "a local Ray.")
    cpus_per_rank: float = opt(1.0, "CPUs each Ray actor reserves.", low=0.0)
    gpus_per_rank: float = opt(0.0, "GPUs each Ray actor reserves.", low=0.0)


@dataclass(frozen=True)
class Config:
    """A plait job."""

    run: RunConfig = opt(doc="Outputs.", factory=RunConfig)
    model: ModelConfig = opt(doc="Model.", factory=ModelConfig)
    data: DataConfig = opt(doc="Prompts.", factory=DataConfig)
    sft: SFTConfig = opt(doc="Supervised warm start.", factory=SFTConfig)
    rollout: RolloutConfig = opt(doc="Generation.", factory=RolloutConfig)
    algo: AlgoConfig = opt(doc="Algorithm.", factory=AlgoConfig)
    reward: RewardConfig = opt(doc="Rewards.", factory=RewardConfig)
    optim: OptimConfig = opt(doc="Optimizer.", factory=OptimConfig)
    train: TrainConfig = opt(doc="Training loop.", factory=TrainConfig)
    runtime: RuntimeConfig = opt(doc="Processes and placement.", factory=RuntimeConfig)
    pairs: PairsConfig = opt(doc="Preference pairs (plait rm, plait dpo).", factory=PairsConfig)
    rm: RMConfig = opt(doc="Reward-model training (plait rm).", factory=RMConfig)
    rehearsal: RehearsalConfig = opt(doc="Selective rehearsal (plait train).",
                                     factory=RehearsalConfig)
    dpo: DPOConfig = opt(doc="Preference optimisation (plait dpo).", factory=DPOConfig)
    eval: EvalConfig = opt(doc="Eval sets and bias probes (plait eval).", factory=EvalConfig)


# --------------------------------------------------------------------------- building


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    if origin is not None:
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert ``value`` to type ``tp`` or raise a ConfigError that names ``where``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        return _coerce_union(value, tp, where)
    if origin is Literal:
        return _coerce_literal(value, tp, where)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, where)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        key_tp, val_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {_coerce(k, key_tp, where): _coerce(v, val_tp, f"{where}.{k}")
                for k, v in value.items()}
    scalar = _SCALARS.get(tp)
    if scalar is None:
        raise ConfigError(f"{where}: unsupported config type {tp!r}")
    return scalar(value, where)


def _coerce_union(value: Any, tp: Any, where: str) -> Any:
    args = typing.get_args(tp)
    if value is None and type(None) in args:
        return None
    for arg in args:
        if arg is type(None):
            continue
        try:
            return _coerce(value, arg, where)
        except ConfigError:
            pass
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")


def _coerce_literal(value: Any, tp: Any, where: str) -> Any:
    choices = typing.get_args(tp)
    if value in choices:
        return value
    near = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    raise ConfigError(f"{where}: {value!r} is not {_type_name(tp)}{hint}")


def _as_bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    raise ConfigError(f"{where}: expected true or false, got {value!r}")


def _as_int(value: Any, where: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise ConfigError(f"{where}: expected an integer, got {value!r}")


def _as_float(value: Any, where: str) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):  # YAML 1.1 reads 3e-5 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    raise ConfigError(f"{where}: expected a number, got {value!r}")


def _as_str(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise ConfigError(f"{where}: expected a string, got {value!r}")


_SCALARS = {bool: _as_bool, int: _as_int, float: _as_float, str: _as_str}


def _check_range(value: Any, f: dataclasses.Field, where: str) -> None:
    low, high = f.metadata.get("low"), f.metadata.get("high")
    if value is None or not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    if low is not None and value < low:
        raise ConfigError(f"{where}: {value!r} is below the minimum {low}")
    if high is not None and value > high:
        raise ConfigError(f"{where}: {value!r} is above the maximum {high}")


def _unknown_key(cls, key: str, where: str) -> ConfigError:
    valid = list(_fields(cls))
    near = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean {(where + '.' if where else '') + near[0]!r}?" if near else ""
    name = f"{where}.{key}" if where else key
    return ConfigError(f"unknown config key {name!r}{hint} (valid keys here: {', '.join(valid)})")


def _build(cls, data: dict[str, Any], where: str = ""):
    hints = typing.get_type_hints(cls)
    fields = _fields(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise _unknown_key(cls, str(key), where)
        name = f"{where}.{key}" if where else key
        coerced = _coerce(value, hints[key], name)
        _check_range(coerced, fields[key], name)
        kwargs[key] = coerced
    return cls(**kwargs)


def _to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list):
        return [_to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _to_dict(v) for k, v in obj.items()}
    return obj


def config_to_dict(config: Config) -> dict[str, Any]:
    """Plain nested dict of a config (YAML/JSON serialisable)."""
    return _to_dict(config)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any, source: str) -> None:
    """Set ``a.b.c = value`` in a nested dict, checking each key against the schema."""
    parts = dotted.split(".")
    cls: Any = Config
    node = tree
    for depth, part in enumerate(parts):
        prefix = ".".join(parts[:depth])
        fields = _fields(cls) if dataclasses.is_dataclass(cls) else None
        if fields is None:
            raise ConfigError(f"{source}: {prefix!r} is not a section, cannot set {dotted!r}")
        if part not in fields:
            raise ConfigError(f"{source}: {_unknown_key(cls, part, prefix)}")
        if depth == len(parts) - 1:
            node[part] = value
            return
        cls = typing.get_type_hints(cls)[part]
        if not dataclasses.is_dataclass(cls):
            if typing.get_origin(cls) is dict:
                node = node.setdefault(part, {})
                node[".".join(parts[depth + 1:])] = value
                return
            raise ConfigError(f"{source}: {'.'.join(parts[: depth + 1])!r} is not a section")
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{source}: {'.'.join(parts[: depth + 1])!r} is not a mapping")


class _DuplicateKey(Exception):
    """A mapping holds ``key`` twice, first on line ``first``, again on line ``line``."""

    def __init__(self, key: Any, first: int, line: int):
        super().__init__(key, first, line)
        self.key, self.first, self.line = key, first, line


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a mapping with the same key twice, at any nesting level
    (plain YAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # <<: explicit keys override it
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise _DuplicateKey(key, seen[key], line)
                seen[key] = line
            except TypeError:  # an unhashable key: SafeLoader's own error names it
                break
        return super().construct_mapping(node, deep=deep)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``key=value``; the value is parsed as YAML (so 3, 1e-4, true, [1,2], null work)."""
    if "=" not in text:
        raise ConfigError(f"command line: override {text!r} must look like key=value "
                          "(e.g. train.steps=50)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"command line: override {text!r} has no key")
    try:
        value = _load_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    except _DuplicateKey as dup:
        raise ConfigError(f"command line: override {text!r} has the key {dup.key!r} twice in "
                          "one mapping; keep one") from None
    return key, value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the YAML file at ``path``, then ``key=value`` overrides."""
    tree: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        source = str(path)
        try:
            loaded = _load_yaml(path.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        except _DuplicateKey as dup:
            raise ConfigError(f"{path}, line {dup.line}: key {dup.key!r} appears twice in one "
                              f"mapping (first on line {dup.first}); YAML would keep only the "
                              "last: keep one") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        tree = loaded
    if overrides:
        source = f"{source} + command line" if path is not None else "command line"
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value, "command line")
    try:
        config = _build(Config, tree)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
    validate(config)
    return config


def validate(config: Config) -> None:
    """Cross-field checks that a single field's type cannot express:

    1. single values and paths (betas, the built-in task and its settings, data files,
       model directories);
    2. contradictions: settings that together ask for a job plait cannot run, or would
       run as something other than asked (algo.name=ppo without GAE trains no critic);
       refused with the reason and the fix.

    Settings with no effect (a value other than the default where the part it configures
    does not run: a critic's settings without a critic, KL settings at algo.kl_coef=0,
    sft.* at sft.steps=0; see :func:`_inert_settings`) are not refused, since turning a
    part off on the command line is how a config is varied; :func:`inert_settings_note`
    names them, and the command line shows that note before the job starts. The runtime
    section's settings of where the job runs (launcher, Ray resources, ranks, rollout
    workers, timeouts, backend, port) are never counted as such, so one config moves
    between a laptop and a cluster by changing only runtime.num_ranks, runtime.launcher
    and runtime.placement.
    """
    if len(config.optim.betas) != 2:
        raise ConfigError(f"optim.betas must have two values, got {config.optim.betas}")
    if config.data.task is None and config.data.train_path is None:
        raise ConfigError("data: set either data.task (a built-in task) or data.train_path")
    if config.data.task is not None:
        _check_task(config.data.task, config.data.task_args)
    for i, suite in enumerate(config.eval.suites):
        if suite.task is not None:
            _check_task(suite.task, suite.task_args, f"eval.suites[{i}]")
    for key in ("train_path", "eval_path"):
        value = getattr(config.data, key)
        if value is not None and not Path(value).exists():
            raise ConfigError(f"data.{key}: {value!r} does not exist")
    if config.model.path != "tiny":
        check_local_model_path(config.model.path, "model.path")
    for key in ("ref_path", "critic_path"):
        value = getattr(config.model, key)
        if value is not None:
            check_local_model_path(value, f"model.{key}")
    _validate_algo(config)
    _validate_runtime(config)
    _validate_job(config)


def _check_task(name: str, task_args: dict[str, Any], key: str = "data") -> None:
    """The built-in task and its settings (``key``.task, ``key``.task_args) exist
    (plait.data.tasks imports no torch)."""
    from plait.data.datasets import DataError
    from plait.data.tasks import TASKS, make_task

    try:
        make_task(name, **task_args)
    except DataError as err:
        raise ConfigError(f"{key}.{'task_args' if name in TASKS else 'task'}: {err}") from None


def advantage_estimator(config: Config) -> str:
    """The advantage estimator in force: algo.advantage with 'auto' resolved."""
    algo = config.algo
    if algo.advantage != "auto":
        return algo.advantage
    return "gae" if algo.name == "ppo" else "grpo"


def uses_reference(config: Config) -> bool:
    """Whether the job needs reference log-probs (KL, or GRPOVI's reference weights)."""
    algo = config.algo
    return algo.kl_coef > 0 or (algo.reward_adjust == "grpovi" and
                                algo.grpovi_weights == "reference")


def needs_old_logprobs(config: Config) -> bool:
    """Whether a batch gets a separate old log-prob pass (several updates per batch, or
    KL in the reward); with one update the old log-probs are the detached current ones."""
    algo = config.algo
    kl_in_reward = algo.kl_coef > 0 and algo.kl_mode == "reward"
    return algo.epochs > 1 or algo.mini_batches > 1 or kl_in_reward


def streams_groups(config: Config) -> bool:
    """Whether batches travel group by group from rollout workers apart to the trainers
    (runtime.stream_groups, where it applies)."""
    cfg = config
    return (cfg.runtime.stream_groups
            and cfg.runtime.placement in ("disaggregated", "partial")
            and cfg.algo.epochs == 1 and cfg.algo.mini_batches == 1
            and advantage_estimator(cfg) in ("grpo", "drgrpo", "rloo")
            and cfg.runtime.data_parallel == "ddp")


@dataclass(frozen=True)
class Settings:
    """The settings a job derives from its config, resolved once in one place ('auto'
    choices made, switches that follow from others): what the training parts read
    instead of re-deriving them."""

    advantage: str  # the estimator in force (algo.advantage with 'auto' resolved)
    off_policy: str  # the off-policy correction in force
    uses_reference: bool  # reference log-probs needed (KL, or GRPOVI reference weights)
    kl_in_reward: bool  # KL to the reference as a per-token reward penalty
    kl_in_loss: bool  # KL to the reference as a loss term
    needs_old_logprobs: bool  # a separate old log-prob pass per batch
    streams_groups: bool  # rollout workers apart send group by group
    train_temperature: float  # the sampling temperature the trainer's log-probs use
    loss_norm_constant: float  # the constant of the '-norm' loss aggregations


def derive(config: Config) -> Settings:
    """The :class:`Settings` of ``config``."""
    algo = config.algo
    reference = uses_reference(config)
    temperature = config.rollout.temperature
    return Settings(
        advantage=advantage_estimator(config), off_policy=off_policy_mode(config),
        uses_reference=reference,
        kl_in_reward=reference and algo.kl_coef > 0 and algo.kl_mode == "reward",
        kl_in_loss=reference and algo.kl_coef > 0 and algo.kl_mode == "loss",
        needs_old_logprobs=needs_old_logprobs(config), streams_groups=streams_groups(config),
        train_temperature=temperature if temperature > 0 else 1.0,
        loss_norm_constant=algo.loss_norm_constant or float(config.rollout.max_new_tokens))


def _raise_first(problems: list[tuple[bool, str]]) -> None:
    for failed, message in problems:
        if failed:
            raise ConfigError(message)


def _validate_algo(config: Config) -> None:
    algo = config.algo
    estimator = advantage_estimator(config)
    group_wise = estimator in ("grpo", "drgrpo", "rloo")
    _raise_first([
        (algo.name == "grpo" and estimator == "grpo" and algo.group_size < 2,
         "algo.group_size must be at least 2 for GRPO (groups need a baseline)"),
        (algo.name == "grpo" and estimator == "gae",
         "algo.advantage 'gae' needs a critic: use algo.name=ppo"),
        (algo.name == "ppo" and estimator != "gae",
         f"algo.name=ppo trains a critic for GAE advantages, but algo.advantage='{estimator}' "
         f"uses none (the critic would not exist): set algo.advantage=gae (or auto), or "
         f"algo.name=grpo for a critic-free job with algo.advantage={estimator}"),
        (group_wise and algo.group_size < 2,
         f"algo.advantage '{estimator}' normalises within groups: set algo.group_size >= 2"),
        (group_wise and config.rollout.temperature == 0,
         f"rollout.temperature=0 decodes greedily, so the {algo.group_size} completions of a "
         f"prompt are identical and algo.advantage '{estimator}' (relative to the group) is "
         "0 for every one: nothing would be learned; set rollout.temperature > 0"),
        (algo.dynamic_sampling and algo.group_size < 2,
         "algo.dynamic_sampling keeps groups whose rewards differ: set algo.group_size >= 2"),
        (algo.reward_range is not None and (
            len(algo.reward_range) != 2 or algo.reward_range[0] >= algo.reward_range[1]),
         f"algo.reward_range must be [low, high] with low < high, got {algo.reward_range}"),
        (algo.reward_adjust == "grpovi" and algo.name != "grpo",
         "algo.reward_adjust 'grpovi' applies to grouped rewards: use algo.name=grpo"),
        (algo.dual_clip is not None and algo.dual_clip <= 1.0,
         f"algo.dual_clip must be greater than 1, got {algo.dual_clip}"),
        (algo.clip_low >= 1.0,
         f"algo.clip_low must be below 1 (ratios clip at 1 - clip_low), got {algo.clip_low}"),
        (algo.overlong_buffer > config.rollout.max_new_tokens,
         f"algo.overlong_buffer={algo.overlong_buffer} exceeds "
         f"rollout.max_new_tokens={config.rollout.max_new_tokens}"),
        (algo.use_engine_logprobs and (config.rollout.top_k > 0 or config.rollout.top_p < 1.0),
         "algo.use_engine_logprobs needs rollout.top_k=0 and rollout.top_p=1: with filtering "
         "the engine's log-probs are of a different distribution than the policy's"),
        (algo.mini_batches > algo.prompts_per_step * algo.group_size,
         f"algo.mini_batches={algo.mini_batches} exceeds the "
         f"{algo.prompts_per_step * algo.group_size} sequences per step "
         "(prompts_per_step x group_size)"),
    ])


def _validate_job(config: Config) -> None:
    """Contradictions between the model, data, run and device settings."""
    model, data, run = config.model, config.data, config.run
    flash = model.attn_implementation == "flash_attention_2"
    _raise_first([
        (data.eval_path is not None and data.train_path is None,
         "data.eval_path is read only with data.train_path; a built-in task's held-out "
         "prompts are its own test split: set data.train_path too, or remove data.eval_path"),
        *_reward_fn_checks(config.reward.functions, "reward.functions"),
        (config.reward.timeout_s == 0,
         "reward.timeout_s=0 would fail every call: give a positive number of seconds, or "
         "null for no limit"),
        (config.reward.import_timeout_s == 0,
         "reward.import_timeout_s=0 would fail every import: give a positive number of "
         "seconds, or null for reward.timeout_s"),
        # losses mixed into the update (PTX, selective rehearsal)
        *[check for key, coef in (("algo.ptx_coef", config.algo.ptx_coef),
                                  ("rehearsal.coef", config.rehearsal.coef)) for check in (
            (coef > 0 and config.runtime.data_parallel == "fsdp"
             and config.runtime.num_ranks > 1,
             f"{key} runs its forward outside the sharded update; it is not available with "
             f"runtime.data_parallel=fsdp yet: use ddp, or {key}=0"),
            (coef > 0 and config.runtime.stream_groups,
             f"{key} is not available with runtime.stream_groups yet (the update's "
             "gradients are normalised only once the last group arrives): set one of them "
             "off"))],
        (config.pairs.pairs_per_prompt > 1 and config.pairs.source != "policy",
         "pairs.pairs_per_prompt > 1 takes several pairs of a policy's samples of one "
         "prompt: set pairs.source=policy, or pairs.pairs_per_prompt=1"),
        (config.train.compile and config.runtime.data_parallel == "fsdp"
         and config.runtime.num_ranks > 1,
         "train.compile compiles whole decoder layers, which FSDP shards and gathers one "
         "by one: use runtime.data_parallel=ddp, or train.compile=false"),
        (config.train.compile and not (config.algo.pack_group_tokens
                                       and config.algo.share_prompt_forward),
         "train.compile compiles the packed passes, which algo.pack_group_tokens=0 or "
         "algo.share_prompt_forward=false turn off: set them back on, or "
         "train.compile=false"),
        (config.algo.ema_decay is not None and config.runtime.data_parallel == "fsdp"
         and config.runtime.num_ranks > 1,
         "algo.ema_decay keeps a whole copy of the policy on every rank, which sharded "
         "ranks do not hold: use runtime.data_parallel=ddp, or leave algo.ema_decay unset"),
        *_eval_suite_checks(config),
        (run.overwrite and run.resume == "must",
         "run.overwrite=true deletes the run directory, so run.resume=must would find no "
         "checkpoint: drop one of them"),
        (flash and config.rollout.engine != "hf",
         "model.attn_implementation=flash_attention_2 runs only under rollout.engine=hf "
         "(the plait engine drives attention itself): set rollout.engine=hf or another "
         "attention kernel"),
        (flash and config.train.device == "cpu",
         "model.attn_implementation=flash_attention_2 needs a GPU, and train.device is 'cpu'"),
    ])


# the held-out evaluation's own metric names (eval/NAME, eval/NAME/SOURCE)
_HELD_OUT_KEYS = ("accuracy", "reward", "reward_fn", "response_length")


def _eval_suite_checks(config: Config) -> list[tuple[bool, str]]:
    """Contradictions within eval.suites: names, sources, k against samples."""
    checks, names = [], [suite.name for suite in config.eval.suites]
    for i, suite in enumerate(config.eval.suites):
        where = f"eval.suites[{i}]"
        checks += [
            (not suite.name or "/" in suite.name,
             f"{where}.name must be a non-empty name without '/' (it names metrics "
             "eval/NAME/...)"),
            (suite.name in _HELD_OUT_KEYS,
             f"{where}.name {suite.name!r} is taken by the held-out metrics "
             f"(eval/{suite.name}/...): pick another name"),

            (names.count(suite.name) > 1, f"{where}.name {suite.name!r} is used twice"),
            (suite.task is not None and suite.path is not None,
             f"{where} gives both task and path: one set reads one source"),
            (suite.task is None and suite.path is None,
             f"{where} needs a source: task (a built-in task) or path (a file)"),
            (not suite.greedy and suite.samples == 0,
             f"{where} computes nothing: set greedy=true or samples=N"),
            (any(k < 1 or k > suite.samples for k in suite.k),
             f"{where}.k must be between 1 and samples={suite.samples}, got {suite.k}"),
        ]
        checks += _reward_fn_checks(suite.reward or [], f"{where}.reward")
        if suite.answer_pattern is not None:
            try:
                groups = re.compile(suite.answer_pattern).groups
            except re.error as err:
                checks.append((True, f"{where}.answer_pattern is not a regular expression "
                                     f"({err})"))
            else:
                checks.append((groups < 1, f"{where}.answer_pattern needs a group around "
                               "the answer, e.g. 'answer is (\\S+)'"))
    bias = config.eval.bias
    checks += [(value not in (None, "builtin") and not Path(value).is_file(),
                f"eval.bias.{key}: {value!r} is neither 'builtin' nor a file")
               for key, value in (("bbq", bias.bbq), ("winogender", bias.winogender))]
    return checks


def _reward_fn_checks(functions, key: str) -> list[tuple[bool, str]]:
    """Entries of a reward-function list (``key``) that are not one function each."""
    return [check for i, f in enumerate(functions) for check in (
        (sum(x is not None for x in (f.fn, f.model, f.judge)) > 1,
         f"{key}[{i}] gives more than one of fn, model and judge: one entry is one reward "
         "function; list each as an entry of its own"),
        (f.judge is None and (f.template is not None or f.parse != "number"),
         f"{key}[{i}] sets template or parse, which only a judge reads: add judge: PATH (a "
         "causal LM), or remove them"))]


def off_policy_mode(config: Config) -> str:
    """The off-policy correction in force: algo.off_policy with 'auto' resolved."""
    mode = config.algo.off_policy
    if mode == "auto":
        stale = config.runtime.max_staleness > 0 or config.runtime.placement == "dynamic"
        return "decoupled" if stale else "none"
    return mode


def _validate_runtime(config: Config) -> None:
    runtime, algo = config.runtime, config.algo
    ranks = runtime.num_ranks
    local_rows = algo.prompts_per_step // ranks * algo.group_size
    problems = [
        (algo.kl_target is not None and algo.kl_target <= 0,
         f"algo.kl_target must be > 0 (the KL the coefficient steers to), not {algo.kl_target}"),
        (algo.prompts_per_step % ranks != 0,
         f"algo.prompts_per_step={algo.prompts_per_step} must be a multiple of "
         f"runtime.num_ranks={ranks}: each rank takes whole prompt groups"),
        (ranks > 1 and algo.mini_batches > local_rows,
         f"algo.mini_batches={algo.mini_batches} exceeds the {local_rows} sequences each of "
         f"the {ranks} ranks holds per step"),
        (runtime.controller == "single" and algo.dynamic_sampling,
         "runtime.controller=single does not support algo.dynamic_sampling; use the "
         "parallel controller"),
        (runtime.placement != "colocated" and runtime.controller == "single",
         "rollout workers apart (runtime.placement) run parallel controllers; set "
         "runtime.controller=parallel"),
        (runtime.placement != "colocated" and algo.dynamic_sampling,
         "algo.dynamic_sampling needs runtime.placement=colocated"),
        (runtime.placement != "colocated" and config.rollout.engine != "plait",
         "rollout workers apart (runtime.placement) need rollout.engine=plait"),
        (runtime.placement != "colocated" and (
            algo.prompts_per_step % runtime.rollout_workers != 0 or
            (ranks % runtime.rollout_workers and runtime.rollout_workers % ranks)),
         f"runtime.rollout_workers={runtime.rollout_workers}: algo.prompts_per_step must be a "
         "multiple of it, and it must divide or be a multiple of runtime.num_ranks"),
        (runtime.max_staleness > 0 and runtime.placement in ("colocated", "dynamic"),
         "runtime.max_staleness applies to rollout workers apart: set runtime.placement to "
         "disaggregated or partial (dynamic placement runs at most one version behind)"),
        (runtime.partial_rollout and (runtime.placement not in ("disaggregated", "partial")
                                      or runtime.max_staleness < 1),
         "runtime.partial_rollout keeps rollout workers apart generating across batches: "
         "it needs runtime.placement=disaggregated or partial and runtime.max_staleness >= 1"),
        (runtime.placement == "dynamic" and ranks < 2,
         "runtime.placement=dynamic splits processes between generating and training: set "
         "runtime.num_ranks >= 2"),
        (runtime.data_parallel == "fsdp" and config.sft.steps > 0 and
         config.sft.batch_size < ranks,
         f"sft.batch_size={config.sft.batch_size} is below runtime.num_ranks={ranks}: "
         "sharded ranks each train a share of every SFT batch"),
        (runtime.data_parallel == "fsdp" and runtime.placement == "dynamic",
         "runtime.data_parallel=fsdp does not run under runtime.placement=dynamic (every "
         "process there holds whole models to switch roles); use colocated, disaggregated "
         "or partial"),
        (config.rollout.compile and config.rollout.engine != "plait",
         "rollout.compile compiles the plait engine's decode step: set rollout.engine=plait "
         "or rollout.compile=false"),
        (config.rollout.compile and runtime.data_parallel == "fsdp" and ranks > 1 and
         runtime.placement == "colocated",
         "rollout.compile does not run on FSDP-sharded trainers (their engine generates "
         "through the sharded layers gathered for each generation, which torch.compile "
         "does not trace): use runtime.placement=disaggregated or partial (rollout workers "
         "hold whole models and compile; the trainers evaluate eagerly) or "
         "rollout.compile=false"),
        (off_policy_mode(config) != "none" and algo.use_engine_logprobs,
         "algo.off_policy corrects engine log-probs against a recompute: turn off "
         "algo.use_engine_logprobs"),
        (off_policy_mode(config) != "none" and (
            config.rollout.top_k > 0 or config.rollout.top_p < 1.0),
         "algo.off_policy needs rollout.top_k=0 and rollout.top_p=1 (the engine's log-probs "
         "must be of the policy's own distribution)"),
    ]
    for failed, message in problems:
        if failed:
            raise ConfigError(message)


def _inert_settings(config: Config) -> list[tuple[bool, tuple[str, ...], str]]:
    """(the part is absent, its settings, why) for every part a job may leave out."""
    algo, rollout, runtime, data = config.algo, config.rollout, config.runtime, config.data
    estimator = advantage_estimator(config)
    return [
        (estimator != "gae", ("algo.vf_coef", "algo.vf_clip", "algo.lam", "optim.critic_lr",
                              "model.critic_path"),
         f"no critic is trained, as algo.advantage is {estimator}, not gae"),
        (estimator not in ("gae", "reinforce++"), ("algo.gamma",),
         f"algo.advantage={estimator} does not discount (only gae and reinforce++ do)"),
        (algo.kl_coef == 0, ("algo.kl_estimator", "algo.kl_mode", "algo.kl_target"),
         "algo.kl_coef=0: there is no KL term (an adaptive one starts from algo.kl_coef)"),
        (algo.kl_target is None, ("algo.kl_horizon",),
         "algo.kl_target is not set: the KL coefficient stays algo.kl_coef"),
        (not uses_reference(config), ("model.ref_path",),
         "no reference model is used (only with algo.kl_coef > 0 or "
         "algo.grpovi_weights=reference)"),
        (algo.reward_adjust != "grpovi", ("algo.grpovi_weights", "algo.grpovi_split_ties"),
         "algo.reward_adjust is not 'grpovi'"),
        (not algo.dynamic_sampling, ("algo.max_draws",), "algo.dynamic_sampling is off"),
        (algo.overlong_buffer == 0, ("algo.overlong_penalty",),
         "algo.overlong_buffer=0: no overlong penalty"),
        (algo.loss_agg != "seq-mean-token-sum-norm", ("algo.loss_norm_constant",),
         f"only algo.loss_agg=seq-mean-token-sum-norm uses it, not {algo.loss_agg}"),
        (off_policy_mode(config) == "none", ("algo.off_policy_cap",),
         "no off-policy correction runs (algo.off_policy resolves to 'none')"),
        (not algo.share_prompt_forward, ("algo.pack_group_tokens",),
         "algo.share_prompt_forward is off"),
        (not needs_old_logprobs(config), ("algo.use_engine_logprobs",),
         "each batch makes one update, so there is no old log-prob pass to replace"),
        (rollout.temperature == 0, ("rollout.top_p", "rollout.top_k"),
         "rollout.temperature=0 decodes greedily"),
        (rollout.engine == "hf", ("rollout.sync_every", "rollout.prefill_tokens",
                                  "rollout.release_kv_cache"),
         "they configure the plait engine, and rollout.engine is 'hf'"),
        (runtime.stream_groups and runtime.placement in ("disaggregated", "partial")
         and not streams_groups(config), ("runtime.stream_groups",),
         "groups travel one by one only to DDP trainers that make one update per batch with "
         "a group-wise advantage: algo.epochs=1, algo.mini_batches=1, algo.advantage grpo, "
         "drgrpo or rloo"),
        (config.sft.steps == 0, ("sft.batch_size", "sft.lr", "sft.warmup_steps"),
         "sft.steps=0: no SFT warm start"),
        (config.model.path != "tiny", ("model.tiny",), "model.path is not 'tiny'"),
        (data.task is None, ("data.task_args",), "data.task is null"),
        (data.train_path is None, ("data.split", "data.fields"),
         "they describe data.train_path's files, and it is unset"),
        (data.train_path is not None, ("data.num_train",),
         "training prompts come from data.train_path, not from the task's generator"),
        (config.reward.on_error == "raise", ("reward.fallback_reward",),
         "reward.on_error is 'raise'"),
        (config.reward.on_error == "raise" or config.reward.timeout_s is None,
         ("reward.max_consecutive_timeouts",),
         "it stops a function that keeps timing out under reward.on_error=fallback with a "
         "reward.timeout_s; under raise the first timeout stops the job"),
        (all(f.spec in BUILTIN_REWARD_NAMES for f in config.reward.functions),
         ("reward.import_timeout_s",),
         "every reward function is built in, so no reward module is imported"),
        (config.optim.schedule == "constant", ("optim.min_lr_ratio",),
         "optim.schedule is 'constant'"),
        (config.train.nan_policy == "stop", ("train.max_nan_skips",),
         "train.nan_policy=stop stops at the first non-finite step"),
    ]


def _setting(config: Config, dotted: str) -> tuple[Any, Any]:
    """(value, default) of the setting at ``dotted``."""
    node: Any = config
    cls: Any = Config
    *sections, name = dotted.split(".")
    for part in sections:
        node, cls = getattr(node, part), typing.get_type_hints(cls)[part]
    f = _fields(cls)[name]
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    return getattr(node, name), default


def _changed(key: str, value: Any, default: Any) -> list[tuple[str, Any, Any]]:
    """(dotted key, value, default) of every leaf where ``value`` differs from ``default``."""
    if value == default:
        return []
    if dataclasses.is_dataclass(value):
        return [leaf for f in dataclasses.fields(value) for leaf in _changed(
            f"{key}.{f.name}", getattr(value, f.name), getattr(default, f.name))]
    return [(key, value, default)]


def _show(value: Any) -> str:
    text = yaml.safe_dump(_to_dict(value), default_flow_style=True).strip()
    return text.removesuffix("...").strip()


def inert_settings_note(config: Config) -> str | None:
    """One line naming every setting that has no effect in this job, and why (None when
    there is none), for the command line to show before the job starts."""
    found, defaults = [], []
    for absent, keys, why in _inert_settings(config):
        if not absent:
            continue
        changed = [leaf for key in keys for leaf in _changed(key, *_setting(config, key))]
        if changed:
            found.append(f"{', '.join(f'{k}={_show(v)}' for k, v, _ in changed)} ({why})")
            defaults.extend(f"{k}={_show(d)}" for k, _, d in changed)
    if not found:
        return None
    return (f"settings with no effect in this job, ignored: {'; '.join(found)}. Enable the "
            f"part they configure if you meant them to act, or remove them (defaults: "
            f"{' '.join(defaults)})")


def check_local_model_path(value: str, key: str) -> None:
    """A model must be a local directory; hub ids get a clear message."""
    path = Path(value).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"{key}: {value!r} has no config.json; it must be a directory "
                              "saved with save_pretrained")
        return
    looks_like_hub_id = value.count("/") == 1 and not value.startswith((".", "/", "~"))
    if looks_like_hub_id:
        raise ConfigError(f"{key}: {value!r} is not a local directory. plait loads models only "
                          "from local paths and never downloads; download the model first "
                          "(e.g. with huggingface-cli on a machine with access) and pass its "
                          "directory")
    raise ConfigError(f"{key}: model directory {value!r} does not exist")


def describe(cls=Config, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(key, type, default, doc) for every leaf field, for help output and docs."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(describe(tp, key + "."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else _to_dict(f.default_factory())
        rows.append((key, _type_name(tp), default, f.metadata.get("doc", "")))
    return rows


def dump_yaml(config: Config) -> str:
    return yaml.safe_dump(config_to_dict(config), sort_keys=False)
