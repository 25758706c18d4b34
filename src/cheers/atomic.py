"""Atomic writes: a file or a directory is either its old version or the complete new one, never a part.

A file is written to a temp file in its own directory, named ``.{name}.{random hex}.tmp`` so that a listing
shows whose it is and :func:`remove_temps` can find it. The temp file is written, flushed and fsync-ed, then
``os.replace``-d over the target, and the directory is fsync-ed where the OS allows (so the rename itself
survives a power cut). On any failure, ``KeyboardInterrupt`` included, the temp file is removed and the old
file is left as it was; only a process killed outright (SIGKILL, power loss) leaves a temp file behind, which
:func:`remove_temps` clears on the next run. Several files that must appear together go through
:class:`FileSet`.

A directory is assembled under :func:`staging_dir` (``.tmp-{name}``) and renamed into place by
:func:`publish_dir`; :func:`recover_dirs` undoes what a killed publish left.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import secrets
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

TEMP_SUFFIX = ".tmp"
_RUST_OS_ERROR_RE = re.compile(r"\(os error (\d+)\)")

Writer = Callable[[Path], object]  # writes the complete file to the path it is given


# -- errors and fsync ---------------------------------------------------------------------------------------
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


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make the renames in ``directory`` durable; a no-op where directories cannot be opened (Windows)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:  # POSIX: fsync flushes the file's data whichever descriptor asks
        os.fsync(f.fileno())


# -- files --------------------------------------------------------------------------------------------------
def _stage(final: Path, write: Writer) -> Path:
    """Run ``write(tmp)`` on a new temp file next to ``final`` and fsync it; the temp file is removed on
    failure.

    The temp file is created with mode 0o666 less the umask, as ``open`` would create ``final`` (not 0o600 as
    ``tempfile.mkstemp`` would): the renamed file gets the permissions a plain write would give it.
    """
    tmp = final.with_name(f".{final.name}.{secrets.token_hex(8)}{TEMP_SUFFIX}")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        write(tmp)  # the writer closes (and so flushes) the file before it returns
        _fsync_file(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _commit(staged: list[tuple[Path, Path]]) -> None:
    """Rename each staged temp file over its target, in order, then fsync their directories.

    A temp file that was not renamed (a rename failed, or Ctrl-C) is removed.
    """
    done = 0
    try:
        for tmp, final in staged:
            os.replace(tmp, final)
            done += 1
    except BaseException:
        for tmp, _ in staged[done:]:
            tmp.unlink(missing_ok=True)
        raise
    for directory in dict.fromkeys(final.parent for _, final in staged):
        fsync_dir(directory)


def write_with(path: str | os.PathLike, write: Writer) -> Path:
    """Write ``path`` atomically with ``write(tmp)``, which writes the whole file to the path it is given.

    Args:
        path: destination file; its parent directory is created if needed.
        write: e.g. ``lambda p: image.save(p, format="PNG")``; it must close the file before returning.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _commit([(_stage(path, write), path)])
    return path


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see the module docstring)."""
    return write_with(path, lambda p: p.write_bytes(data))


def write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically, encoded (no newline translation)."""
    return write_bytes(path, text.encode(encoding))


def _json_bytes(obj: Any, indent: int, sort_keys: bool) -> bytes:
    return (json.dumps(obj, indent=indent, sort_keys=sort_keys, ensure_ascii=False) + "\n").encode("utf-8")


def write_json(path: str | os.PathLike, obj: Any, *, indent: int = 2, sort_keys: bool = False) -> Path:
    """Write ``obj`` as UTF-8 JSON with a trailing newline to ``path`` atomically.

    Args:
        path: destination file.
        obj: a JSON-serialisable object.
        indent: JSON indentation.
        sort_keys: sort dictionary keys.
    """
    return write_bytes(path, _json_bytes(obj, indent, sort_keys))


def write_safetensors(
    path: str | os.PathLike, tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None
) -> Path:
    """Write ``tensors`` (name -> torch tensor, each with its own storage) as one safetensors file
    atomically."""
    import safetensors.torch  # local import: this module stays free of torch

    meta = None if metadata is None else dict(metadata)
    return write_with(path, lambda p: safetensors.torch.save_file(dict(tensors), p, metadata=meta))


