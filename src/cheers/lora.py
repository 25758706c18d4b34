"""LoRA adapters on a Cheers model, with peft: inject, save and load in peft's format, combine, fuse.

An adapter adds ``scale · (alpha / r) · B A x`` to chosen ``nn.Linear`` layers (A: r x in, B: out x r, B = 0
at init, so a new adapter changes nothing). The default targets are the projections of every Qwen2 decoder
layer (``self_attn.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj``) and of every DiT block of both flow heads
(``model.gen_projector`` and ``model.hi_projector``: ``attn.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj``),
so one adapter can change what the model answers and what it draws. Targets are a regular expression
matched against the whole module name, or a list of names (a name also matches as a dotted suffix), as in
peft's ``target_modules``.

On disk an adapter is peft's own layout, readable by ``peft.PeftModel.from_pretrained(cheers_model, dir)``::

    adapter_config.json          peft's LoraConfig (peft_type LORA, r, lora_alpha, target_modules, ...)
    adapter_model.safetensors    base_model.model.<module>.lora_A.weight / lora_B.weight (no pickle)

Several adapters can be loaded at once; each is active at its own weight (:func:`set_adapters`). Fusing
adds the active adapters' deltas into the base weights (no extra cost per call); unfusing subtracts them
again; unloading removes the adapter layers (a fused delta stays in the weights, as in diffusers).

peft is imported only when an adapter is used: ``import cheers`` works without it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cheers import atomic

if TYPE_CHECKING:  # torch and peft are imported where adapters are used: this module stays light
    import torch
    from torch import nn

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # how peft's PeftModel names the wrapped model's tensors on disk
DEFAULT_ADAPTER = "default"
DEFAULT_TARGETS = (
    r"model\.language_model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)"
    r"|model\.(gen|hi)_projector\.diffusion_head_a\.\d+\.(attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)"
)
_ADAPTER_NAME_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_LORA_KEY_RE = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B)\.weight$")
_ACTIVE = "lora_active"  # model attribute: {adapter name: weight} of the active adapters, in order
_FUSED = "lora_fused_scale"  # model attribute: the lora_scale of the fused adapters (absent: not fused)


def require_peft():
    """The ``peft`` module, or an ImportError that names the fix."""
    try:
        import peft
    except ImportError as err:
        raise ImportError(
            "LoRA adapters need peft, which is not installed: pip install 'cheers[lora]'"
        ) from err
    return peft


# -- the spec ------------------------------------------------------------------------------------------------
@dataclass
class LoraSpec:
    """What an adapter adapts and how big it is.

    Args:
        r: rank of A and B.
        alpha: the delta is scaled by ``alpha / r``.
        dropout: dropout on the adapter's input during training.
        targets: a regular expression matched against whole module names, or a list of module names (each
            also matching as a dotted suffix, e.g. ``q_proj``).
        bias: peft's bias mode; only ``"none"`` (biases stay frozen and are not saved).
    """

    r: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    targets: str | list[str] = field(default=DEFAULT_TARGETS)
    bias: str = "none"

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"LoRA rank r must be a positive integer, got {self.r!r}")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"LoRA alpha must be a finite number > 0, got {self.alpha!r}")
        if not (isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1):
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if self.bias != "none":
            raise ValueError(f"LoRA bias must be 'none' (biases stay frozen), got {self.bias!r}")
        if isinstance(self.targets, str):
            if not self.targets.strip():
                raise ValueError("LoRA targets must not be empty")
            try:
                re.compile(self.targets)
            except re.error as err:
                raise ValueError(
                    f"LoRA targets {self.targets!r} is not a valid regular expression: {err}"
                ) from None
        elif not (
            isinstance(self.targets, (list, tuple))
            and self.targets
            and all(isinstance(t, str) and t for t in self.targets)
        ):
            raise ValueError(
                f"LoRA targets must be a regular expression or a list of names, got {self.targets!r}"
            )
        else:
            self.targets = list(self.targets)

    def to_peft(self, base_model: str | None = None):
        """peft's ``LoraConfig`` for this spec (``base_model`` is recorded as ``base_model_name_or_path``)."""
        peft = require_peft()
        return peft.LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=self.targets,
            bias=self.bias,
            base_model_name_or_path=base_model,
        )


