"""WebDataset-style tar shards: the format that scales past one disk, read with the stdlib ``tarfile``.

A shard directory holds ``shard-000000.tar``, ``shard-000001.tar``, ... and ``index.json``
(``{"format": "cheers-shards-1", "shards": [{"name": ..., "count": ...}, ...]}``). Inside a shard, sample
``KEY`` is the members ``KEY.json`` (the release record; its ``image`` field names the image members) and
``KEY.0.<ext>``, ``KEY.1.<ext>``... (the images in order of appearance). Shards can live anywhere a path
reaches (a network file system, a mounted bucket); each worker opens the shards it reads.

Reads are random access but shard-local: an epoch visits the shards in a seeded order and the records of
each shard in a seeded order, so a worker reads one shard at a time.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from cheers.checkpoint import atomic_write_json
from cheers.data.sources import (
    CorruptSample,
    JsonlSource,
    _stable_hash,
    check_record,
    open_image,
    permutation,
)

logger = logging.getLogger(__name__)

INDEX = "index.json"
FORMAT = "cheers-shards-1"


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # reproducible shards
    tar.addfile(info, io.BytesIO(data))


def write_shards(
    records: Iterable[tuple[dict[str, Any], list[bytes | Path]]],
    out_dir: str | os.PathLike,
    samples_per_shard: int = 1000,
) -> Path:
    """Write (record, images) pairs as tar shards plus ``index.json``.

    Args:
        records: release records with their images as encoded bytes or file paths, in order of appearance.
        out_dir: the shard directory (created).
        samples_per_shard: records per tar file.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, Any]] = []
    tar: tarfile.TarFile | None = None
    for n, (record, images) in enumerate(records):
        if n % samples_per_shard == 0:
            if tar is not None:
                tar.close()
            name = f"shard-{len(shards):06d}.tar"
            tar = tarfile.open(out / name, "w")
            shards.append({"name": name, "count": 0})
        key = f"{n:09d}"
        names = []
        for j, image in enumerate(images):
            ext = Path(image).suffix.lstrip(".") if isinstance(image, (str, Path)) else "png"
            member = f"{key}.{j}.{ext or 'png'}"
            data = Path(image).read_bytes() if isinstance(image, (str, Path)) else bytes(image)
            _add(tar, member, data)
            names.append(member)
        stored = dict(record)
        if names:
            stored["image"] = ", ".join(names)
        _add(tar, f"{key}.json", json.dumps(stored, ensure_ascii=False).encode())
        shards[-1]["count"] += 1
    if tar is not None:
        tar.close()
    atomic_write_json(out / INDEX, {"format": FORMAT, "shards": shards})
    logger.info("wrote %d records in %d shard(s) to %s", sum(s["count"] for s in shards), len(shards), out)
    return out


def jsonl_to_shards(
    jsonl: str | os.PathLike,
    image_root: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    samples_per_shard: int = 1000,
) -> Path:
    """Convert the release's jsonl + image folder into shards (records that fail to parse are kept out)."""
    source = JsonlSource(jsonl, image_root)

    def pairs():
        for i in range(len(source)):
            try:
                record = source.read_record(i)
            except CorruptSample as err:
                logger.warning("skipping record %d of %s: %s", i, jsonl, err)
                continue
            yield record, [source.image_root / p for p in check_record(record)]

    return write_shards(pairs(), out_dir, samples_per_shard)


