"""Where a checkpoint lives: a local directory, or a hub id (``ai9stars/Cheers``) fetched with
huggingface_hub.

Only the release's JSON, safetensors and tokenizer files are downloaded (:data:`HUB_ALLOW`); pickle weights
and Python files never are (:data:`HUB_IGNORE`), so no remote code can run.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from cheers.checkpoint.layout import CONFIG_NAME, CheckpointError

HUB_ALLOW = ["*.json", "*.safetensors", "*.txt", "*.model"]
HUB_IGNORE = ["*.bin", "*.pt", "*.pth", "*.pkl", "*.ckpt", "*.py"]
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _offline_from_env() -> bool:
    flag = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return flag.strip().upper() in {"1", "ON", "YES", "TRUE"}


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
        local_files_only = _offline_from_env()

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