def create_json(
    path: str | os.PathLike, obj: Any, *, indent: int = 2, replace_without_links: bool = False
) -> bool:
    """Write ``obj`` as JSON to ``path`` atomically unless ``path`` exists: when processes race, one wins.

    Args:
        path: destination file.
        obj: a JSON-serialisable object.
        indent: JSON indentation.
        replace_without_links: where the filesystem has no hard links (so "create unless it exists" cannot be
            atomic), write it with ``os.replace`` anyway; otherwise leave it unwritten. Give it to one
            process.

    Returns:
        True if this call wrote the file, False if it existed (left untouched) or could not be created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = _json_bytes(obj, indent, False)
    tmp = _stage(path, lambda p: p.write_bytes(data))
    try:
        os.link(tmp, path)  # unlike os.replace, fails when path exists: the first writer wins
    except FileExistsError:
        return False
    except OSError:  # a filesystem without hard links
        if not replace_without_links:
            return False
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # after a link, the file lives on under its name
    fsync_dir(path.parent)
    return True


class FileSet:
    """Files that replace their old versions together, only once every one of them was written.

    Each :meth:`add` writes a temp file at once; leaving the ``with`` block without an error renames them
    into place in the order they were added, an error (or Ctrl-C) removes them all, leaving the old files::

        with FileSet() as files:
            files.add(directory / "model-00001-of-00002.safetensors", write_first)
            files.add(directory / "model-00002-of-00002.safetensors", write_second)
            files.add(directory / "model.safetensors.index.json", write_index)  # renamed last
    """

    def __init__(self) -> None:
        self._staged: list[tuple[Path, Path]] = []

    def add(self, path: str | os.PathLike, write: Writer) -> None:
        """Write ``path``'s new version to a temp file now (its directory must exist); renamed on exit."""
        path = Path(path)
        self._staged.append((_stage(path, write), path))

    def __enter__(self) -> FileSet:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        staged, self._staged = self._staged, []
        if exc_type is None:
            _commit(staged)
        else:
            for tmp, _ in staged:
                tmp.unlink(missing_ok=True)


def remove_temps(directory: str | os.PathLike, name: str | None = None) -> None:
    """Delete the temp files that killed writers left in ``directory`` (those of the file ``name`` only, if
    given: other processes may be writing the rest)."""
    pattern = f".*{TEMP_SUFFIX}" if name is None else f".{glob.escape(name)}.*{TEMP_SUFFIX}"
    for tmp in Path(directory).glob(pattern):
        tmp.unlink(missing_ok=True)


# -- directories --------------------------------------------------------------------------------------------
def staging_dir(final: Path) -> Path:
    """Where a directory is assembled before :func:`publish_dir` renames it to ``final``."""
    return final.with_name(f".tmp-{final.name}")


def aside_dir(final: Path) -> Path:
    """Where :func:`publish_dir` keeps an existing ``final`` for the instant between its two renames."""
    return final.with_name(f".old-{final.name}")


def publish_dir(staging: Path, final: Path) -> None:
    """Rename the finished ``staging`` directory to ``final``, replacing an existing ``final``.

    Directories cannot be swapped in one rename: an existing ``final`` is first moved to :func:`aside_dir`,
    then deleted once the new one is in place. A reader that finds ``final`` missing looks there;
    :func:`recover_dirs` puts it back if the process died in between.
    """
    old = None
    if final.exists():
        old = aside_dir(final)
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(staging, final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def recover_dirs(root: Path, pattern: str = "*") -> None:
    """Undo what killed publishes of directories matching ``pattern`` left in ``root``: a directory moved
    aside is put back if its replacement never arrived (else deleted), and unfinished staging directories are
    deleted."""
    for old in root.glob(f".old-{pattern}"):
        final = root / old.name.removeprefix(".old-")
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, final)
    for staging in root.glob(f".tmp-{pattern}"):
        shutil.rmtree(staging, ignore_errors=True)
