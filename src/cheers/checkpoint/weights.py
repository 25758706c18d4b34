"""The tensors of a checkpoint: read them (single file or shards), save them sharded and atomically, and load
them into any ``nn.Module`` with name-level checks, keeping tied parameters tied.

The files and their names are :mod:`cheers.checkpoint.layout`'s; the atomic writes are :mod:`cheers.atomic`'s.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import safetensors.torch
import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from cheers import atomic
from cheers.checkpoint.layout import (
    INDEX_NAME,
    SHARD_RE,
    WEIGHTS_NAME,
    CheckpointError,
    _cap,
    list_weight_files,
)

logger = logging.getLogger(__name__)

DEFAULT_TIED = {"lm_head.weight": "model.language_model.embed_tokens.weight"}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


class CheckpointMismatchError(CheckpointError):
    """The checkpoint's tensors do not match the module's state dict (see ``.report``)."""

    def __init__(self, message: str, report: LoadReport):
        super().__init__(message)
        self.report = report


@dataclass
class LoadReport:
    """What ``load_into`` did: key differences, tensors loaded, tensors left on the meta device."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    n_loaded: int = 0
    still_meta: list[str] = field(default_factory=list)

    def describe(self) -> str:
        parts = []
        if self.missing:
            parts.append(f"missing from checkpoint ({len(self.missing)}): {_cap(self.missing)}")
        if self.unexpected:
            parts.append(f"unexpected in checkpoint ({len(self.unexpected)}): {_cap(self.unexpected)}")
        if self.mismatched:
            items = [f"{n}: checkpoint {list(c)} vs model {list(m)}" for n, c, m in self.mismatched]
            parts.append(f"shape mismatches ({len(items)}): {_cap(items)}")
        return "; ".join(parts) or "all keys match"