class ShardSource:
    """Random access to a shard directory (see the module docstring).

    Args:
        path: the shard directory (with ``index.json``; without one, every ``*.tar`` is scanned once).
        name, task: as for :class:`~cheers.data.sources.JsonlSource`.
        cache_shards: member tables kept open per worker.
    """

    def __init__(
        self, path: str | os.PathLike, name: str = "shards", task: str = "mixed", cache_shards: int = 4
    ) -> None:
        self.path = Path(path)
        self.name, self.task = name, task
        self.cache_shards = cache_shards
        self.shards, self.counts = self._read_index()
        self.starts = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)
        self._open: OrderedDict[int, tuple[tarfile.TarFile, dict[str, dict[str, tarfile.TarInfo]], list[str]]]
        self._open = OrderedDict()
        self._pid = os.getpid()
        if not len(self):
            raise ValueError(f"data source {name!r}: no records in {self.path}")
        logger.info(
            "source %s: %d records in %d shard(s) at %s", name, len(self), len(self.shards), self.path
        )

    def _read_index(self) -> tuple[list[str], np.ndarray]:
        if not self.path.is_dir():
            raise FileNotFoundError(f"data source {self.name!r}: no shard directory at {self.path}")
        index = self.path / INDEX
        if index.is_file():
            meta = json.loads(index.read_text())
            if meta.get("format") != FORMAT:
                raise ValueError(f"{index}: format {meta.get('format')!r} is not {FORMAT!r}")
            return [s["name"] for s in meta["shards"]], np.asarray(
                [s["count"] for s in meta["shards"]], np.int64
            )
        names = sorted(p.name for p in self.path.glob("*.tar"))
        counts = []
        for name in names:
            with tarfile.open(self.path / name) as tar:
                counts.append(sum(1 for m in tar.getmembers() if m.name.endswith(".json")))
        logger.info("no %s in %s: scanned %d shard(s)", INDEX, self.path, len(names))
        return names, np.asarray(counts, np.int64)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_open"] = OrderedDict()  # open tar files stay in the process that opened them
        return state

    def _shard(self, s: int) -> tuple[tarfile.TarFile, dict[str, dict[str, tarfile.TarInfo]], list[str]]:
        if self._pid != os.getpid():
            self._open, self._pid = OrderedDict(), os.getpid()
        if s in self._open:
            self._open.move_to_end(s)
            return self._open[s]
        try:
            tar = tarfile.open(self.path / self.shards[s])
            members: dict[str, dict[str, tarfile.TarInfo]] = {}
            for m in tar.getmembers():
                key = m.name.split(".", 1)[0]
                members.setdefault(key, {})[m.name] = m
        except (OSError, tarfile.TarError) as err:
            raise CorruptSample("unreadable_shard", f"{self.shards[s]}: {err}") from None
        keys = sorted(k for k, v in members.items() if f"{k}.json" in v)
        self._open[s] = (tar, members, keys)
        while len(self._open) > self.cache_shards:
            self._open.popitem(last=False)[1][0].close()
        return self._open[s]

    def load(self, index: int) -> tuple[dict[str, Any], list[Any]]:
        s = int(np.searchsorted(self.starts, index, side="right") - 1)
        tar, members, keys = self._shard(s)
        local = index - int(self.starts[s])
        if local >= len(keys):
            raise CorruptSample(
                "bad_record", f"{self.shards[s]} holds {len(keys)} records, index.json says more"
            )
        key = keys[local]
        entry = members[key]
        try:
            record = json.loads(tar.extractfile(entry[f"{key}.json"]).read())
        except (json.JSONDecodeError, UnicodeDecodeError, OSError, tarfile.TarError) as err:
            raise CorruptSample("bad_record", f"{self.shards[s]}:{key}: {err}") from None
        images = []
        for name in check_record(record, f"{self.shards[s]}:{key}"):
            if name not in entry:
                raise CorruptSample("missing_image", f"{self.shards[s]}:{name}")
            try:
                data = tar.extractfile(entry[name]).read()
            except (OSError, tarfile.TarError) as err:
                raise CorruptSample("unreadable_image", f"{self.shards[s]}:{name}: {err}") from None
            images.append(open_image(data, f"{self.shards[s]}:{name}"))
        return record, images

    def epoch_order(self, epoch: int, seed: int) -> np.ndarray:
        salt = _stable_hash(self.name)
        parts = []
        for s in permutation(len(self.shards), seed, epoch, salt):
            parts.append(self.starts[s] + permutation(int(self.counts[s]), seed, epoch, salt, int(s) + 1))
        return np.concatenate(parts)
