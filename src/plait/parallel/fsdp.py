"""Fully sharded data parallelism (FSDP2) for trainer ranks.

Each decoder layer, and then the whole model, is wrapped by ``fully_shard``: every rank
keeps 1/N of each parameter, of its gradient and of its optimizer state. A layer's
parameters are all-gathered for its forward and backward and dropped again after, and
gradients are reduce-scattered, so every rank must run the same sequence of sharded
forwards and backwards (the trainer makes the micro-batch counts agree).

Work whose shape depends on the rank's data — generation, where ranks decode for
different numbers of steps, and no-grad scoring passes — runs inside :func:`gathered`:
the whole model is all-gathered once, forwards then issue no collectives, and it is
sharded again on exit.

Checkpoints hold full (unsharded) weights and optimizer states, gathered by
:func:`full_state` and written by rank 0 through a parameter-free twin of the model
(:func:`plain_model`), so they load in any layout: one process, DDP, or FSDP on another
number of ranks.
"""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn


def _fsdp_api():
    from torch.distributed.fsdp import FSDPModule, fully_shard
    return FSDPModule, fully_shard


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The repeated blocks of a transformer (``model.layers`` of Llama-style models, also
    under a critic's backbone): the unit of sharding."""
    best = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.split(".")[-1] in ("layers", "h",
                                                                          "blocks"):
            if best is None or len(module) > len(best):
                best = module
    if best is None:
        raise ValueError(f"{type(model).__name__} has no list of decoder layers to shard "
                         "(looked for a ModuleList named layers, h or blocks)")
    return best


def shard(model: nn.Module, mesh, compute_dtype: torch.dtype | None = None) -> nn.Module:
    """Shard ``model`` in place over ``mesh``: each decoder layer, then the rest (embeddings,
    final norm, heads) as the root; the shards move to the mesh's device (a model loaded
    on the CPU never exists whole on the device). Returns the same module (its class now
    an FSDP one).

    ``compute_dtype`` (e.g. bfloat16): parameters are all-gathered and computed in it
    while the shards, the gradients' reduce-scatter and the optimizer stay float32
    (FSDP2's mixed-precision policy: half the all-gather bytes and gathered memory)."""
    _wrap(model, mesh, compute_dtype)
    _root_init(model)
    return model


def _wrap(model: nn.Module, mesh, compute_dtype: torch.dtype | None = None) -> None:
    _, fully_shard = _fsdp_api()
    extra = {}
    if compute_dtype is not None and compute_dtype != torch.float32:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        extra["mp_policy"] = MixedPrecisionPolicy(param_dtype=compute_dtype,
                                                  reduce_dtype=torch.float32)
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, **extra)
    fully_shard(model, mesh=mesh, **extra)


def _root_init(model: nn.Module) -> None:
    """One forward through the root makes it the root of every layer's state (a layer
    called first on its own, as the rollout engine does, would become a root itself);
    then every parameter goes back to its shard (the root would keep its gathered ones,
    and an optimizer built then would hold them)."""
    device = next(model.parameters()).device
    with torch.no_grad():
        model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=device))
    for module in _fsdp_modules([model]):
        module.reshard()


def sharded_copy(source: nn.Module, twin: nn.Module, mesh, prefix: str = "",
                 compute_dtype: torch.dtype | None = None) -> nn.Module:
    """``twin`` (a meta-device module whose parameters named ``prefix + name`` are
    ``source``'s ``name``) sharded like ``source`` and filled shard by shard from it: no
    full tensor is made. Parameters ``source`` lacks (a new head) are left zero.
    ``compute_dtype``: as in :func:`shard`."""
    _wrap(twin, mesh, compute_dtype)
    device = next(source.parameters()).device
    twin.to_empty(device=device)
    params = dict(source.named_parameters())
    buffers = dict(source.named_buffers())
    with torch.no_grad():
        for name, param in twin.named_parameters():
            local = param.to_local() if hasattr(param, "to_local") else param
            mine = params.get(name[len(prefix):]) if name.startswith(prefix) else None
            if mine is None:
                local.zero_()
            else:
                local.copy_(mine.to_local() if hasattr(mine, "to_local") else mine)
        for name, buffer in twin.named_buffers():
            mine = buffers.get(name[len(prefix):]) if name.startswith(prefix) else None
            if mine is not None:
                buffer.copy_(mine)
    _root_init(twin)
    return twin


