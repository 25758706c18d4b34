"""Atomic writes: round trips, and a write that fails (error, Ctrl-C, failed rename) keeps the old file, no
temp."""

from __future__ import annotations

import errno
import json
import os
import stat
import sys

import pytest

from cheers import atomic


def names(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def partial_then(exc: BaseException):
    """A writer that gets half a file onto the disk, then fails with ``exc``."""

    def write(path):
        path.write_bytes(b"half a fi")
        raise exc

    return write


def test_bytes_text_and_json_round_trip_into_new_directories(tmp_path):
    assert atomic.write_bytes(tmp_path / "a" / "b.bin", b"\x00\x01") == tmp_path / "a" / "b.bin"
    assert (tmp_path / "a" / "b.bin").read_bytes() == b"\x00\x01"
    atomic.write_text(tmp_path / "t.txt", "héllo\n")
    assert (tmp_path / "t.txt").read_bytes() == "héllo\n".encode()
    atomic.write_json(tmp_path / "c.json", {"b": 1, "a": ["é"]}, sort_keys=True)
    text = (tmp_path / "c.json").read_text(encoding="utf-8")
    assert (
        json.loads(text) == {"a": ["é"], "b": 1}
        and text.endswith("\n")
        and text.index('"a"') < text.index('"b"')
    )
    atomic.write_json(tmp_path / "c.json", [1])  # replaces
    assert json.loads((tmp_path / "c.json").read_text()) == [1]
    assert names(tmp_path) == ["a", "c.json", "t.txt"] and names(tmp_path / "a") == ["b.bin"]


@pytest.mark.parametrize("exc", [OSError(errno.ENOSPC, "disk full"), KeyboardInterrupt()])
def test_a_write_that_fails_part_way_keeps_the_old_file_and_leaves_no_temp(tmp_path, exc):
    path = tmp_path / "a.json"
    atomic.write_json(path, {"v": 1})
    with pytest.raises(type(exc)):
        atomic.write_with(path, partial_then(exc))
    assert json.loads(path.read_text()) == {"v": 1} and names(tmp_path) == ["a.json"]
    with pytest.raises(type(exc)):  # no old file: none appears
        atomic.write_with(tmp_path / "new.bin", partial_then(exc))
    assert names(tmp_path) == ["a.json"]


def test_a_failed_rename_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "a.json"
    atomic.write_json(path, {"v": 1})

    def refuse(*args):
        raise OSError(errno.EACCES, "rename refused")

    monkeypatch.setattr(atomic.os, "replace", refuse)
    with pytest.raises(OSError, match="rename refused"):
        atomic.write_json(path, {"v": 2})
    assert json.loads(path.read_text()) == {"v": 1} and names(tmp_path) == ["a.json"]


def test_the_written_file_is_fsynced_before_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: events.append("fsync") or real_fsync(fd))
    monkeypatch.setattr(atomic.os, "replace", lambda a, b: events.append("replace") or real_replace(a, b))
    atomic.write_bytes(tmp_path / "f", b"x")
    assert events[:2] == ["fsync", "replace"]  # then the directory's fsync where the OS allows


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX permission bits")
def test_files_get_the_permissions_a_plain_write_would(tmp_path):
    atomic.write_bytes(tmp_path / "atomic", b"x")
    (tmp_path / "plain").write_bytes(b"x")
    mode = stat.S_IMODE
    assert mode((tmp_path / "atomic").stat().st_mode) == mode((tmp_path / "plain").stat().st_mode)


def test_safetensors_round_trip(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    tensors = {
        "a": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "b": torch.tensor([7], dtype=torch.int64),
    }
    atomic.write_safetensors(tmp_path / "w.safetensors", tensors, metadata={"format": "pt"})
    loaded = load_file(tmp_path / "w.safetensors")
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    assert names(tmp_path) == ["w.safetensors"]


def test_a_file_set_replaces_all_files_or_none(tmp_path):
    for name in ("a", "b", "c"):
        (tmp_path / name).write_text("old")
    with pytest.raises(OSError, match="disk full"), atomic.FileSet() as files:
        files.add(tmp_path / "a", lambda p: p.write_text("new"))
        files.add(tmp_path / "b", partial_then(OSError(errno.ENOSPC, "disk full")))
    with pytest.raises(KeyboardInterrupt), atomic.FileSet() as files:
        files.add(tmp_path / "a", lambda p: p.write_text("new"))
        raise KeyboardInterrupt
    assert [(tmp_path / n).read_text() for n in ("a", "b", "c")] == ["old"] * 3 and names(tmp_path) == [
        "a",
        "b",
        "c",
    ]
    with atomic.FileSet() as files:
        for name in ("a", "b", "d"):
            files.add(tmp_path / name, lambda p: p.write_text("new"))
        assert (tmp_path / "a").read_text() == "old"  # nothing is replaced before the block ends
    assert [(tmp_path / n).read_text() for n in ("a", "b", "c", "d")] == ["new", "new", "old", "new"]
    assert names(tmp_path) == ["a", "b", "c", "d"]


def test_create_json_lets_the_first_writer_win(tmp_path, monkeypatch):
    path = tmp_path / "manifest.json"
    assert atomic.create_json(path, {"run": 1}) is True
    assert atomic.create_json(path, {"run": 2}) is False
    assert json.loads(path.read_text()) == {"run": 1} and names(tmp_path) == ["manifest.json"]

    def no_links(*args):
        raise PermissionError(errno.EPERM, "hard links not supported")

    monkeypatch.setattr(atomic.os, "link", no_links)
    other = tmp_path / "other.json"
    assert atomic.create_json(other, {"run": 3}) is False and not other.exists()
    assert atomic.create_json(other, {"run": 4}, replace_without_links=True) is True
    assert json.loads(other.read_text()) == {"run": 4} and names(tmp_path) == ["manifest.json", "other.json"]


def test_remove_temps_clears_only_what_it_is_asked_to(tmp_path):
    for name in (".a.png.1f2e.tmp", ".a.png.99.tmp", ".b.png.3c.tmp", "a.png", ".hidden"):
        (tmp_path / name).write_bytes(b"")
    atomic.remove_temps(tmp_path, "a.png")
    assert names(tmp_path) == [".b.png.3c.tmp", ".hidden", "a.png"]
    atomic.remove_temps(tmp_path)
    assert names(tmp_path) == [".hidden", "a.png"]


def test_publish_dir_replaces_a_directory_and_recover_dirs_undoes_a_killed_publish(tmp_path):
    final = tmp_path / "step-2"
    for content in ("first", "second"):
        staging = atomic.staging_dir(final)
        staging.mkdir()
        (staging / "state.json").write_text(content)
        atomic.publish_dir(staging, final)
        assert (final / "state.json").read_text() == content and names(tmp_path) == ["step-2"]
    # killed between the two renames: the old copy is aside, no replacement; plus a half-built staging dir
    os.replace(final, atomic.aside_dir(final))
    atomic.staging_dir(tmp_path / "step-3").mkdir()
    atomic.recover_dirs(tmp_path, "step-*")
    assert names(tmp_path) == ["step-2"] and (final / "state.json").read_text() == "second"


def test_os_error_behind_finds_the_errno_in_chains_and_rust_messages():
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("unexpected pos 128") from inner
    except RuntimeError as err:
        assert atomic.os_error_behind(err).errno == errno.ENOSPC
    assert atomic.os_error_behind(ValueError("I/O error: no space (os error 28)")).errno == 28
    assert atomic.os_error_behind(ValueError("bad value")) is None
