"""The models a trainer holds and how they live on its rank.

The policy, the frozen reference, the critic, their optimizers and schedulers; each
whole on the device, or sharded with FSDP2 (``runtime.data_parallel=fsdp``) with a
parameter-free twin kept per trainable model for saving whole weights; and the
modules the update runs through (DDP wrappers when there are several ranks).
"""

from __future__ import annotations

import contextlib
import copy
import functools
from pathlib import Path

import torch

from plait import algos
from plait.config import Config, ConfigError
from plait.models.loading import ValueModel, freeze, load_causal_lm, load_critic
from plait.parallel import fsdp
from plait.parallel.dist import Dist, data_parallel
from plait.train.checkpoint import load_checkpoint
from plait.train.forward import ResponseLogits, compile_layers
from plait.train.optim import build_optimizer


def autocast(config: Config, device: torch.device):
    """bfloat16 compute over float32 master weights when model.dtype asks for it."""
    if config.model.dtype == "bfloat16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def load_reference(config: Config, saved_dir: str | None, policy, device: torch.device):
    """The frozen reference, whole on ``device``: model.ref_path, else ``saved_dir`` (the
    warm-started model), else a copy of ``policy``."""
    ref_dir = config.model.ref_path or saved_dir
    if ref_dir:
        key = "model.ref_path" if config.model.ref_path else None
        return freeze(load_causal_lm(ref_dir, config.model.attn_implementation,
                                     key=key).to(device))
    return freeze(copy.deepcopy(policy))


