"""A parity reference directory: the official release's numbers on a small configuration (SPEC.md).

The layout is ``cases.json`` (the cases, their calls and settings, the special-token ids and the chat
stand-ins), ``cases.safetensors`` (every case's inputs and outputs, keyed ``<case>/<in|out>/<name>``) and a
checkpoint directory in the release layout. The tests (``tests/test_parity.py``) and the benchmarks
(``bench/bench_quant.py``) read it through here; ``CHEERS_REFERENCE_DIR`` points them at another directory
of the same layout.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch

from cheers.tokens import SpecialTokens

ENV_VAR = "CHEERS_REFERENCE_DIR"


def reference_dir(default: str | Path) -> Path:
    """``$CHEERS_REFERENCE_DIR`` when set, else ``default``."""
    return Path(os.environ.get(ENV_VAR) or default)


def special_tokens(meta: dict[str, Any]) -> SpecialTokens:
    """The special tokens a reference directory's ``cases.json`` names (ids and the chat stand-ins)."""
    ids, chat = meta["special_ids"], meta["chat_stand_in_ids"]
    return SpecialTokens(
        image=chat["IMAGE_WORD"],
        image_gen=chat["IMAGE_GEN_WORD"],
        im_start=ids["IM_START_ID"],
        im_end=ids["IM_END_ID"],
        no_mean=ids["NO_MEAN_ID"],
        eos=ids["EOS_TOKEN_ID"],
        pad=chat["PAD"],
        chat_start=chat["CHAT_START"],
        chat_end=chat["CHAT_END"],
        newline=chat["NEWLINE"],
        image_marker=ids["IMAGE_TOKEN_INDEX"],
        image_gen_marker=ids["IMAGE_GEN_TOKEN_INDEX"],
    )


@dataclasses.dataclass(frozen=True)
class ReferenceCases:
    """One reference directory, read: ``meta`` is ``cases.json``, ``tensors`` ``cases.safetensors``."""

    root: Path
    meta: dict[str, Any]
    tensors: dict[str, torch.Tensor]

    @property
    def checkpoint(self) -> Path:
        return self.root / self.meta.get("checkpoint_dir", "checkpoint")

    @property
    def special(self) -> SpecialTokens:
        return special_tokens(self.meta)

    def load_model(self, dtype: str = "float32"):
        """The reference checkpoint as a :class:`~cheers.models.cheers.Cheers` with the reference's tokens."""
        from cheers.models.pretrained import from_pretrained

        return from_pretrained(self.checkpoint, dtype=dtype, special=self.special)


def load_cases(root: str | Path) -> ReferenceCases:
    """Read a reference directory; a clear error when it is not one."""
    from safetensors.torch import load_file

    root = Path(root)
    missing = [name for name in ("cases.json", "cases.safetensors") if not (root / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{root} is not a parity reference directory: {', '.join(missing)} missing (set {ENV_VAR} to one)"
        )
    meta = json.loads((root / "cases.json").read_text())
    return ReferenceCases(root, meta, load_file(str(root / "cases.safetensors")))