# -- finding layers ------------------------------------------------------------------------------------------
def _matches(targets: str | Sequence[str], name: str) -> bool:
    """peft's ``target_modules`` rule: a string is a full-match regex, a list matches names or suffixes."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return name in targets or any(name.endswith("." + t) for t in targets)


def _lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, layer) of every peft LoRA layer in ``model``."""
    if not hasattr(model, "peft_config"):
        return []
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def target_modules(model: nn.Module, targets: str | Sequence[str]) -> list[str]:
    """Names of the ``nn.Linear`` layers of ``model`` that ``targets`` selects (adapter layers excluded).

    Raises:
        ValueError: when nothing matches, naming the targets and some module names that exist.
    """
    from torch import nn

    found, linear = [], []
    for name, module in model.named_modules():
        if ".lora_" in name or name.endswith(".base_layer") or ".base_layer." in name:
            continue
        if isinstance(module, nn.Linear) or hasattr(module, "base_layer"):
            linear.append(name)
            if _matches(targets, name):
                found.append(name)
    if not found:
        examples = ", ".join(linear[:4] + ["..."] + linear[-2:]) if len(linear) > 6 else ", ".join(linear)
        raise ValueError(
            f"LoRA targets {targets!r} match no linear layer of this model; its linear layers are named like "
            f"{examples}"
        )
    return found


# -- adding, saving, loading ---------------------------------------------------------------------------------
def adapter_names(model: nn.Module) -> list[str]:
    """Every adapter in ``model`` (active or not), in the order they were added."""
    return list(getattr(model, "peft_config", {}))


def _check_new_name(model: nn.Module, name: str) -> None:
    if not isinstance(name, str) or not _ADAPTER_NAME_RE.match(name):
        raise ValueError(f"adapter name {name!r} must be letters, digits, '_' or '-'")
    if name in adapter_names(model):
        raise ValueError(f"the model already has an adapter named {name!r}; adapters: {adapter_names(model)}")
    if getattr(model, _FUSED, None) is not None:
        raise ValueError("the model's adapters are fused: unfuse them before adding another")


def _inject(model: nn.Module, config, name: str, trainable: bool, upcast: bool = False) -> None:
    """Inject peft layers for ``config`` under ``name``; the active set and ``requires_grad`` are ours."""
    peft = require_peft()
    target_modules(model, config.target_modules)  # a clear error before peft's
    before = dict(getattr(model, _ACTIVE, {}))
    configs = model.__dict__.pop("peft_config", {})  # peft warns when it finds one: we keep them ourselves
    try:
        peft.inject_adapter_in_model(config, model, adapter_name=name)
    finally:
        model.peft_config = {**configs, **getattr(model, "peft_config", {})}
    if upcast:  # float32 adapter tensors over a bf16 / fp16 base: the optimizer's masters stay precise
        from peft.tuners.tuners_utils import cast_adapter_dtype

        cast_adapter_dtype(model, name, autocast_adapter_dtype=True)
    object.__setattr__(model, _ACTIVE, before)  # peft activated only the new adapter; set_adapters decides
    for _, layer in _lora_layers(model):
        layer.set_adapter(list(before) or [name], inference_mode=True)
    for pname, p in model.named_parameters():
        if f".{name}." in pname and ".lora_" in pname:
            p.requires_grad_(trainable)


