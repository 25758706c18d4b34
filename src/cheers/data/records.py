"""The release's training records: one JSON object per line, read into typed, validated records.

Line format (the release's training data; docs/reference.md §11)::

    {"id": ..., "image": "path" | "src_path, target_path" | absent,
     "conversations": [{"from": "human", "value": ...}, {"from": "gpt", "value": ...}, ...]}

Kinds follow from the image markers: understanding (one ``<image>`` in a human turn), generation (one
``<image_gen>`` in a gpt turn), editing (``<image>`` for the source in a human turn and ``<image_gen>``
for the target in a gpt turn, two paths), text (no image, no marker). Markers must match the image
paths one to one, in order. Errors name the file and line. Unknown keys are kept in ``Record.extra``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

logger = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"
IMAGE_GEN_TOKEN = "<image_gen>"
IMAGE_START = "<im_start>"
IMAGE_END = "<im_end>"
ROLES = ("human", "gpt")
RecordKind = Literal["understanding", "generation", "editing", "text"]


class RecordError(ValueError):
    """A record that breaks the release format; the message names the file and line."""


@dataclass(frozen=True)
class Turn:
    role: str
    value: str


@dataclass(frozen=True)
class Record:
    """One training sample.

    images: resolved image paths in order of appearance (source before target); relative to nothing
    when no image root was given. extra: any keys beyond id/image/conversations.
    """

    id: str
    kind: RecordKind
    conversations: tuple[Turn, ...]
    images: tuple[Path, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self, image_root: str | Path | None = None) -> dict[str, Any]:
        """The release-format dict; image paths are written relative to ``image_root`` when given."""
        out: dict[str, Any] = {"id": self.id}
        if self.images:
            paths = [
                str(p.relative_to(image_root)) if image_root is not None else str(p) for p in self.images
            ]
            out["image"] = ", ".join(p.replace("\\", "/") for p in paths)
        out["conversations"] = [{"from": t.role, "value": t.value} for t in self.conversations]
        out.update(self.extra)
        return out


def parse_record(
    obj: Any, image_root: str | Path | None = None, check_images: bool = True, where: str = "<record>"
) -> Record:
    """Validate one decoded JSON object and build a Record.

    Args:
        obj: the decoded line.
        image_root: folder the image paths are relative to (None keeps them as written).
        check_images: require every image file to exist (only with an image_root).
        where: "file:line" used in error messages.
    Raises:
        RecordError naming ``where`` and the problem.
    """
    if not isinstance(obj, dict):
        raise RecordError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    rid = obj.get("id")
    if not isinstance(rid, (str, int)) or isinstance(rid, bool) or str(rid) == "":
        raise RecordError(f"{where}: 'id' must be a non-empty string or integer, got {rid!r}")
    convs = obj.get("conversations")
    if not isinstance(convs, list) or not convs:
        raise RecordError(
            f"{where} (id {rid}): 'conversations' must be a non-empty list, got {type(convs).__name__}"
        )
    turns = []
    for i, t in enumerate(convs):
        if not isinstance(t, dict) or t.get("from") not in ROLES or not isinstance(t.get("value"), str):
            raise RecordError(
                f"{where} (id {rid}): turn {i} must be {{'from': 'human'|'gpt', 'value': str}}, got {t!r}"
            )
        expected = ROLES[i % 2]
        if t["from"] != expected:
            raise RecordError(
                f"{where} (id {rid}): turn {i} is from {t['from']!r}, expected {expected!r} "
                "(turns alternate, human first)"
            )
        turns.append(Turn(t["from"], t["value"]))
    paths = _split_paths(obj.get("image"), where, rid)
    markers = _markers(turns)
    if any(m[1] == IMAGE_GEN_TOKEN and m[0] != "gpt" for m in markers):
        raise RecordError(f"{where} (id {rid}): {IMAGE_GEN_TOKEN} may only appear in gpt turns")
    if any(m[1] == IMAGE_TOKEN and m[0] != "human" for m in markers):
        raise RecordError(f"{where} (id {rid}): {IMAGE_TOKEN} may only appear in human turns")
    if len(markers) != len(paths):
        raise RecordError(
            f"{where} (id {rid}): {len(markers)} image marker(s) {[m[1] for m in markers]} "
            f"but {len(paths)} image path(s) {paths}"
        )
    kinds = tuple(m[1] for m in markers)
    kind: RecordKind
    if kinds == ():
        kind = "text"
    elif kinds == (IMAGE_TOKEN,):
        kind = "understanding"
    elif kinds == (IMAGE_GEN_TOKEN,):
        kind = "generation"
    elif kinds == (IMAGE_TOKEN, IMAGE_GEN_TOKEN):
        kind = "editing"
    else:
        raise RecordError(f"{where} (id {rid}): unsupported marker sequence {list(kinds)}")
    images = tuple(Path(image_root) / p if image_root is not None else Path(p) for p in paths)
    if check_images and image_root is not None:
        for p in images:
            if not p.is_file():
                raise RecordError(f"{where} (id {rid}): image file {str(p)!r} does not exist")
    extra = {k: v for k, v in obj.items() if k not in ("id", "image", "conversations")}
    return Record(str(rid), kind, tuple(turns), images, extra)


def _split_paths(image: Any, where: str, rid: Any) -> list[str]:
    if image is None:
        return []
    if not isinstance(image, str) or not image.strip():
        raise RecordError(f"{where} (id {rid}): 'image' must be a non-empty string, got {image!r}")
    paths = [p.strip() for p in image.split(", ")]
    if any(not p for p in paths) or len(paths) > 2:
        raise RecordError(
            f"{where} (id {rid}): 'image' must be 'path' or 'src_path, target_path', got {image!r}"
        )
    return paths


def _markers(turns: list[Turn]) -> list[tuple[str, str]]:
    """(role, marker) for every <image>/<image_gen> in order of appearance."""
    out = []
    for t in turns:
        pos = 0
        while True:
            i, j = t.value.find(IMAGE_TOKEN, pos), t.value.find(IMAGE_GEN_TOKEN, pos)
            hits = [(k, m) for k, m in ((i, IMAGE_TOKEN), (j, IMAGE_GEN_TOKEN)) if k >= 0]
            if not hits:
                break
            k, m = min(hits)
            out.append((t.role, m))
            pos = k + len(m)
    return out


def iter_records(
    path: str | Path, image_root: str | Path | None = None, check_images: bool = True
) -> Iterator[Record]:
    """Yield the records of a jsonl file (blank lines skipped); raises RecordError naming the line."""
    path = Path(path)
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise RecordError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from e
            yield parse_record(obj, image_root, check_images, where)


def read_records(
    path: str | Path, image_root: str | Path | None = None, check_images: bool = True
) -> list[Record]:
    """All records of a jsonl file; ids must be unique within the file."""
    out = list(iter_records(path, image_root, check_images))
    seen: set[str] = set()
    for r in out:
        if r.id in seen:
            raise RecordError(f"{path}: duplicate id {r.id!r}")
        seen.add(r.id)
    logger.info("read %d records from %s", len(out), path)
    return out


def write_records(path: str | Path, records: list[Record], image_root: str | Path | None = None) -> None:
    """Write records as release-format jsonl (image paths relative to ``image_root`` when given)."""
    with Path(path).open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r.to_json(image_root), ensure_ascii=False) + "\n")
