"""One process or many: device choice, process group, FSDP2 / DDP wrapping, gradient-sync control, reductions.

* One process (``python -m cheers train`` / ``cheers train``): no process group, the model is moved to the
  device (CPU or one GPU).
* Many processes (``torchrun --nproc_per_node 8 -m cheers.cli train ...``, multi-node likewise): a process
  group from the torchrun environment (NCCL on GPUs, Gloo on CPUs), then FSDP2 (``fully_shard`` on every
  transformer / DiT / ViT block, the VAE encoder and the pixel decoder, then the root) or DDP.

FSDP2 hooks run on ``forward``; the VAE's ``encode`` is a method, so the VAE model itself is not a unit (its
encoder is). The SigLIP pooling head is never run by Cheers: it is frozen so that DDP does not wait for its
gradients.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from cheers.models.cheers import Cheers
from cheers.training.config import EngineSection

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    strategy: str = "single"  # single | ddp | fsdp

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def uses_process_group(self) -> bool:
        return self.strategy in ("ddp", "fsdp")


def setup(engine: EngineSection) -> DistInfo:
    """Pick the device and strategy; start the process group when the strategy needs one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if engine.device == "cuda" and not cuda:
        raise RuntimeError("engine.device is 'cuda' but no CUDA device is available")
    use_cuda = cuda and engine.device != "cpu"
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    strategy = engine.strategy if engine.strategy != "auto" else ("single" if world == 1 else "fsdp")
    if strategy == "single" and world > 1:
        raise RuntimeError(
            f"engine.strategy 'single' under a launcher with WORLD_SIZE={world}; use ddp or fsdp"
        )
    if strategy in ("ddp", "fsdp") and not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:  # one process without torchrun (benchmarks): a local group of one
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
            os.environ.setdefault("RANK", "0")
            os.environ.setdefault("WORLD_SIZE", "1")
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=30))
    if use_cuda:
        torch.cuda.set_device(device)
    info = DistInfo(rank, world, local_rank, device, strategy)
    logger.info("engine: %s on %s, rank %d of %d", strategy, device, rank, world)
    return info


def teardown(info: DistInfo) -> None:
    if info.uses_process_group and dist.is_initialized():
        dist.destroy_process_group()


def freeze_unused(model: Cheers) -> int:
    """Freeze parameters Cheers never runs (the SigLIP pooling head); returns how many were frozen."""
    head = getattr(model.model.vision_representation, "head", None)
    frozen = 0
    if head is not None:
        for p in head.parameters():
            if p.requires_grad:
                p.requires_grad_(False)
                frozen += p.numel()
    return frozen


def enable_gradient_checkpointing(model: Cheers) -> None:
    """Recompute activations of the LLM and ViT blocks in the backward (transformers' own mechanism)."""
    for part in (model.model.language_model, model.model.vision_representation):
        if hasattr(part, "activation_checkpointing_enable"):  # transformers >= 5.x names it so
            part.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            part.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def fsdp_units(model: Cheers) -> list[nn.Module]:
    """The blocks that become FSDP2 units before the root (see the module docstring)."""
    m = model.model
    units: list[nn.Module] = [m.vae_model.encoder, m.vae_decoder_projector]
    units += list(m.vision_representation.encoder.layers)
    units += list(m.language_model.layers)
    units += list(m.gen_projector.diffusion_head_a) + list(m.hi_projector.diffusion_head_a)
    return units


def wrap(model: Cheers, info: DistInfo, engine: EngineSection) -> nn.Module:
    """Move to the device and wrap for the strategy. Returns the module the loop calls."""
    model.to(info.device)
    if info.strategy == "single":
        return model
    if info.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(
            model,
            device_ids=[info.device.index] if info.device.type == "cuda" else None,
            find_unused_parameters=engine.find_unused_parameters,
        )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(info.device.type, (info.world_size,))
    for unit in fsdp_units(model):
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def unwrap(module: nn.Module) -> Cheers:
    """The Cheers model inside a DDP wrapper (FSDP2 shards in place: the module is the model)."""
    return module.module if hasattr(module, "module") and isinstance(module.module, Cheers) else module


def gradient_sync(module: nn.Module, info: DistInfo, sync: bool):
    """Skip the gradient reduction on accumulation micro-steps (all but the last)."""
    if info.strategy == "ddp" and not sync:
        return module.no_sync()
    if info.strategy == "fsdp":
        module.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def all_reduce_sum(values: list[float], info: DistInfo) -> list[float]:
    """Sum python numbers over all processes (float64; identity for one process)."""
    if not info.uses_process_group or info.world_size == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return t.tolist()


def barrier(info: DistInfo) -> None:
    if info.uses_process_group and dist.is_initialized():
        dist.barrier()


def broadcast_object(obj, info: DistInfo):
    if not info.uses_process_group or info.world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