def add_adapter(
    model: nn.Module,
    spec: LoraSpec,
    adapter_name: str = DEFAULT_ADAPTER,
    *,
    weight: float = 1.0,
    trainable: bool = False,
    upcast: bool = False,
    base_model: str | None = None,
) -> list[str]:
    """Inject a new adapter (B = 0: outputs unchanged) and make it active at ``weight``.

    Args:
        model: a :class:`~cheers.models.cheers.Cheers` (or any module whose names the targets select).
        spec: rank, alpha, dropout and targets.
        adapter_name: the adapter's name (letters, digits, ``_``, ``-``).
        trainable: the adapter's tensors require grad. peft freezes every other weight when it injects.
        upcast: keep the adapter's tensors in float32 over a bf16 / fp16 base (for training).
        base_model: recorded in the saved ``adapter_config.json`` (e.g. ``ai9stars/Cheers``).

    Returns:
        The names of the adapted layers.
    """
    _check_new_name(model, adapter_name)
    _inject(model, spec.to_peft(base_model), adapter_name, trainable, upcast)
    set_adapters(model, [*get_active_adapters(model), adapter_name], [*_active_weights(model), weight])
    adapted = [n for n, layer in _lora_layers(model) if adapter_name in layer.lora_A]
    logger.info("LoRA adapter %r: %d layers, r=%d, alpha=%g", adapter_name, len(adapted), spec.r, spec.alpha)
    return adapted


def adapter_state_dict(
    model: nn.Module, adapter_name: str = DEFAULT_ADAPTER, state: Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """The adapter's tensors under peft's on-disk names (``base_model.model.<module>.lora_A.weight``).

    Args:
        state: a state dict of ``model`` to take them from (e.g. gathered from FSDP2 shards); default the
            model's own.
    """
    require_peft()
    from peft.utils import get_peft_model_state_dict

    if adapter_name not in adapter_names(model):
        raise ValueError(f"no adapter named {adapter_name!r}; adapters: {adapter_names(model)}")
    if state is None:
        state = {k: v for k, v in model.state_dict().items() if ".lora_" in k}
    # save_embedding_layers=False: only A and B are ours to save (peft's "auto" looks the base model up
    # on the hub to compare vocabulary sizes)
    tensors = get_peft_model_state_dict(
        model, state_dict=dict(state), adapter_name=adapter_name, save_embedding_layers=False
    )
    return {PEFT_PREFIX + k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}


def peft_config_dict(config) -> dict[str, Any]:
    """``adapter_config.json``'s content as peft writes it (sets as lists)."""
    out = config.to_dict()
    return {k: sorted(v) if isinstance(v, set) else v for k, v in out.items()}


def write_adapter(
    directory: str | os.PathLike,
    tensors: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    dtype: torch.dtype | None = None,
) -> Path:
    """Write an adapter in peft's layout, both files together (atomically: see :class:`atomic.FileSet`)."""
    import safetensors.torch

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v.to(dtype) if dtype is not None else v) for k, v in tensors.items()}
    data = (json.dumps(dict(config), indent=2, sort_keys=True, default=str) + "\n").encode()
    with atomic.FileSet() as files:
        files.add(
            directory / ADAPTER_WEIGHTS,
            lambda p: safetensors.torch.save_file(dict(tensors), p, metadata={"format": "pt"}),
        )
        files.add(directory / ADAPTER_CONFIG, lambda p: p.write_bytes(data))
    return directory


