"""Weight-only quantisation of a Cheers model with torchao: int8 everywhere, float8 and int4 on CUDA GPUs.

Only the weights are stored in fewer bits; activations, and so every matmul's other operand, keep the model's
dtype (each layer dequantises its weight as it runs), so the numbers stay close to the float model's (measured
in docs/performance.md, "Fitting the model: int8 and offload").

Which layers (``parts``), and why:

* ``llm``: every ``nn.Linear`` of the Qwen2 stack (attention and MLP projections), 51 % of the release's
  2.57 B parameters, and ``lm_head`` when it has its own weight. The release ties ``lm_head`` to the token
  embeddings; a tied head stays float with them (quantising it would store the matrix twice, float for the
  lookup and int8 for the head, more memory than before).
* ``flow_head``: the two DiT heads (``gen_projector``, ``hi_projector``): attention, SwiGLU, AdaLN
  modulations and output layers, 17 % of the release's parameters, run at every sampling step.
* opt-in: ``vision_encoder`` (the SigLIP transformer layers, 16 %) and ``und_projector`` (1 %). They are
  off by default: the ViT reads D(z_t) at every sampling step and the LLM reads its features, so its error
  reaches both outputs.

Always float: embeddings, norms, the VAE and SigLIP convolutions, the time embedder, the HFI gate (small, and
the numerically sensitive parts), and any linear layer with fewer than ``min_features`` inputs or outputs
(the per-row scale would cost more than it saves).

torchao is imported only here, and only when a model is quantised (``pip install 'cheers[quant]'``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from cheers.choices import QUANTIZATIONS

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_PARTS",
    "QUANTIZABLE_PARTS",
    "QUANTIZATIONS",
    "check_quantization",
    "is_quantized",
    "quantize_model",
    "quantized_layers",
    "weight_nbytes",
]

# part -> module name prefixes inside a Cheers model (its state-dict names)
QUANTIZABLE_PARTS: dict[str, tuple[str, ...]] = {
    "llm": ("model.language_model", "lm_head"),
    "flow_head": ("model.gen_projector", "model.hi_projector"),
    "vision_encoder": ("model.vision_representation.encoder",),
    "und_projector": ("model.und_projector",),
}
DEFAULT_PARTS = ("llm", "flow_head")
MIN_FEATURES = 16
INSTALL_HINT = "pip install 'cheers[quant]'"


@dataclass(frozen=True)
class _Scheme:
    """One weight format: what it needs and the torchao config that makes it."""

    name: str
    needs: str  # the hardware requirement, as said in errors
    min_capability: tuple[int, int] | None  # CUDA compute capability; None: any device
    bf16_only: bool = False


_SCHEMES = {
    "int8": _Scheme("int8", "any device", None),
    "float8": _Scheme(
        "float8", "a CUDA GPU with compute capability >= 8.9 (Ada or Hopper: L4, L40, H100, ...)", (8, 9)
    ),
    "int4": _Scheme(
        "int4",
        "a CUDA GPU with compute capability >= 8.0 (Ampere or newer: A100, H100, ...) and a bfloat16 model "
        "(torchao's tinygemm kernel)",
        (8, 0),
        bf16_only=True,
    ),
}


def check_quantization(quantization: str | None) -> str | None:
    """Validate a ``quantization`` option: None (float) or one of :data:`QUANTIZATIONS`."""
    if quantization is None or quantization in _SCHEMES:
        return quantization
    raise ValueError(
        f"quantization must be one of {QUANTIZATIONS} or None (no quantisation), got {quantization!r}"
    )


def _torchao_quantization():
    """torchao's ``quantization`` package, or an ImportError that says how to install it."""
    try:
        from torchao import quantization
    except ImportError as err:
        raise ImportError(
            f"quantization needs torchao, which is not installed: {INSTALL_HINT} (or pip install torchao)"
        ) from err
    return quantization


def _config(scheme: _Scheme):
    q = _torchao_quantization()
    # set_inductor_config=False: these configs would otherwise change global torch.compile settings
    if scheme.name == "int8":
        return q.Int8WeightOnlyConfig(set_inductor_config=False)  # per output row (PerRow)
    if scheme.name == "float8":
        return q.Float8WeightOnlyConfig(set_inductor_config=False)  # e4m3, per output row
    from torchao.quantization.quantize_.workflows import Int4PackingFormat

    return q.Int4WeightOnlyConfig(
        group_size=128, int4_packing_format=Int4PackingFormat.TILE_PACKED_TO_4D, set_inductor_config=False
    )


def _check_hardware(scheme: _Scheme, model: nn.Module) -> None:
    """Raise if ``model``'s device or dtype cannot run ``scheme``."""
    if scheme.min_capability is None:
        return
    weight = next(model.parameters())
    device = weight.device
    if device.type != "cuda":
        raise ValueError(
            f"quantization={scheme.name!r} needs {scheme.needs}; the model is on {device.type!r}. "
            "Load it on a GPU (device='cuda'), or use quantization='int8', which runs on any device."
        )
    capability = torch.cuda.get_device_capability(device)
    if capability < scheme.min_capability:
        raise ValueError(
            f"quantization={scheme.name!r} needs {scheme.needs}; "
            f"{torch.cuda.get_device_name(device)} has compute capability {capability[0]}.{capability[1]}. "
            "Use quantization='int8' instead."
        )
    if scheme.bf16_only and weight.dtype != torch.bfloat16:
        raise ValueError(
            f"quantization={scheme.name!r} needs {scheme.needs}; the model is {weight.dtype} "
            "(load it with dtype='bfloat16')"
        )