# --------------------------------------------------------------------------- loading
def load_state_dict(
    directory: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    keys: Iterable[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Read a checkpoint's tensors with ``safe_open`` (single file or shards).

    Args:
        directory: checkpoint directory or a single ``.safetensors`` file.
        dtype: cast floating tensors to this dtype; integer buffers (``num_batches_tracked``) keep theirs.
        device: device the tensors are loaded onto.
        keys: only load these names; a name absent from the checkpoint raises.
    """
    files = list_weight_files(directory)
    wanted = None if keys is None else set(keys)
    device = str(torch.device(device))
    out: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device=device) as reader:
                for name in reader.keys():
                    if wanted is not None and name not in wanted:
                        continue
                    if name in out:
                        raise CheckpointError(
                            f"tensor {name!r} appears in more than one shard (again in {file})"
                        )
                    tensor = reader.get_tensor(name)
                    if dtype is not None and tensor.is_floating_point():
                        tensor = tensor.to(dtype)
                    out[name] = tensor
        except (SafetensorError, OSError, RuntimeError) as err:
            raise CheckpointError(
                f"cannot read safetensors file {str(file)!r} (truncated or corrupt?): {err}"
            ) from err
    if wanted is not None and wanted - out.keys():
        absent = sorted(wanted - out.keys())
        raise CheckpointError(f"{len(absent)} requested tensor(s) not in {str(directory)!r}: {_cap(absent)}")
    logger.info("loaded %d tensors from %d file(s) in %s", len(out), len(files), directory)
    return out


# --------------------------------------------------------------------------- saving
def parse_size(size: int | str) -> int:
    """Parse a byte size: an int, or a string like ``"5GB"``, ``"500MB"``, ``"1.5GiB"``, ``"1024"``.

    Args:
        size: the size; decimal units (KB/MB/GB/TB) are powers of 1000, binary ones (KiB...) of 1024.
    """
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        match = _SIZE_RE.match(str(size))
        if not match:
            raise CheckpointError(f"cannot parse size {size!r}; use an int or e.g. '5GB', '500MB'")
        value = int(float(match.group(1)) * _UNITS[(match.group(2) or "").upper()])
    if value <= 0:
        raise CheckpointError(f"size must be positive, got {size!r}")
    return value


def _owned_copies(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detach to CPU; give tied/shared or partial-view tensors their own contiguous storage."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for name, tensor in state_dict.items():
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"state_dict[{name!r}] is a {type(tensor).__name__}, not a tensor")
        if tensor.device.type == "meta":
            raise CheckpointError(f"tensor {name!r} is on the meta device and has no data to save")
        t = tensor.detach().to("cpu").contiguous()
        storage = t.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if key in seen or storage.nbytes() != t.numel() * t.element_size():
            t = t.clone()  # safetensors refuses shared storage: each name gets its own copy
            storage = t.untyped_storage()
            key = (storage.data_ptr(), storage.nbytes())
        seen.add(key)
        out[name] = t
    return out


def save_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    directory: str | os.PathLike,
    *,
    max_shard_size: int | str = "5GB",
    metadata: Mapping[str, str] | None = None,
) -> list[Path]:
    """Save tensors in the release layout, atomically; returns the weight files written.

    Shards are filled greedily in ``state_dict`` order (a tensor larger than the limit gets a shard of its
    own). One shard means a plain ``model.safetensors`` and no index. Files are written under temp names
    and renamed only after all of them were written, so a failure leaves a previous checkpoint intact;
    weight files of a previous save that the new one does not use are removed afterwards.

    Args:
        state_dict: name -> tensor; tied tensors are stored under every name as separate copies.
        directory: checkpoint directory (created if needed).
        max_shard_size: bytes per shard, an int or a string such as ``"5GB"``.
        metadata: string key/values stored in every shard header (``format: pt`` is added).
    """
    limit = parse_size(max_shard_size)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", **(metadata or {})}
    bad = [k for k, v in meta.items() if not (isinstance(k, str) and isinstance(v, str))]
    if bad:
        raise CheckpointError(f"safetensors metadata must map str to str; bad entries: {_cap(bad)}")
    tensors = _owned_copies(state_dict)
    if not tensors:
        raise CheckpointError("refusing to save an empty state dict")

    shards: list[dict[str, torch.Tensor]] = [{}]
    used = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and used + nbytes > limit:
            shards.append({})
            used = 0
        shards[-1][name] = t
        used += nbytes
    n = len(shards)
    names = [WEIGHTS_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]

    try:
        with atomic.FileSet() as files:  # nothing replaces the old files until every new one was written
            for shard, name in zip(shards, names):
                files.add(directory / name, partial(safetensors.torch.save_file, shard, metadata=meta))
            if n > 1:  # the index goes last, once every shard it names is in place
                total = sum(t.numel() * t.element_size() for t in tensors.values())
                index = {
                    "metadata": {"total_size": total},
                    "weight_map": {k: names[i] for i, shard in enumerate(shards) for k in shard},
                }
                text = json.dumps(index, indent=2, sort_keys=True) + "\n"
                files.add(directory / INDEX_NAME, lambda p: p.write_text(text))
    except Exception as err:
        cause = atomic.os_error_behind(err)
        if cause is not None and not isinstance(err, OSError):  # e.g. SafetensorError on a full disk
            raise OSError(cause.errno, f"{cause.strerror} while saving weights", str(directory)) from err
        raise
    keep = set(names) | ({INDEX_NAME} if n > 1 else set())
    for stale in directory.iterdir():
        ours = stale.name in {WEIGHTS_NAME, INDEX_NAME} or SHARD_RE.match(stale.name)
        if ours and stale.name not in keep:
            stale.unlink()
            logger.info("removed stale weight file %s", stale)
    atomic.fsync_dir(directory)
    logger.info("saved %d tensors in %d file(s) to %s", len(tensors), n, directory)
    return [directory / name for name in names]


# --------------------------------------------------------------------------- loading into modules
def load_into(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    strict: bool = True,
    tied: Mapping[str, str] | None = None,
    assign: bool = False,
) -> LoadReport:
    """Load ``state_dict`` into ``module`` with name-level checks, keeping tied parameters tied.

    Parameters the module shares (the same ``Parameter`` under several names) are loaded once and
    re-tied afterwards, so they stay one object even with ``assign=True``. A module with meta-device
    tensors is loaded with ``assign=True`` (the checkpoint tensors become the parameters: no second copy,
    and their dtype/device are kept).

    Args:
        module: any ``nn.Module``; its persistent ``state_dict()`` keys are the expected names.
        state_dict: name -> tensor, e.g. from ``load_state_dict``.
        strict: raise ``CheckpointMismatchError`` on missing/unexpected keys or shape mismatches.
        tied: target -> source names stored as equal copies; a target missing from ``state_dict`` is
            filled from its source (and vice versa). Defaults to ``DEFAULT_TIED``.
        assign: assign the tensors instead of copying into existing parameters.
    """
    tied = DEFAULT_TIED if tied is None else tied
    expected = module.state_dict(keep_vars=True)
    sd = dict(state_dict)
    filled: set[str] = set()
    for target, source in tied.items():
        for a, b in ((target, source), (source, target)):
            if a in expected and b in expected and a not in sd and b in sd:
                sd[a] = sd[b]
                filled.add(a)
    report = LoadReport(
        missing=sorted(expected.keys() - sd.keys()),
        unexpected=sorted(sd.keys() - expected.keys()),
        mismatched=[
            (k, tuple(sd[k].shape), tuple(expected[k].shape))
            for k in sorted(sd.keys() & expected.keys())
            if tuple(sd[k].shape) != tuple(expected[k].shape)
        ],
    )
    if strict and (report.missing or report.unexpected or report.mismatched):
        raise CheckpointMismatchError(
            f"checkpoint does not match {type(module).__name__}: {report.describe()}", report
        )
    if report.missing or report.unexpected or report.mismatched:
        logger.warning("non-strict load into %s: %s", type(module).__name__, report.describe())

    # Shared parameters: load the first name present in the checkpoint, re-tie the others to it.
    groups: dict[int, list[str]] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    bad = {name for name, _, _ in report.mismatched}
    to_load = {k: v for k, v in sd.items() if k in expected and k not in bad}
    ties: list[tuple[str, str]] = []
    for names in groups.values():
        present = [n for n in names if n in to_load]
        if len(names) < 2 or not present:
            continue
        src = present[0]
        for other in (n for n in names if n != src):
            theirs = to_load.pop(other, None)
            if theirs is not None and theirs is not to_load[src] and not torch.equal(theirs, to_load[src]):
                logger.warning("tied tensors %s and %s differ in the checkpoint; using %s", src, other, src)
            ties.append((other, src))
    for name in filled & to_load.keys():  # the module keeps these apart: give each its own storage
        to_load[name] = to_load[name].clone()

    assign = assign or any(t.is_meta for t in expected.values())
    module.load_state_dict(to_load, strict=False, assign=assign)
    for target, source in ties:
        owner, _, attr = target.rpartition(".")
        setattr(module.get_submodule(owner), attr, module.get_parameter(source))
    report.n_loaded = len(to_load)
    tensors = [
        *module.named_parameters(remove_duplicate=False),
        *module.named_buffers(remove_duplicate=False),
    ]
    report.still_meta = [name for name, t in tensors if t.is_meta]
    if report.still_meta:
        logger.warning(
            "%d tensors still on the meta device: %s", len(report.still_meta), _cap(report.still_meta)
        )
    logger.info(
        "loaded %d tensors into %s (%d tie(s) restored)", report.n_loaded, type(module).__name__, len(ties)
    )
    return report