def save_adapter(
    model: nn.Module,
    directory: str | os.PathLike,
    adapter_name: str = DEFAULT_ADAPTER,
    *,
    base_model: str | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Save one adapter in peft's layout (``adapter_config.json`` + ``adapter_model.safetensors``).

    Args:
        base_model: overrides the config's ``base_model_name_or_path``.
        dtype: store the tensors in this dtype (default: as they are).
    """
    tensors = adapter_state_dict(model, adapter_name)
    config = peft_config_dict(model.peft_config[adapter_name])
    if base_model is not None:
        config["base_model_name_or_path"] = base_model
    return write_adapter(directory, tensors, config, dtype)


def read_adapter(path: str | os.PathLike) -> tuple[Any, dict[str, torch.Tensor]]:
    """(peft LoraConfig, tensors under the model's names) of an adapter directory, checked.

    Raises:
        ValueError: a missing directory or file, pickle weights only, a config that is not LoRA or that peft
            cannot read, or tensor names that are not LoRA A/B weights.
    """
    peft = require_peft()
    import safetensors.torch

    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise ValueError(f"LoRA adapter {str(path)!r}: no such directory")
    missing = [f for f in (ADAPTER_CONFIG, ADAPTER_WEIGHTS) if not (directory / f).is_file()]
    if missing:
        pickled = " (adapter_model.bin is pickle: it is not loaded; re-save it as safetensors)"
        hint = pickled if (directory / "adapter_model.bin").exists() else ""
        raise ValueError(f"LoRA adapter {str(path)!r}: missing {', '.join(missing)}{hint}")
    try:
        data = json.loads((directory / ADAPTER_CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"LoRA adapter {str(path)!r}: {ADAPTER_CONFIG} is not valid JSON ({err})") from None
    if not isinstance(data, dict) or data.get("peft_type") != "LORA":
        kind = data.get("peft_type") if isinstance(data, dict) else None
        raise ValueError(f"LoRA adapter {str(path)!r}: peft_type is {kind!r}, not 'LORA'")
    if data.get("modules_to_save"):
        raise ValueError(
            f"LoRA adapter {str(path)!r}: modules_to_save {data['modules_to_save']} (fully trained copies of "
            "layers) is not supported; only LoRA A/B weights are loaded"
        )
    try:
        config = peft.LoraConfig.from_peft_type(**peft.LoraConfig.check_kwargs(**data))
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"LoRA adapter {str(path)!r}: {ADAPTER_CONFIG} is not a valid LoraConfig: {err}"
        ) from None
    try:
        raw = safetensors.torch.load_file(str(directory / ADAPTER_WEIGHTS))
    except Exception as err:  # safetensors raises its own error type for a damaged file
        raise ValueError(f"LoRA adapter {str(path)!r}: cannot read {ADAPTER_WEIGHTS}: {err}") from None
    tensors = {k.removeprefix(PEFT_PREFIX): v for k, v in raw.items()}
    bad = sorted(k for k in tensors if not _LORA_KEY_RE.match(k))
    if bad:
        raise ValueError(
            f"LoRA adapter {str(path)!r}: tensors that are not LoRA A/B weights: {bad[:5]}"
            f"{' ...' if len(bad) > 5 else ''}"
        )
    return config, tensors


def _unique_name(model: nn.Module, path: Path) -> str:
    base = re.sub(r"[^A-Za-z0-9_-]", "_", path.resolve().name) or "adapter"
    name, k = base, 1
    while name in adapter_names(model):
        name, k = f"{base}_{k}", k + 1
    return name


def _expected_tensors(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """The adapter ``name``'s A/B weights in ``model``, under the on-disk names (adapter name removed)."""
    out = {}
    for lname, layer in _lora_layers(model):
        if name in layer.lora_A:
            out[f"{lname}.lora_A.weight"] = layer.lora_A[name].weight
            out[f"{lname}.lora_B.weight"] = layer.lora_B[name].weight
    return out


def _check_tensors(expected: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor], what: str) -> None:
    missing = sorted(expected.keys() - got.keys())
    unexpected = sorted(got.keys() - expected.keys())
    shapes = [
        f"{k}: file {tuple(got[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(expected.keys() & got.keys())
        if tuple(got[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or shapes:

        def cap(items: list[str]) -> str:
            return f"{items[:4]}{' ...' if len(items) > 4 else ''} ({len(items)})" if items else "none"

        raise ValueError(
            f"{what} does not fit this model: missing {cap(missing)}; not in the model {cap(unexpected)}; "
            f"shape mismatches {cap(shapes)}"
        )


def load_adapter_weights(
    model: nn.Module, path: str | os.PathLike, adapter_name: str = DEFAULT_ADAPTER
) -> None:
    """Copy a saved adapter's tensors into the existing adapter ``adapter_name`` (same targets and rank),
    e.g. to continue training it. Raises ValueError naming missing, unexpected or mis-shaped tensors."""
    _, tensors = read_adapter(path)
    expected = _expected_tensors(model, adapter_name)
    _check_tensors(expected, tensors, f"LoRA adapter {str(path)!r}")
    import torch

    with torch.no_grad():
        for key, value in tensors.items():
            expected[key].copy_(value)


def load_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    adapter_name: str | None = None,
    *,
    weight: float = 1.0,
) -> str:
    """Load an adapter saved in peft's layout and add it to the active adapters at ``weight``.

    Args:
        model: the model it was trained on (same architecture: targets and shapes are checked).
        path: a directory with ``adapter_config.json`` and ``adapter_model.safetensors``.
        adapter_name: its name in the model (default: the directory's name, made unique).
        weight: its scale among the active adapters (1 = as trained).

    Returns:
        The adapter's name.

    Raises:
        ValueError: see :func:`read_adapter`; targets that match no layer of this model; tensors missing,
            unexpected or of another shape. The model is left as it was.
    """
    config, tensors = read_adapter(path)
    name = adapter_name or _unique_name(model, Path(path))
    _check_new_name(model, name)
    try:
        target_modules(model, config.target_modules)
    except ValueError as err:
        raise ValueError(f"LoRA adapter {str(path)!r}: {err}") from None
    modules = {k.rsplit(".", 2)[0] for k in tensors}
    known = dict(model.named_modules())
    absent = sorted(m for m in modules if m not in known)
    if absent:
        raise ValueError(
            f"LoRA adapter {str(path)!r} adapts layers this model does not have: {absent[:4]}"
            f"{' ...' if len(absent) > 4 else ''} ({len(absent)}); was it trained on another architecture?"
        )
    config.inference_mode = True
    _inject(model, config, name, trainable=False)
    expected = _expected_tensors(model, name)
    try:
        _check_tensors(expected, tensors, f"LoRA adapter {str(path)!r}")
    except ValueError:
        remove_adapter(model, name)
        raise
    import torch

    with torch.no_grad():
        for key, value in tensors.items():
            expected[key].copy_(value)
    set_adapters(model, [*get_active_adapters(model), name], [*_active_weights(model), weight])
    logger.info("loaded LoRA adapter %r from %s (%d layers, x%g)", name, path, len(expected) // 2, weight)
    return name


# -- which adapters run, and how much ------------------------------------------------------------------------
def get_active_adapters(model: nn.Module) -> list[str]:
    """The active adapters' names, in order."""
    return list(getattr(model, _ACTIVE, {}))


def _active_weights(model: nn.Module) -> list[float]:
    return list(getattr(model, _ACTIVE, {}).values())


def set_adapters(
    model: nn.Module, names: str | Sequence[str], weights: float | Sequence[float] | None = None
) -> None:
    """Make exactly ``names`` active, each scaled by its weight (default 1); an empty list turns all off.

    Raises:
        ValueError: an unknown name, a weight count that differs from the name count, or fused adapters
            (unfuse first).
    """
    names = [names] if isinstance(names, str) else list(names)
    if weights is None:
        weights = [1.0] * len(names)
    elif isinstance(weights, (int, float)):
        weights = [float(weights)] * len(names)
    weights = [float(w) for w in weights]
    unknown = [n for n in names if n not in adapter_names(model)]
    if unknown:
        raise ValueError(f"unknown adapter(s) {unknown}; adapters: {adapter_names(model)}")
    if len(weights) != len(names) or len(set(names)) != len(names):
        raise ValueError(f"set_adapters wants distinct names and one weight each, got {names} and {weights}")
    if any(not math.isfinite(w) for w in weights):
        raise ValueError(f"adapter weights must be finite, got {weights}")
    if getattr(model, _FUSED, None) is not None:
        raise ValueError("the model's adapters are fused: unfuse them before changing the active adapters")
    for _, layer in _lora_layers(model):
        trainable = {n for n in layer.lora_A if any(p.requires_grad for p in layer.lora_A[n].parameters())}
        layer.set_adapter(names, inference_mode=True)  # peft's requires_grad rule is not ours: restore it
        for n in trainable:
            layer.lora_A[n].requires_grad_(True)
            layer.lora_B[n].requires_grad_(True)
        for n, w in zip(names, weights):
            layer.set_scale(n, w)
    object.__setattr__(model, _ACTIVE, dict(zip(names, weights)))


def remove_adapter(model: nn.Module, name: str) -> None:
    """Delete one adapter (layers left without any adapter go back to their base layer)."""
    if name not in adapter_names(model):
        raise ValueError(f"no adapter named {name!r}; adapters: {adapter_names(model)}")
    if getattr(model, _FUSED, None) is not None:
        raise ValueError("the model's adapters are fused: unfuse them before removing one")
    active = {n: w for n, w in getattr(model, _ACTIVE, {}).items() if n != name}
    for lname, layer in _lora_layers(model):
        if name in layer.lora_A:
            with warnings.catch_warnings():  # peft warns that the active set changed: it is reset below
                warnings.simplefilter("ignore")
                layer.delete_adapter(name)
        if not layer.lora_A:
            _replace(model, lname, layer.get_base_layer())
    del model.peft_config[name]
    if not model.peft_config:
        unload(model)
        return
    object.__setattr__(model, _ACTIVE, {})
    set_adapters(model, list(active), list(active.values()))


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def unload(model: nn.Module) -> None:
    """Remove every adapter layer, putting the base layers back. Fused deltas stay in the weights (as in
    diffusers: ``fuse`` then ``unload`` leaves a plain model with the adapters baked in)."""
    for name, layer in _lora_layers(model):
        _replace(model, name, layer.get_base_layer())
    for attr in ("peft_config", _ACTIVE, _FUSED):
        model.__dict__.pop(attr, None)


# -- fusing -------------------------------------------------------------------------------------------------
def fuse(model: nn.Module, lora_scale: float = 1.0) -> None:
    """Add the active adapters' deltas (times ``lora_scale``) into the base weights.

    Raises:
        ValueError: no active adapter, or already fused.
    """
    if not get_active_adapters(model):
        raise ValueError("no active LoRA adapter to fuse (load one, or set_adapters)")
    if getattr(model, _FUSED, None) is not None:
        raise ValueError("the adapters are already fused (unfuse first)")
    if not math.isfinite(lora_scale):
        raise ValueError(f"lora_scale must be finite, got {lora_scale}")
    import torch

    with torch.no_grad():
        for _, layer in _lora_layers(model):
            if lora_scale != 1.0:
                layer.scale_layer(lora_scale)
            layer.merge(adapter_names=[n for n in get_active_adapters(model) if n in layer.lora_A])
    object.__setattr__(model, _FUSED, float(lora_scale))


def unfuse(model: nn.Module) -> None:
    """Subtract the fused deltas again (the base weights come back up to float rounding)."""
    scale = getattr(model, _FUSED, None)
    if scale is None:
        raise ValueError("no fused LoRA adapters to unfuse")
    import torch

    with torch.no_grad():
        for _, layer in _lora_layers(model):
            layer.unmerge()
    object.__delattr__(model, _FUSED)
    set_adapters(model, get_active_adapters(model), _active_weights(model))  # back to the unscaled weights


def is_fused(model: nn.Module) -> bool:
    return getattr(model, _FUSED, None) is not None


# -- the command line's PATH[:SCALE] -------------------------------------------------------------------------
def parse_lora_arg(text: str) -> tuple[str, float]:
    """``"DIR"`` -> ``("DIR", 1.0)``, ``"DIR:0.7"`` -> ``("DIR", 0.7)``. A suffix that is not a number is
    part of the path (so ``C:\\adapters\\x`` stays whole)."""
    path, sep, tail = text.rpartition(":")
    if sep and path:
        try:
            scale = float(tail)
        except ValueError:
            return text, 1.0
        if not math.isfinite(scale):
            raise ValueError(f"--lora {text!r}: the scale must be a finite number")
        return path, scale
    return text, 1.0