def _selected(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def quantize_model(
    model: nn.Module,
    quantization: str,
    *,
    parts: Iterable[str] = DEFAULT_PARTS,
    min_features: int = MIN_FEATURES,
) -> nn.Module:
    """Quantise the weights of ``model``'s linear layers in place (module docstring: which, and why).

    Args:
        model: a :class:`cheers.models.cheers.Cheers` model, on the device it will run on (float8 and int4
            are checked against that device).
        quantization: "int8" (any device), "float8" (CUDA, compute capability >= 8.9) or "int4" (CUDA >= 8.0,
            bfloat16 model).
        parts: which parts of :data:`QUANTIZABLE_PARTS` (default: the LLM and the flow heads).
        min_features: linear layers with fewer inputs or outputs than this stay float.

    Returns:
        ``model``, its selected ``nn.Linear`` weights now torchao tensor subclasses (inference only).

    Raises:
        ValueError: an unknown quantization or part, an already quantised model, or hardware that cannot run
            the format (the message names the requirement).
        ImportError: torchao is missing (the message names the pip command).
    """
    if check_quantization(quantization) is None:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got None")
    parts = tuple(parts)
    unknown = sorted(set(parts) - set(QUANTIZABLE_PARTS))
    if unknown or not parts:
        raise ValueError(
            f"parts must be a non-empty subset of {sorted(QUANTIZABLE_PARTS)}, got {list(parts)}"
        )
    if not isinstance(min_features, int) or min_features < 1:
        raise ValueError(f"min_features must be a positive integer, got {min_features!r}")
    if is_quantized(model):
        raise ValueError(f"the model is already quantised ({len(quantized_layers(model))} layers)")
    scheme = _SCHEMES[quantization]
    _check_hardware(scheme, model)
    prefixes = [p for part in parts for p in QUANTIZABLE_PARTS[part]]
    shared = _shared_weights(model)

    def wanted(module: nn.Module, name: str) -> bool:
        if type(module) is not nn.Linear or not _selected(name, prefixes):
            return False  # subclasses (e.g. a LoRA layer or MultiheadAttention's) keep their own forward
        if min(module.in_features, module.out_features) < min_features:
            return False
        return id(module.weight) not in shared  # a tied lm_head stays float with the embeddings

    chosen = [name for name, module in model.named_modules() if wanted(module, name)]
    if not chosen:
        raise ValueError(
            f"no linear layer of parts {list(parts)} has >= {min_features} inputs and outputs to quantise"
        )
    _torchao_quantization().quantize_(model, _config(scheme), filter_fn=wanted)
    done = quantized_layers(model)
    logger.info(
        "%s weight-only quantisation: %d of %d selected linear layers (%s); weights now %.1f MiB",
        quantization,
        len(done),
        len(chosen),
        ", ".join(parts),
        weight_nbytes(model) / 2**20,
    )
    return model


def _shared_weights(model: nn.Module) -> set[int]:
    """ids of parameters that more than one module holds (tied weights)."""
    seen: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            seen[id(p)] = seen.get(id(p), 0) + 1
    return {k for k, count in seen.items() if count > 1}


def _is_quantized_tensor(t: torch.Tensor) -> bool:
    return type(t) not in (torch.Tensor, nn.Parameter) and hasattr(t, "__tensor_flatten__")


def quantized_layers(model: nn.Module) -> dict[str, str]:
    """Module name -> weight class name of every layer whose weight is a quantised tensor subclass."""
    return {
        name: type(m.weight).__name__
        for name, m in model.named_modules()
        if isinstance(getattr(m, "weight", None), torch.Tensor) and _is_quantized_tensor(m.weight)
    }


def is_quantized(model: nn.Module) -> bool:
    return bool(quantized_layers(model))


def _storage_nbytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds: a quantised subclass counts its inner tensors (int8 data, scales, ...)."""
    if _is_quantized_tensor(t):
        names, _ = t.__tensor_flatten__()
        return sum(_storage_nbytes(inner) for n in names if (inner := getattr(t, n, None)) is not None)
    return t.numel() * t.element_size()


def weight_nbytes(model: nn.Module, where: Callable[[str], bool] | None = None) -> int:
    """Bytes of ``model``'s parameters and buffers as stored (tied tensors once; quantised ones by their
    int8 / float8 / int4 data and scales), optionally only those whose name satisfies ``where``."""
    total, seen = 0, set()
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if id(t) in seen or (where is not None and not where(name)):
            continue
        seen.add(id(t))
        total += _storage_nbytes(t)
    return total
