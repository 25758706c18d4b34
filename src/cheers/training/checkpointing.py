"""Training checkpoints: written atomically, resumed exactly, exported in the release layout.

Layout of ``<run>/checkpoints``::

    latest                    {"step": 6, "dir": "step-00000006"}   (written atomically, last)
    step-00000006/
        trainer_state.json    step, data position and corrupt counts, scheduler, format, strategy, world size
        model.safetensors     one process / DDP: every tensor, release names (sharded above max_shard_size);
                              a LoRA run: the adapter tensors only (the frozen base comes from the recipe)
        optimizer.pt          one process / DDP: the optimizer state (tensors and numbers; loaded
                              weights_only)
        ema.safetensors       with train.ema_decay: the average of the trainable weights, float32, by name
        dcp/                  FSDP2: model (a LoRA run: trainable tensors only) + optimizer, sharded
                              (torch.distributed.checkpoint)
        rng/rank-00000.pt     python, numpy, torch (and CUDA) generator states of every process

A checkpoint is assembled in ``.tmp-step-...`` and renamed into place only when complete; the previous one
stays until then, so a crash mid-save leaves the last good checkpoint and ``latest`` untouched (a re-save of
the same step moves the old copy to ``.old-step-...`` for the instant between two renames;
``latest_checkpoint`` finds it there). The next save clears what a killed save left behind. A write that
fails for lack of disk space (or any OS error) raises ``OSError`` with its errno, naming the checkpoint that
failed. The data position needs no state of its own beyond the step: every sample is a function of
(seed, position).
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cheers import atomic
from cheers import checkpoint as ckpt
from cheers.models.cheers import Cheers
from cheers.models.pretrained import _materialize_nonpersistent, resolve_dtype, save_pretrained
from cheers.training.distributed import DistInfo, barrier, unwrap

logger = logging.getLogger(__name__)

FORMAT = "cheers-train-1"
LATEST = "latest"
STATE = "trainer_state.json"
OPTIMIZER = "optimizer.pt"


def checkpoints_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def step_name(step: int) -> str:
    return f"step-{step:08d}"


# ------------------------------------------------------------------------------------------------------------
# random generator states


def capture_rng() -> dict[str, Any]:
    """Every global generator's state, as tensors and numbers (loadable with ``weights_only=True``)."""
    version, state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    out: dict[str, Any] = {
        "python": (version, list(state), gauss),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def restore_rng(state: dict[str, Any]) -> None:
    version, values, gauss = state["python"]
    random.setstate((version, tuple(values), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------------------------------
# save


def _torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` through a Python file (so a full disk surfaces as the ``OSError`` behind torch's
    ``RuntimeError``, not only "unexpected pos"), then fsync. Not atomic by itself: it writes inside the
    staging directory, which is published whole."""
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _clear_debris(root: Path) -> None:
    """Remove what a killed save left: staging dirs and pointer temp files; a step that the publish moved
    aside is put back if its replacement never arrived, else deleted."""
    atomic.recover_dirs(root, "step-*")
    atomic.remove_temps(root, LATEST)


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    trainer_state: dict[str, Any],
    info: DistInfo,
    keep: int = 2,
    max_shard_size: str = "5GB",
    trainable_only: bool = False,
    extra: Callable[[Path], None] | None = None,
) -> Path:
    """Write the checkpoint of ``step`` (collective under FSDP: every process calls it). Returns its path.

    ``trainable_only`` (LoRA runs) stores only the tensors that require grad: the frozen rest is rebuilt from
    the recipe on resume. ``extra`` writes more files into the checkpoint being assembled (rank 0 calls it,
    before the checkpoint is published), e.g. the weight average.
    """
    root = checkpoints_dir(run_dir)
    final = root / step_name(step)
    tmp = atomic.staging_dir(final)
    if info.is_main:
        root.mkdir(parents=True, exist_ok=True)
        _clear_debris(root)
        (tmp / "rng").mkdir(parents=True)
    barrier(info)
    try:
        if info.strategy == "fsdp":
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

            options = StateDictOptions(ignore_frozen_params=trainable_only)
            model_sd, optim_sd = get_state_dict(module, optimizer, options=options)
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / "dcp"))
        elif info.is_main:
            model = unwrap(module)
            tensors = trainable_state(model) if trainable_only else model.state_dict()
            ckpt.save_state_dict(tensors, tmp, max_shard_size=max_shard_size)
            _torch_save(optimizer.state_dict(), tmp / OPTIMIZER)
        if extra is not None and info.is_main:
            extra(tmp)
        _torch_save(capture_rng(), tmp / "rng" / f"rank-{info.rank:05d}.pt")
        barrier(info)
        if info.is_main:
            state = {
                "format": FORMAT,
                "step": step,
                "strategy": info.strategy,
                "world_size": info.world_size,
                "scheduler": scheduler.state_dict(),
                "model_tensors": "trainable" if trainable_only else "all",
                **trainer_state,
            }
            atomic.write_json(tmp / STATE, state)
            atomic.publish_dir(tmp, final)
            atomic.write_json(root / LATEST, {"step": step, "dir": final.name})
            _prune(root, keep)
            logger.info("saved checkpoint %s", final)
    except BaseException as err:
        if info.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        cause = atomic.os_error_behind(err) if isinstance(err, Exception) else None  # not on Ctrl-C
        if cause is None:
            raise
        message = f"{os.strerror(cause.errno)}: saving checkpoint {final.name} failed; {LATEST!r} still names"
        raise OSError(cause.errno, f"{message} the previous checkpoint", str(root)) from err
    barrier(info)
    return final


def _prune(root: Path, keep: int) -> None:
    steps = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in steps[: max(0, len(steps) - max(keep, 1))]:
        shutil.rmtree(old, ignore_errors=True)
        logger.info("removed old checkpoint %s", old)


# ------------------------------------------------------------------------------------------------------------
# load


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint ``latest`` points to, or None when the run has none."""
    root = checkpoints_dir(run_dir)
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    name = json.loads(pointer.read_text())["dir"]
    for target in (root / name, atomic.aside_dir(root / name)):  # a re-save of this step killed mid-publish
        if (target / STATE).is_file():
            return target
    raise ckpt.CheckpointError(f"{pointer} points to {root / name}, which is not a complete checkpoint")


def read_trainer_state(path: str | os.PathLike) -> dict[str, Any]:
    state = json.loads((Path(path) / STATE).read_text())
    if state.get("format") != FORMAT:
        raise ckpt.CheckpointError(f"{path}: format {state.get('format')!r} is not {FORMAT!r}")
    return state


def model_from_state(config, special, state: dict[str, torch.Tensor]) -> Cheers:
    """A Cheers model whose every tensor is ``state``'s (built on the meta device: no second copy, no
    init)."""
    with torch.device("meta"):
        model = Cheers(config, special=special)
    _materialize_nonpersistent(model, torch.device("cpu"))
    ckpt.load_into(model, state, strict=True, assign=True)
    model.tie_weights()
    return model


def load_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The model tensors of a one-process / DDP checkpoint."""
    return ckpt.load_state_dict(path)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors that require grad (a LoRA run's adapters), by name."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def check_model_tensors(path: str | os.PathLike, trainable_only: bool) -> None:
    """Raise unless the checkpoint holds what this run expects (every tensor, or the trainable ones)."""
    stored = read_trainer_state(path).get("model_tensors", "all")
    wanted = "trainable" if trainable_only else "all"
    if stored != wanted:
        raise ckpt.CheckpointError(
            f"{path} holds {stored!r} model tensors but this run expects {wanted!r}: a LoRA run resumes only "
            "from a LoRA run's checkpoints, a full run only from a full run's (was the lora section added or "
            "removed?)"
        )


def load_trainable_weights(path: str | os.PathLike, model: nn.Module) -> None:
    """The trainable tensors of a one-process / DDP LoRA checkpoint into ``model``, strictly (names and
    shapes must be exactly the model's trainable ones)."""
    state = load_state(path)
    expected = trainable_state(model)
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    shapes = [
        f"{k}: {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
        for k in sorted(state.keys() & expected.keys())
        if state[k].shape != expected[k].shape
    ]
    if missing or unexpected or shapes:
        raise ckpt.CheckpointError(
            f"{path} does not match this run's trainable tensors: missing {ckpt._cap(missing)}; unexpected "
            f"{ckpt._cap(unexpected)}; shape mismatches {ckpt._cap(shapes)} (did the lora section change?)"
        )
    with torch.no_grad():
        for name, value in state.items():
            expected[name].copy_(value)


def load_model_weights(path: str | os.PathLike, model: nn.Module) -> None:
    """Weights of a one-process / DDP checkpoint into an unwrapped model, strictly (before wrapping)."""
    ckpt.load_into(model, load_state(path), strict=True)


def load_checkpoint(
    path: str | os.PathLike,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    info: DistInfo,
    trainable_only: bool = False,
) -> dict[str, Any]:
    """Restore optimizer, scheduler and generators (and, under FSDP2, the model) of a checkpoint.

    One process / DDP: call :func:`load_model_weights` (:func:`load_trainable_weights` for a LoRA run) on the
    unwrapped model first. Returns the trainer state.
    """
    path = Path(path)
    state = read_trainer_state(path)
    if state["strategy"] != info.strategy and "fsdp" in (state["strategy"], info.strategy):
        raise ckpt.CheckpointError(
            f"{path} was written with strategy {state['strategy']!r}; this run uses "
            f"{info.strategy!r} (FSDP checkpoints are sharded: resume with fsdp)"
        )
    if info.strategy == "fsdp":
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

        # a LoRA run's frozen base is not in the checkpoint: it is the recipe's, already in the model
        options = StateDictOptions(ignore_frozen_params=trainable_only, strict=not trainable_only)
        model_sd, optim_sd = get_state_dict(module, optimizer, options=options)
        loaded = {"model": model_sd, "optim": optim_sd}
        dcp.load(loaded, checkpoint_id=str(path / "dcp"))
        set_state_dict(
            module,
            optimizer,
            model_state_dict=loaded["model"],
            optim_state_dict=loaded["optim"],
            options=options,
        )
    else:
        optimizer.load_state_dict(torch.load(path / OPTIMIZER, map_location=info.device, weights_only=True))
    scheduler.load_state_dict(state["scheduler"])
    rng_file = path / "rng" / f"rank-{info.rank:05d}.pt"
    if rng_file.is_file():
        restore_rng(torch.load(rng_file, weights_only=True))
    else:
        logger.warning("%s has no generator state for rank %d (world size changed?)", path, info.rank)
    logger.info("resumed from %s at step %d", path, state["step"])
    return state


# ------------------------------------------------------------------------------------------------------------
# export


def export_release(
    module: nn.Module,
    info: DistInfo,
    directory: str | os.PathLike,
    dtype: str | None = None,
    max_shard_size: str = "5GB",
) -> Path | None:
    """Write the trained model in the release layout (collective under FSDP2; rank 0 writes)."""
    directory = Path(directory)
    model = unwrap(module)
    if info.strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if info.is_main:
            plain = model_from_state(model.config, model.special, full)
            save_pretrained(
                plain, directory, max_shard_size=max_shard_size, dtype=resolve_dtype(dtype) if dtype else None
            )
    elif info.is_main:
        save_pretrained(
            model, directory, max_shard_size=max_shard_size, dtype=resolve_dtype(dtype) if dtype else None
        )
    barrier(info)
    if info.is_main:
        logger.info("exported the model to %s", directory)
    return directory if info.is_main else None


def export_adapter(
    module: nn.Module,
    info: DistInfo,
    directory: str | os.PathLike,
    base_model: str | None = None,
    dtype: str | None = None,
    adapter_name: str = "default",
) -> Path | None:
    """Write a LoRA run's adapter in peft's layout (collective under FSDP2; rank 0 writes)."""
    from cheers import lora

    directory = Path(directory)
    model = unwrap(module)
    state = None
    if info.strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        state = get_model_state_dict(module, options=options)
    if info.is_main:
        tensors = lora.adapter_state_dict(model, adapter_name, state)
        config = lora.peft_config_dict(model.peft_config[adapter_name])
        config["base_model_name_or_path"] = base_model
        config["inference_mode"] = True
        lora.write_adapter(directory, tensors, config, resolve_dtype(dtype) if dtype else None)
    barrier(info)
    if info.is_main:
        logger.info("exported the LoRA adapter to %s", directory)
    return directory if info.is_main else None