def load_full_weights(model: nn.Module, weights: dict) -> None:
    """Copy a full state dict (plain tensors, e.g. read from a checkpoint by every rank)
    into the sharded ``model``: each rank keeps its shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True,
                                                                  strict=False))


def _fsdp_modules(models) -> list:
    FSDPModule, _ = _fsdp_api()
    return [m for model in models if model is not None for m in model.modules()
            if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def gathered(*models: nn.Module | None):
    """Inside: the sharded ``models`` hold full parameters, and their forwards (any
    number, on any rank) issue no collectives. Every rank must enter and leave together."""
    modules = _fsdp_modules(models)
    for module in modules:
        module.set_reshard_after_forward(False)
    for module in modules:
        module.unshard()
    try:
        yield
    finally:
        for module in modules:
            module.reshard()
            module.set_reshard_after_forward(True)


def set_gradient_sync(models, sync: bool) -> None:
    """Reduce-scatter gradients in the next backward (``True``) or keep accumulating them
    unsharded (``False``: every micro-batch but the last)."""
    for module in _fsdp_modules(models):
        module.set_requires_gradient_sync(sync, recurse=False)


def local_tensor(value: torch.Tensor) -> torch.Tensor:
    """A plain tensor for a possibly distributed one (e.g. a gradient norm)."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value


def _local_bytes(tensor: torch.Tensor) -> int:
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local.numel() * local.element_size()


def model_state_bytes(models, optimizers) -> dict[str, int]:
    """Bytes of training state this process holds between steps: parameters of
    ``models``, gradients of the trainable ones, and optimizer states (a shard of each
    under FSDP, all of it otherwise)."""
    params = [p for m in models if m is not None for p in m.parameters()]
    states = [v for opt in optimizers for state in opt.state.values()
              for v in state.values() if isinstance(v, torch.Tensor)]
    return {"parameters": sum(_local_bytes(p) for p in params),
            "gradients": sum(_local_bytes(p) for p in params if p.requires_grad),
            "optimizer": sum(_local_bytes(v) for v in states)}


def full_state(model: nn.Module, optimizer=None) -> tuple[dict, dict | None]:
    """Full model (and optimizer) state dicts on CPU: a collective; rank 0 receives the
    tensors, the other ranks empty dicts. Optimizer states are keyed by parameter name."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    optim = get_optimizer_state_dict(model, optimizer, options=options) \
        if optimizer is not None else None
    return weights, optim


def meta_twin(model: nn.Module) -> nn.Module:
    """A parameter-free copy of ``model``'s structure (on the meta device), made before
    sharding; :func:`plain_model` fills it with full weights for saving."""
    from transformers import PreTrainedModel

    from plait.models.loading import ValueModel

    if isinstance(model, PreTrainedModel):
        with torch.device("meta"):
            return type(model)._from_config(copy.deepcopy(model.config))
    if isinstance(model, ValueModel):
        with torch.device("meta"):
            return ValueModel(meta_twin(model.backbone), model.value_head.in_features)
    raise TypeError(f"cannot shard a {type(model).__name__}: FSDP here takes Hugging Face "
                    "models and plait critics")


def release(twin: nn.Module) -> None:
    """Give a twin's weights back (to the meta device), its tied weights tied again (moving
    a module unties them, and a twin must keep the structure of the model it copies)."""
    twin.to("meta")
    if hasattr(twin, "tie_weights"):
        twin.tie_weights()


def plain_model(twin: nn.Module, weights: dict) -> nn.Module:
    """``twin`` holding ``weights`` (a full state dict), tied weights tied again."""
    # gathered tensors can be views into a larger buffer, which safetensors refuses
    weights = {name: value if value.untyped_storage().nbytes() == value.nbytes
               else value.clone() for name, value in weights.items()}
    twin.load_state_dict(weights, strict=False, assign=True)
    if hasattr(twin, "tie_weights"):
        twin.tie_weights()
    missing = [name for name, p in twin.named_parameters() if p.is_meta]
    if missing:
        raise RuntimeError(f"the gathered state has no values for {missing[:5]}")
    return twin


class FullOptimizerState:
    """An optimizer seen through its full state, in ``torch.optim``'s own layout (states
    and groups by parameter index), so checkpoints written under FSDP load without it and
    the other way round: ``state_dict`` returns the gathered state, ``load_state_dict``
    shards one."""

    def __init__(self, model: nn.Module, optimizer, state: dict | None = None):
        self.model, self.optimizer, self.state = model, optimizer, state

    def state_dict(self) -> dict:
        groups = self.state["param_groups"]
        index = {name: i for i, name in enumerate(n for g in groups for n in g["params"])}
        return {"state": {index[name]: value for name, value in self.state["state"].items()},
                "param_groups": [{**g, "params": [index[n] for n in g["params"]]}
                                 for g in groups]}

    def load_state_dict(self, state: dict) -> None:
        """Shard a full state (read from the checkpoint on every rank) into the optimizer."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        names = [name for name, p in self.model.named_parameters() if p.requires_grad]
        by_name = {"state": {names[i]: value for i, value in state["state"].items()},
                   "param_groups": [{**g, "params": [names[i] for i in g["params"]]}
                                    for g in state["param_groups"]]}
        set_optimizer_state_dict(self.model, self.optimizer, by_name,
                                 options=StateDictOptions(full_state_dict=True))