class TrainModels:
    """The trainer's models on this rank (see module doc). ``policy`` is the starting
    policy as loaded (on the CPU); it is sharded or moved to ``device`` here."""

    def __init__(self, config: Config, dist: Dist, device: torch.device, policy):
        self.config, self.dist, self.device = config, dist, device
        # sharded forwards must be the same on every rank: one model call per micro-batch
        self.sharded = config.runtime.data_parallel == "fsdp" and dist.active
        self.twins: dict = {}  # parameter-free copies of sharded models, for saving
        if self.sharded:  # loaded on the CPU, only this rank's shards go to the device
            self.twins["policy"] = fsdp.meta_twin(policy)
            fsdp.shard(policy, self.mesh, self.compute_dtype)
        else:
            policy.to(device)
        policy.eval()  # dropout off: a batch's first-epoch ratio is exactly 1
        self.policy = policy
        self.reference = None
        self.critic = None
        self.ema = None  # the policy's weight average (algo.ema_decay), frozen
        self.optimizers: dict = {}
        self.schedulers: dict = {}
        self.train_policy = None  # the modules the update runs through (see prepare)
        self.train_critic = None

    @property
    def compute_dtype(self) -> torch.dtype | None:
        """Sharded models gather their parameters in bfloat16 when model.dtype asks for
        bfloat16 compute (FSDP2 mixed precision; shards and optimizer stay float32)."""
        return torch.bfloat16 if self.config.model.dtype == "bfloat16" else None

    @functools.cached_property
    def mesh(self):
        """The device mesh the sharded models live on: the job's trainer ranks."""
        from torch.distributed.device_mesh import DeviceMesh

        return DeviceMesh.from_group(self.dist.group or torch.distributed.group.WORLD,
                                     self.device.type)

    def autocast(self):
        return autocast(self.config, self.device)

    def gathered(self, *models):
        """Full parameters of the sharded ``models`` inside (a no-op without sharding)."""
        return fsdp.gathered(*models) if self.sharded else contextlib.nullcontext()

    def named_trainable_models(self) -> list[tuple[str, torch.nn.Module]]:
        models = [("policy", self.policy)]
        if self.critic is not None:
            models.append(("critic", self.critic))
        return models

    def saved_models(self) -> dict[str, torch.nn.Module]:
        """The models a checkpoint holds: the trainable ones and the policy's average."""
        models = dict(self.named_trainable_models())
        if self.ema is not None:
            models["ema"] = self.ema
        return models

    def update_ema(self) -> None:
        """Move the weight average toward the policy (after an optimizer step)."""
        if self.ema is not None:
            algos.ema_update(self.ema.parameters(), self.policy.parameters(),
                             self.config.algo.ema_decay)

    @contextlib.contextmanager
    def ema_weights(self):
        """The policy holds the average's weights inside (swapped in place, so engines
        sharing the policy's tensors generate with them), its own again after."""
        def swap():
            with torch.no_grad():
                for param, average in zip(self.policy.parameters(), self.ema.parameters(),
                                          strict=True):
                    kept = param.detach().clone()
                    param.copy_(average)
                    average.copy_(kept)
        swap()
        try:
            yield
        finally:
            swap()

    def trainable_models(self) -> list[torch.nn.Module]:
        return [m for _, m in self.named_trainable_models()]

    def prepare(self, *, reference: bool, reference_dir: str | None, critic: bool,
                total_steps: int, load_weights=None) -> None:
        """Reference model and critic (when the job uses them), then the saved weights
        (``load_weights``, on resume: once every model exists), then optimizers and the
        modules the update runs through. Under FSDP, models read from disk are sharded
        from the CPU and copies of the policy are made shard by shard: no rank ever
        holds one whole."""
        if reference:
            self.build_reference(reference_dir)
        if critic:
            self.build_critic()
        if self.config.algo.ema_decay is not None:  # starts as the starting policy
            self.ema = freeze(copy.deepcopy(self.policy))
        if load_weights is not None:
            load_weights()
        optim = self.config.optim
        self.optimizers["policy"], self.schedulers["policy"] = build_optimizer(
            self.policy.parameters(), optim, total_steps=total_steps)
        if self.critic is not None:
            self.optimizers["critic"], self.schedulers["critic"] = build_optimizer(
                self.critic.parameters(), optim, lr=optim.critic_lr or optim.lr,
                total_steps=total_steps)
        self.policy.train()
        algo = self.config.algo
        share = algo.share_prompt_forward and not self.sharded
        self.train_policy = ResponseLogits(self.policy, share, algo.pack_group_tokens)
        if self.config.train.compile and not compile_layers(self.policy):
            raise ConfigError(
                f"train.compile: plait does not drive the layers of the policy, a "
                f"{self.policy.config.model_type!r} model with "
                f"{self.config.model.attn_implementation!r} attention, so nothing would be "
                "compiled: set train.compile=false")
        self.train_critic = self.critic
        if self.dist.active and not self.sharded:
            self.train_policy = data_parallel(self.train_policy, self.dist, self.device)
            if self.critic is not None:
                self.train_critic = data_parallel(self.critic, self.dist, self.device)

    def build_reference(self, saved_dir: str | None) -> None:
        """model.ref_path, else ``saved_dir`` (the warm-started model), else a frozen copy
        of the current policy."""
        ref_dir = self.config.model.ref_path or saved_dir
        if not self.sharded:
            self.reference = load_reference(self.config, saved_dir, self.policy, self.device)
        elif ref_dir:
            key = "model.ref_path" if self.config.model.ref_path else None
            self.reference = freeze(self.placed(load_causal_lm(
                ref_dir, self.config.model.attn_implementation, key=key)))
        else:
            self.reference = freeze(fsdp.sharded_copy(
                self.policy, copy.deepcopy(self.twins["policy"]), self.mesh,
                compute_dtype=self.compute_dtype))

    def build_critic(self) -> None:
        """model.critic_path, else a value head on a copy of the policy's backbone."""
        model = self.config.model
        hidden = self.policy.config.hidden_size
        if model.critic_path:
            self.critic = self.placed(load_critic(model.critic_path, model.attn_implementation),
                                      "critic")
        elif self.sharded:  # one twin to keep for saving, one to become the critic
            twins = [ValueModel(fsdp.meta_twin(self.policy.base_model), hidden)
                     for _ in range(2)]
            self.twins["critic"] = twins[0]
            self.critic = fsdp.sharded_copy(self.policy.base_model, twins[1], self.mesh,
                                            prefix="backbone.", compute_dtype=self.compute_dtype)
        else:
            backbone = copy.deepcopy(self.policy.base_model)
            self.critic = ValueModel(backbone, hidden).to(self.device)
        self.critic.eval()

    def placed(self, model, name: str | None = None):
        """A model read from disk (on the CPU) on this rank's device: sharded under FSDP
        (``name``: keep a parameter-free twin of it for saving), else moved whole."""
        if not self.sharded:
            return model.to(self.device)
        if name is not None:
            self.twins[name] = fsdp.meta_twin(model)
        return fsdp.shard(model, self.mesh, self.compute_dtype)

    def load_sharded_weights(self, path: Path) -> None:
        """Resume under FSDP: each trainable model's saved weights are read into its
        twin on the CPU (with the usual checks) and copied into the shards."""
        for name, model in self.named_trainable_models():
            twin = self.twins[name]
            twin.to_empty(device="cpu")
            if hasattr(twin, "tie_weights"):
                twin.tie_weights()
            try:
                load_checkpoint(path, models={name: twin}, restore_rng=False)
                fsdp.load_full_weights(model, twin.state_dict())
            finally:
                fsdp.release(twin)

    def full_states(self) -> tuple[dict, dict]:
        """The trainable models and optimizers to save: as they are, or (sharded) whole
        weights gathered into the twins on rank 0 (every rank joins the gathering; the
        other ranks get empty dicts). Release the twins with :meth:`release_twins`."""
        if not self.sharded:
            return self.saved_models(), self.optimizers
        models, optimizers = {}, {}
        for name, model in self.named_trainable_models():
            weights, optim = fsdp.full_state(model, self.optimizers[name])
            if self.dist.is_main:
                models[name] = fsdp.plain_model(self.twins[name], weights)
                optimizers[name] = fsdp.FullOptimizerState(model, None, optim)
        return models, optimizers

    def release_twins(self) -> None:
        """The twins give their gathered weights back."""
        if self.sharded:
            for twin in self.twins.values():
                fsdp.release(twin)

    def gradient_bytes(self) -> int:
        """Bytes of the gradients one update reduces over ranks."""
        return sum(p.numel() * p.element_size() for m in self.trainable_models()
                   for p in m.parameters() if p.requires_grad)
