"""Image scorers: ShapesGenEval (a parsed image against a prompt spec) and ShapesEdit.

GenEval's rules (geneval/evaluation/evaluate_images.py) carried over to parsed objects:
- every ``include`` item needs at least ``count`` objects of its class (with its ``color`` if given);
- ``exclude`` items fail when ``count`` or more objects of the class are present (this is what makes
  counting exact);
- ``position = [rel, j]`` needs every matched object of the item to be ``rel`` of every matched object
  of item j, with GenEval's ``relative_position`` (centre offsets shrunk by 0.1 x the box sizes);
- an image is correct only if every requirement holds; the overall score is the mean of per-tag scores.
Extensions for dense specs: per-item ``size`` and ``cell`` filters, ``exact_count``, ``background``,
``text``. Parsed objects have no confidence order, so "matched objects" are all candidates.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .judge import ParsedObject, ParsedScene
from .world import Scene

POSITION_THRESHOLD = 0.1


@dataclass(frozen=True)
class SpecResult:
    correct: bool
    reasons: tuple[str, ...] = ()


def relative_position(a: tuple[float, ...], b: tuple[float, ...]) -> set[str]:
    """GenEval's relation of box a to box b; boxes are (x0, y0, x1, y1), y down."""
    boxes = np.array([a, b], dtype=np.float64).reshape(2, 2, 2)
    center_a, center_b = boxes.mean(axis=-2)
    dim_a, dim_b = np.abs(np.diff(boxes, axis=-2))[..., 0, :]
    offset = center_a - center_b
    revised = np.maximum(np.abs(offset) - POSITION_THRESHOLD * (dim_a + dim_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    rels = set()
    if dx < -0.5:
        rels.add("left of")
    if dx > 0.5:
        rels.add("right of")
    if dy < -0.5:
        rels.add("above")
    if dy > 0.5:
        rels.add("below")
    return rels


def _candidates(objects: tuple[ParsedObject, ...], req: dict[str, Any]) -> list[ParsedObject]:
    out = [o for o in objects if o.shape == req["class"]]
    if "color" in req:
        out = [o for o in out if o.color == req["color"]]
    if "size" in req:
        out = [o for o in out if o.size == req["size"]]
    if "cell" in req:
        out = [o for o in out if o.cell == tuple(req["cell"])]
    return out


def score_spec(parsed: ParsedScene, spec: dict[str, Any]) -> SpecResult:
    """Check a parsed image against a GenEval-style spec (see module docstring)."""
    if "include" not in spec:
        raise ValueError(f"spec has no 'include' list: {spec}")
    reasons: list[str] = []
    groups: list[list[ParsedObject] | None] = []
    for req in spec["include"]:
        found = _candidates(parsed.objects, req)
        ok = len(found) >= req["count"]
        if not ok:
            reasons.append(f"expected {_describe(req)} >= {req['count']}, found {len(found)}")
        elif "position" in req:
            rel, j = req["position"]
            target = groups[j] if j < len(groups) else None
            if target is None:
                ok = False
                reasons.append(f"no target for {req['class']} to be {rel}")
            else:
                for o in found:
                    bad = [t for t in target if rel not in relative_position(o.bbox, t.bbox)]
                    if bad:
                        ok = False
                        reasons.append(
                            f"expected {req['class']} {rel} target, "
                            f"found {sorted(relative_position(o.bbox, bad[0].bbox))}"
                        )
                        break
        groups.append(found if ok else None)
    for req in spec.get("exclude", []):
        n = sum(o.shape == req["class"] for o in parsed.objects)
        if n >= req["count"]:
            reasons.append(f"expected {req['class']} < {req['count']}, found {n}")
    if "exact_count" in spec and len(parsed.objects) != spec["exact_count"]:
        reasons.append(f"expected exactly {spec['exact_count']} objects, found {len(parsed.objects)}")
    if "background" in spec and parsed.background != spec["background"]["color"]:
        reasons.append(f"expected a {spec['background']['color']} background, found {parsed.background}")
    if "text" in spec and (parsed.text, parsed.text_color) != (spec["text"]["text"], spec["text"]["color"]):
        reasons.append(
            f"expected text {spec['text']['text']!r} in {spec['text']['color']}, "
            f"found {parsed.text!r} in {parsed.text_color}"
        )
    return SpecResult(not reasons and all(g is not None for g in groups), tuple(reasons))


def _describe(req: dict[str, Any]) -> str:
    return " ".join(str(req[k]) for k in ("size", "color", "class") if k in req)


def summarize_geneval(results: Iterable[tuple[str, bool]]) -> dict[str, float]:
    """Per-tag accuracy plus 'overall' (the mean of the per-tag accuracies, as GenEval reports).

    Args:
        results: (tag, correct) per image.
    """
    by_tag: dict[str, list[bool]] = defaultdict(list)
    for tag, ok in results:
        by_tag[tag].append(bool(ok))
    out = {tag: float(np.mean(v)) for tag, v in sorted(by_tag.items())}
    out["overall"] = float(np.mean(list(out.values()))) if out else 0.0
    return out


@dataclass(frozen=True)
class EditResult:
    """target_ok: the edit's requirement holds; preserved: share of untouched things kept (objects,
    and background/text where the edit did not change them); correct: both, with no extra objects."""

    target_ok: bool
    preserved: float
    correct: bool
    reasons: tuple[str, ...] = ()


def score_edit(parsed: ParsedScene, spec: dict[str, Any]) -> EditResult:
    """Score a parsed edited image against an edit spec {"kind", "source", "target"} (scene dicts)."""
    source, target = Scene.from_dict(spec["source"]), Scene.from_dict(spec["target"])
    src = Counter((o.shape, o.color, o.cell) for o in source.objects)
    tgt = Counter((o.shape, o.color, o.cell) for o in target.objects)
    got = Counter(parsed.object_keys())
    reasons: list[str] = []
    added, removed, kept = tgt - src, src - tgt, src & tgt
    missing_added = added - got
    leftover = Counter({k: v for k, v in (removed & got).items() if k not in tgt})
    if missing_added:
        reasons.append(f"edited objects missing: {sorted(missing_added)}")
    if leftover:
        reasons.append(f"objects that should be gone are present: {sorted(leftover)}")
    target_ok = not missing_added and not leftover
    if source.background.color != target.background.color:
        if parsed.background != target.background.color:
            target_ok = False
            reasons.append(f"background is {parsed.background}, expected {target.background.color}")
    checks = [min(got[k], n) for k, n in kept.items()]
    total = sum(kept.values())
    if source.background.color == target.background.color:
        checks.append(int(parsed.background == target.background.color))
        total += 1
    if target.text is not None:
        checks.append(int(parsed.text == target.text.text))
        total += 1
    preserved = float(sum(checks)) / total if total else 1.0
    extra = got - tgt
    if preserved < 1.0:
        reasons.append(f"untouched parts changed (kept {preserved:.2f})")
    if extra:
        reasons.append(f"unexpected objects: {sorted(extra)}")
    return EditResult(target_ok, preserved, target_ok and preserved == 1.0 and not extra, tuple(reasons))
