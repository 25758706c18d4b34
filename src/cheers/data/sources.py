"""Random-access training sources: the release's jsonl + image folder, and the interface every source follows.

A source is a finite, indexable collection of *records* in the release's conversation form, each with its
images already read (PIL images, in order of appearance: an edit's source image first, its target second)::

    record = {"id": ..., "image": "a.jpg" | "src.jpg, tgt.jpg" | absent,
              "conversations": [{"from": "human", "value": ...}, {"from": "gpt", "value": ...}]}

``load(i)`` raises :class:`CorruptSample` for a record or image that cannot be read; the data pipeline skips
it, counts it, and draws a replacement. ``epoch_order`` says in which order an epoch visits the records
(a seeded permutation; sharded sources keep each shard's records together so that reads stay sequential).
Everything is a pure function of (seed, index), which is what makes resuming exact.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
from PIL import Image

from cheers.data.records import RecordError, parse_record

logger = logging.getLogger(__name__)

IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


class CorruptSample(Exception):
    """A record or an image of it cannot be used. ``reason`` is short and stable (for counting)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@runtime_checkable
class Source(Protocol):
    name: str
    task: str

    def __len__(self) -> int: ...

    def load(self, index: int) -> tuple[dict[str, Any], list[Any]]: ...

    def epoch_order(self, epoch: int, seed: int) -> np.ndarray: ...


def permutation(n: int, *seed_parts: int) -> np.ndarray:
    """A seeded permutation of ``range(n)`` (numpy PCG64, independent of global state)."""
    return np.random.default_rng([abs(int(s)) for s in seed_parts]).permutation(n)


def check_record(record: Any, where: str = "<record>") -> list[str]:
    """Validate a release record (:func:`cheers.data.records.parse_record`); returns its image paths in order.

    Raises CorruptSample("bad_record") naming ``where`` for anything the release format does not allow.
    """
    try:
        parsed = parse_record(record, None, check_images=False, where=where)
    except RecordError as err:
        raise CorruptSample("bad_record", str(err)) from None
    return [str(p) for p in parsed.images]


def open_image(data_or_path: Any, what: str) -> Image.Image:
    """Open and fully decode an image (bytes or a path); any failure is a CorruptSample."""
    try:
        if isinstance(data_or_path, (bytes, bytearray)):
            import io

            image = Image.open(io.BytesIO(data_or_path))
        else:
            image = Image.open(data_or_path)
        image.load()
        return image
    except FileNotFoundError:
        raise CorruptSample("missing_image", what) from None
    except IMAGE_ERRORS as err:
        raise CorruptSample("unreadable_image", f"{what}: {err}") from None


class JsonlSource:
    """The release's training data: one JSON record per line, images under ``image_root``.

    Args:
        path: the jsonl file.
        image_root: folder the records' image paths are relative to (default: the jsonl's folder).
        name, task: how the mixture and the logs call this source.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        image_root: str | os.PathLike | None = None,
        name: str = "jsonl",
        task: str = "mixed",
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"data source {name!r}: no jsonl file at {self.path}")
        self.image_root = Path(image_root) if image_root else self.path.parent
        self.name, self.task = name, task
        self._offsets = self._index()
        self._handle: tuple[int, Any] | None = None  # (pid, file): reopened in every worker process
        if not len(self._offsets):
            raise ValueError(f"data source {name!r}: {self.path} holds no records")
        logger.info("source %s: %d records in %s", name, len(self._offsets), self.path)

    def _index(self) -> np.ndarray:
        offsets = []
        with open(self.path, "rb") as f:
            position = 0
            for line in f:
                if line.strip():
                    offsets.append(position)
                position += len(line)
        return np.asarray(offsets, dtype=np.int64)

    def __len__(self) -> int:
        return len(self._offsets)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_handle"] = None  # file objects do not cross process boundaries
        return state

    def _file(self):
        if self._handle is None or self._handle[0] != os.getpid():
            self._handle = (os.getpid(), open(self.path, "rb"))  # noqa: SIM115 - kept open for the run
        return self._handle[1]

    def read_record(self, index: int) -> dict[str, Any]:
        f = self._file()
        f.seek(int(self._offsets[index]))
        line = f.readline()
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CorruptSample("bad_record", f"{self.path} record {index}: {err}") from None
        check_record(record, f"{self.path} record {index}")
        return record

    def load(self, index: int) -> tuple[dict[str, Any], list[Any]]:
        record = self.read_record(index)
        paths = check_record(record, f"{self.path} record {index}")
        images = [open_image(self.image_root / p, f"{self.name}[{index}] {p}") for p in paths]
        return record, images

    def epoch_order(self, epoch: int, seed: int) -> np.ndarray:
        return permutation(len(self), seed, epoch, _stable_hash(self.name))


def _stable_hash(text: str) -> int:
    """A process-independent hash of a short string (Python's ``hash`` is salted per process)."""
    value = 1469598103934665603
    for byte in text.encode():
        value = ((value ^ byte) * 1099511628211) % (1 << 61)
    return value
