"""The release's checkpoint layout: its file names, which files hold the weights, and the error every part
raises.

A checkpoint is a directory holding ``config.json`` and either one ``model.safetensors`` or shards
``model-00001-of-0000n.safetensors`` plus ``model.safetensors.index.json``
(``{"metadata": {"total_size": bytes}, "weight_map": {name: shard}}``). Pickle weights are never read.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
SHARD_RE = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
_LIST_CAP = 20


class CheckpointError(ValueError):
    """A checkpoint cannot be found, read or written."""


def _cap(items: list[str], cap: int = _LIST_CAP) -> str:
    """``items`` joined for an error message, the first ``cap`` of them and a count of the rest."""
    shown = ", ".join(items[:cap])
    return shown + (f", ... and {len(items) - cap} more" if len(items) > cap else "")


def _read_index(index_path: Path) -> dict[str, str]:
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        weight_map = index["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"cannot read shard index {str(index_path)!r}: {err}") from err
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"shard index {str(index_path)!r} has an empty or invalid weight_map")
    for shard in set(weight_map.values()):
        if not isinstance(shard, str) or Path(shard).name != shard or shard in {".", ".."}:
            raise CheckpointError(f"shard index {str(index_path)!r} names an invalid shard file {shard!r}")
    return weight_map


def list_weight_files(directory: str | os.PathLike) -> list[Path]:
    """List the safetensors weight files of a checkpoint, in shard order.

    Args:
        directory: checkpoint directory (or a single ``.safetensors`` file, returned as is).
    """
    directory = Path(directory)
    if directory.is_file() and directory.suffix == ".safetensors":
        return [directory]
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {str(directory)!r} does not exist")
    single, index = directory / WEIGHTS_NAME, directory / INDEX_NAME
    if index.is_file():
        if single.is_file():
            logger.warning("%s has both %s and %s; using the index", directory, WEIGHTS_NAME, INDEX_NAME)
        shards = sorted(set(_read_index(index).values()))
        missing = [s for s in shards if not (directory / s).is_file()]
        if missing:
            raise CheckpointError(
                f"shard index {str(index)!r} names {len(missing)} missing shard file(s): {_cap(missing)}"
            )
        return [directory / s for s in shards]
    if single.is_file():
        return [single]
    others = sorted(p.name for p in directory.glob("*.safetensors"))
    if others:
        raise CheckpointError(
            f"{str(directory)!r} has safetensors files {_cap(others)} "
            f"but neither {WEIGHTS_NAME} nor {INDEX_NAME}"
        )
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{str(directory)!r} only has pickle weights ({_cap(pickles)}); "
            "we load safetensors only and never "
            f"unpickle (it can run arbitrary code). Convert them to {WEIGHTS_NAME} first."
        )
    raise CheckpointError(f"no weights in {str(directory)!r}: expected {WEIGHTS_NAME} or {INDEX_NAME}")
