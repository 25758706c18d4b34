"""Checkpoints in the official release layout, for any ``nn.Module``: safetensors only, no remote code.

    layout.py    the file names (config.json; model.safetensors, or shards + index), listing the weight
                 files, and CheckpointError
    hub.py       a local directory or a hub id (``ai9stars/Cheers``) -> a local checkpoint directory
    weights.py   tensors: read (dtype, device, a subset), save sharded and atomically, load into a module
                 with strict name/shape checks, keeping tied parameters tied

Every name callers use is importable from here. The atomic writes live in :mod:`cheers.atomic`;
``atomic_write_bytes``, ``atomic_write_json`` and ``os_error_behind`` are its functions under their old names.
"""

from cheers.atomic import os_error_behind
from cheers.atomic import write_bytes as atomic_write_bytes
from cheers.atomic import write_json as atomic_write_json
from cheers.checkpoint.hub import HUB_ALLOW, HUB_IGNORE, resolve_checkpoint_dir
from cheers.checkpoint.layout import (
    CONFIG_NAME,
    INDEX_NAME,
    PICKLE_SUFFIXES,
    SHARD_RE,
    WEIGHTS_NAME,
    CheckpointError,
    _cap,  # noqa: F401 - training.parts formats its messages with it
    list_weight_files,
)
from cheers.checkpoint.weights import (
    DEFAULT_TIED,
    CheckpointMismatchError,
    LoadReport,
    load_into,
    load_state_dict,
    parse_size,
    save_state_dict,
)

__all__ = [
    "CONFIG_NAME",
    "DEFAULT_TIED",
    "HUB_ALLOW",
    "HUB_IGNORE",
    "INDEX_NAME",
    "PICKLE_SUFFIXES",
    "SHARD_RE",
    "WEIGHTS_NAME",
    "CheckpointError",
    "CheckpointMismatchError",
    "LoadReport",
    "atomic_write_bytes",
    "atomic_write_json",
    "list_weight_files",
    "load_into",
    "load_state_dict",
    "os_error_behind",
    "parse_size",
    "resolve_checkpoint_dir",
    "save_state_dict",
]
