"""``from_pretrained`` / ``save_pretrained`` for :class:`~cheers.models.cheers.Cheers` in the release layout.

The model is built on the meta device and the checkpoint's tensors are assigned into it, so the 5.6 GB
release never exists twice in memory. Loading is strict: any missing, unexpected or mis-shaped tensor is
reported by name. Weights are safetensors only.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from cheers import checkpoint as ckpt
from cheers.config import CheersConfig
from cheers.models.cheers import Cheers
from cheers.tokens import SpecialTokens

logger = logging.getLogger(__name__)

SPECIAL_TOKENS_FILE = "cheers_special_tokens.json"
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_dtype(dtype: torch.dtype | str | None, default: str = "float32") -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    name = default if dtype in (None, "auto") else str(dtype).replace("torch.", "")
    if name not in _DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; choose one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def _materialize_nonpersistent(model: Cheers, device: torch.device) -> None:
    """Re-create the buffers a checkpoint does not store (rotary inv_freq, SigLIP position ids)."""
    lm = model.model.language_model
    rotary_cls = type(lm.rotary_emb)
    with torch.device(device):
        lm.rotary_emb = rotary_cls(config=lm.config)
    emb = model.model.vision_representation.embeddings
    emb.register_buffer(
        "position_ids", torch.arange(emb.num_positions, device=device).expand((1, -1)), persistent=False
    )


def load_special_tokens(directory: Path) -> SpecialTokens | None:
    """Special ids from the directory's tokenizer, or from ``cheers_special_tokens.json``, else None."""
    path = directory / SPECIAL_TOKENS_FILE
    if path.exists():
        return SpecialTokens.from_dict(json.loads(path.read_text()))
    if (directory / "tokenizer_config.json").exists() or (directory / "tokenizer.json").exists():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(directory))
        from cheers.tokens import add_cheers_special_tokens

        add_cheers_special_tokens(tokenizer)
        return SpecialTokens.from_tokenizer(tokenizer)
    return None


def from_pretrained(
    name_or_path: str | Path,
    *,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str = "cpu",
    special: SpecialTokens | None = None,
    revision: str | None = None,
    strict: bool = True,
) -> Cheers:
    """Load a checkpoint directory (or hub id) in the release layout.

    Args:
        name_or_path: a local directory with ``config.json`` and safetensors weights, or a hub id.
        dtype: parameter dtype; default: the checkpoint's ``torch_dtype`` (bf16 for the release).
        device: where the weights go.
        special: special-token ids; default: resolved from the tokenizer files in the directory.
        strict: raise on any missing/unexpected/mis-shaped tensor.
    """
    directory = ckpt.resolve_checkpoint_dir(str(name_or_path), revision=revision)
    config = CheersConfig.from_json_file(directory / ckpt.CONFIG_NAME)
    torch_dtype = resolve_dtype(dtype, config.torch_dtype)
    device = torch.device(device)
    with torch.device("meta"):
        model = Cheers(config, special=special)
    _materialize_nonpersistent(model, device)
    state = ckpt.load_state_dict(directory, dtype=torch_dtype, device=device)
    report = ckpt.load_into(model, state, strict=strict, assign=True)
    del state
    leftovers = [n for n, t in model.state_dict(keep_vars=True).items() if t.is_meta]
    if leftovers:
        raise ckpt.CheckpointError(f"tensors left uninitialised after loading {directory}: {leftovers[:20]}")
    model.tie_weights()
    if special is None:
        model.special = load_special_tokens(directory)
    logger.info("loaded %s: %d tensors, dtype %s", directory, report.n_loaded, torch_dtype)
    return model.eval()


def save_pretrained(
    model: Cheers,
    directory: str | Path,
    *,
    max_shard_size: int | str = "5GB",
    dtype: torch.dtype | str | None = None,
) -> Path:
    """Write config.json, safetensors weights (both tied names) and the special-token ids, atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    if dtype is not None:
        target = resolve_dtype(dtype)
        state = {k: v.to(target) if v.is_floating_point() else v for k, v in state.items()}
    stored = {v.dtype for v in state.values() if v.is_floating_point()}
    config = model.config
    if len(stored) == 1:
        name = str(next(iter(stored))).replace("torch.", "")
        config = config.replace(torch_dtype=name) if name != config.torch_dtype else config
    ckpt.save_state_dict(state, directory, max_shard_size=max_shard_size)
    ckpt.atomic_write_json(directory / ckpt.CONFIG_NAME, config.to_dict())
    if model.special is not None:
        ckpt.atomic_write_json(directory / SPECIAL_TOKENS_FILE, model.special.to_dict())
    return directory
