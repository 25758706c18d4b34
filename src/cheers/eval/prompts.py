"""The bundled benchmark prompts (``cheers/eval/data/``) and readers for user-supplied ones.

* ``data/geneval/evaluation_metadata.jsonl``: GenEval's 553 prompts ({"tag", "include", "prompt"} a line).
* ``data/geneval/evaluation_metadata_long.jsonl``: the same specs with rewritten, longer prompts.
* ``data/geneval/object_names.txt``: GenEval's 80 COCO class names (what its detector knows).
* ``data/dpg/prompts/<name>.txt``: DPG-Bench's 1065 prompts, one file each (the image is ``<name>.png``).
"""

from __future__ import annotations

from pathlib import Path

DATA_DIR = Path(__file__).parent / "data"
GENEVAL_SETS = {"short": "evaluation_metadata.jsonl", "long": "evaluation_metadata_long.jsonl"}


def geneval_metadata_path(prompts: str) -> Path:
    """``"short"`` / ``"long"`` -> the bundled file; anything else is a path that must exist."""
    if prompts in GENEVAL_SETS:
        return DATA_DIR / "geneval" / GENEVAL_SETS[prompts]
    path = Path(prompts).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"GenEval prompts must be 'short', 'long' or a metadata jsonl file; {path} is none"
        )
    return path


def geneval_object_names() -> list[str]:
    text = (DATA_DIR / "geneval" / "object_names.txt").read_text(encoding="utf-8")
    return [name.strip() for name in text.splitlines() if name.strip()]


def dpg_prompts(directory: str | Path | None = None) -> list[tuple[str, str]]:
    """DPG-Bench prompts as (name, text), sorted by name; ``directory`` of ``*.txt`` files, else the bundled
    set."""
    root = DATA_DIR / "dpg" / "prompts" if directory is None else Path(directory).expanduser()
    files = sorted(root.glob("*.txt")) if root.is_dir() else []
    if not files:
        raise FileNotFoundError(f"no DPG-Bench prompt files (*.txt) in {root}")
    out = []
    for f in files:
        text = f.read_text(encoding="utf-8").strip()
        if not text:
            raise ValueError(f"DPG-Bench prompt file {f} is empty")
        out.append((f.stem, text))
    return out
