"""Safetensors checkpoint IO in the official release layout, for any ``nn.Module``.

A checkpoint is a directory holding ``config.json`` and either one ``model.safetensors`` or shards
``model-00001-of-0000n.safetensors`` plus ``model.safetensors.index.json``
(``{"metadata": {"total_size": bytes}, "weight_map": {name: shard}}``). Pickle weights are never read
and remote code is never run. Writes are atomic: every file goes to a temp name in the target
directory and is ``os.replace``-d into place only once everything was written.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors import SafetensorError, safe_open
from torch import nn

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
SHARD_RE = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
HUB_ALLOW = ["*.json", "*.safetensors", "*.txt", "*.model"]
HUB_IGNORE = ["*.bin", "*.pt", "*.pth", "*.pkl", "*.ckpt", "*.py"]
DEFAULT_TIED = {"lm_head.weight": "model.language_model.embed_tokens.weight"}
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_LIST_CAP = 20


class CheckpointError(ValueError):
    """A checkpoint cannot be found, read or written."""


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


def _cap(items: list[str], cap: int = _LIST_CAP) -> str:
    shown = ", ".join(items[:cap])
    return shown + (f", ... and {len(items) - cap} more" if len(items) > cap else "")


# --------------------------------------------------------------------------- atomic writes
_RUST_OS_ERROR_RE = re.compile(r"\(os error (\d+)\)")


def os_error_behind(err: BaseException) -> OSError | None:
    """The operating-system error (errno set) behind a failed write, or None.

    Writers wrap it: ``torch.save`` into a file object raises a ``RuntimeError`` ("unexpected pos ...") whose
    context is the ``OSError``; safetensors (Rust) raises ``SafetensorError("... (os error 28)")``.
    """
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno is not None:
            return seen
        seen = seen.__cause__ or seen.__context__
    match = _RUST_OS_ERROR_RE.search(str(err))
    if match:
        code = int(match.group(1))
        return OSError(code, os.strerror(code))
    return None


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # directories cannot be opened/fsynced everywhere (Windows)
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_temp(final: Path, write: Callable[[Path], object]) -> Path:
    """Run ``write(tmp)`` on a temp file next to ``final`` and fsync it; the caller renames it into place."""
    fd, name = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file in the same dir, fsync, ``os.replace``).

    Args:
        path: destination file; its parent directory is created if needed.
        data: the bytes to write.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _write_temp(path, lambda p: p.write_bytes(data))
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int = 2, sort_keys: bool = False) -> Path:
    """Write ``obj`` as JSON (trailing newline) to ``path`` atomically.

    Args:
        path: destination file.
        obj: a JSON-serialisable object.
        indent: JSON indentation.
        sort_keys: sort dictionary keys.
    """
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys, ensure_ascii=False) + "\n"
    return atomic_write_bytes(path, text.encode("utf-8"))


# --------------------------------------------------------------------------- locating weights
def resolve_checkpoint_dir(
    name_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool | None = None,
) -> Path:
    """Return a local checkpoint directory for a path or a hub id such as ``ai9stars/Cheers``.

    Args:
        name_or_path: an existing local directory (used as is) or a hub id ``owner/name``.
        revision: hub branch, tag or commit.
        cache_dir: hub cache directory (default: the huggingface_hub cache).
        local_files_only: only use the hub cache; ``None`` means "if HF_HUB_OFFLINE is set".
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / CONFIG_NAME).is_file():
            raise CheckpointError(f"checkpoint directory {str(path)!r} has no {CONFIG_NAME}")
        return path
    if path.exists():
        raise CheckpointError(f"{str(path)!r} is a file; pass the checkpoint directory that contains it")
    name = str(name_or_path)
    if not _HUB_ID_RE.match(name):
        raise CheckpointError(
            f"checkpoint directory {name!r} does not exist (and is not a hub id owner/name)"
        )
    if local_files_only is None:
        flag = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
        local_files_only = flag.strip().upper() in {"1", "ON", "YES", "TRUE"}

    import huggingface_hub  # local import: keeps `import cheers` light
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    transport_errors: tuple[type[BaseException], ...] = (OSError,)
    try:
        import httpx

        transport_errors += (httpx.HTTPError,)
    except ImportError:  # pragma: no cover - httpx ships with huggingface_hub
        pass
    try:
        snapshot = huggingface_hub.snapshot_download(
            name,
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            allow_patterns=HUB_ALLOW,
            ignore_patterns=HUB_IGNORE,
        )
    except (RepositoryNotFoundError, RevisionNotFoundError) as err:
        raise CheckpointError(
            f"hub checkpoint {name!r} (revision {revision or 'main'}) was not found or is gated: {err}"
        ) from err
    except transport_errors as err:
        mode = "offline mode (HF_HUB_OFFLINE / local_files_only)" if local_files_only else "a network error"
        raise CheckpointError(
            f"could not fetch hub checkpoint {name!r}: it is not in the local cache and {mode} prevented "
            f"downloading it; this machine seems to be offline. There is no local directory {name!r} either. "
            f"Download it elsewhere (e.g. `hf download {name} --local-dir ./cheers-ckpt`), copy it here and "
            f"pass the local directory path instead. ({type(err).__name__}: {err})"
        ) from err
    snapshot = Path(snapshot)
    if not (snapshot / CONFIG_NAME).is_file():
        raise CheckpointError(f"hub checkpoint {name!r} (at {str(snapshot)!r}) has no {CONFIG_NAME}")
    return snapshot


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
            f"{str(directory)!r} has safetensors files {_cap(others)} but neither {WEIGHTS_NAME} nor {INDEX_NAME}"
        )
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{str(directory)!r} only has pickle weights ({_cap(pickles)}); we load safetensors only and never "
            f"unpickle (it can run arbitrary code). Convert them to {WEIGHTS_NAME} first."
        )
    raise CheckpointError(f"no weights in {str(directory)!r}: expected {WEIGHTS_NAME} or {INDEX_NAME}")


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

    temps: list[tuple[Path, Path]] = []
    try:
        for shard, name in zip(shards, names):
            write = partial(safetensors.torch.save_file, shard, metadata=meta)  # write(path)
            temps.append((_write_temp(directory / name, write), directory / name))
        if n > 1:
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            index = {
                "metadata": {"total_size": total},
                "weight_map": {k: names[i] for i, shard in enumerate(shards) for k in shard},
            }
            text = json.dumps(index, indent=2, sort_keys=True) + "\n"
            temps.append(
                (_write_temp(directory / INDEX_NAME, lambda p: p.write_text(text)), directory / INDEX_NAME)
            )
    except BaseException as err:
        for tmp, _ in temps:
            tmp.unlink(missing_ok=True)
        cause = os_error_behind(err) if isinstance(err, Exception) else None
        if cause is not None and not isinstance(err, OSError):  # e.g. SafetensorError on a full disk
            raise OSError(cause.errno, f"{cause.strerror} while saving weights", str(directory)) from err
        raise
    for tmp, final in temps:  # the index goes last, once every shard it names is in place
        os.replace(tmp, final)
    keep = set(names) | ({INDEX_NAME} if n > 1 else set())
    for stale in directory.iterdir():
        ours = stale.name in {WEIGHTS_NAME, INDEX_NAME} or SHARD_RE.match(stale.name)
        if ours and stale.name not in keep:
            stale.unlink()
            logger.info("removed stale weight file %s", stale)
    _fsync_dir(directory)
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
