"""CPU offload, diffusers-style: the weights live in CPU memory and each part is moved to the accelerator only
while it runs.

Two granularities (:class:`~cheers.pipeline.CheersPipeline` ``enable_model_cpu_offload`` and
``enable_sequential_cpu_offload``):

* **Model offload** (:class:`ModelOffload`): the top-level components of :data:`COMPONENTS`, one on the
  accelerator at a time. Calling a component moves the one that ran before back to the CPU and moves it on;
  it stays there until another component runs (or the pipeline call ends). Peak accelerator memory: the
  largest component (the LLM with its head) plus activations. Every sampling step runs eight components
  (the ViT twice), so each step moves nearly the whole model to the accelerator and back.
* **Sequential offload** (:class:`SequentialOffload`): every module that owns weights is moved on for its own
  forward and back right after it. Peak: the largest such module; every call moves every weight twice.

What runs is what is hooked. Forward pre-hooks sit on every component *and its direct children*, since the
model calls some children itself: ``language_model.embed_tokens`` (prompt assembly, decoding), the ViT's
``embeddings`` / ``encoder`` / ``post_layernorm`` (:func:`cheers.models.vision.vit_features`,
``patch_embeddings`` for the HFI), ``hi_gate.layer_norm``. Methods the model calls instead of ``forward``
are wrapped: ``VAEModel.encode`` / ``decode`` and the latent statistics' ``normalize`` / ``denormalize``
(:data:`ENTRY_METHODS`). Modules that read their children's weights directly (the fast VAE's ``Decoder`` and
``Upsample``, SigLIP's embeddings) move as one unit under sequential offload. Tensor inputs of a hooked call
are moved to the execution device.

A handle reports each move through ``on_move(direction, name)`` when given one (``"on"``: to the execution
device, ``"off"``: back; the tests check the order against the model's execution order). One thread at a
time: the hooks keep no per-thread state.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map
from transformers.models.siglip.modeling_siglip import SiglipVisionEmbeddings

from cheers.models.vae import Decoder, LatentStats, Upsample, VAEModel

logger = logging.getLogger(__name__)

__all__ = ["COMPONENTS", "ENTRY_METHODS", "ModelOffload", "SequentialOffload", "offload_device_of"]

# (name, module paths moved together), in the order a text-to-image call first runs them; lm_head moves with
# the LLM: its weight is tied to the token embeddings
COMPONENTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("vae_model", ("model.vae_model",)),
    ("vae_decoder_projector", ("model.vae_decoder_projector",)),
    ("latent_to_patch", ("model.latent_to_patch",)),  # only without pixel reconstruction (an ablation)
    ("vision_representation", ("model.vision_representation",)),
    ("und_projector", ("model.und_projector",)),
    ("time_embed", ("model.time_embed",)),
    ("language_model", ("model.language_model", "lm_head")),
    ("gen_projector", ("model.gen_projector",)),
    ("hi_gate", ("model.hi_gate",)),
    ("hi_projector", ("model.hi_projector",)),
)
# methods the model calls instead of forward, per module type
ENTRY_METHODS: dict[type, tuple[str, ...]] = {
    VAEModel: ("encode", "decode"),
    LatentStats: ("normalize", "denormalize"),
}
# modules whose forward reads their children's weights directly: moved as one unit by sequential offload
_ATOMIC = (Decoder, Upsample, SiglipVisionEmbeddings)

MoveRecorder = Callable[[str, str], None]  # ("on" | "off", name)


def offload_device_of(device: str | torch.device | None) -> torch.device:
    """The execution device of an offload: ``device``, or the accelerator (CUDA, else MPS) when None."""
    if device is None:
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if torch.backends.mps.is_available():
            return torch.device("mps")
        raise ValueError(
            "CPU offload moves weights to an accelerator while they run, and none was found (CUDA or MPS); "
            "pass device= to name one (device='cpu' runs the hooks without moving anything, for tests)"
        )
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())  # as tensors report it
    return device


def _to(obj: Any, device: torch.device) -> Any:
    """``obj`` with every tensor in it (nested in lists, tuples, dicts) on ``device``."""
    return tree_map(lambda x: x.to(device) if isinstance(x, torch.Tensor) and x.device != device else x, obj)


class _Offload:
    """Hooks and method wrappers on a model, removable; subclasses say what each one moves."""

    def __init__(
        self,
        model: nn.Module,
        device: torch.device,
        offload_device: torch.device | str = "cpu",
        on_move: MoveRecorder | None = None,
    ) -> None:
        self.model, self.device = model, torch.device(device)
        self.offload_device = torch.device(offload_device)
        self.on_move = on_move
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._wrapped: list[tuple[nn.Module, str, Callable]] = []

    def _move(self, name: str, modules: list[nn.Module], on: bool) -> None:
        """Move ``modules`` to the execution device (``on``) or back to the offload device."""
        if self.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"CPU offload cannot move {name!r} inside a CUDA graph capture")
        for m in modules:
            m.to(self.device if on else self.offload_device)
        if self.on_move is not None:
            self.on_move("on" if on else "off", name)

    def _pre_hook(self, enter: Callable[[], None], module: nn.Module, args: tuple, kwargs: dict):
        enter()
        return _to(args, self.device), _to(kwargs, self.device)

    def _hook_forward(
        self, module: nn.Module, enter: Callable[[], None], leave: Callable[[], None] | None = None
    ) -> None:
        self._handles.append(
            module.register_forward_pre_hook(functools.partial(self._pre_hook, enter), with_kwargs=True)
        )
        if leave is not None:  # always_call: a forward that raises still leaves
            self._handles.append(module.register_forward_hook(lambda *_: leave(), always_call=True))

    def _wrap_method(
        self, module: nn.Module, name: str, enter: Callable[[], None], leave: Callable[[], None] | None = None
    ) -> None:
        method = getattr(module, name)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            enter()
            try:
                return method(*_to(args, self.device), **_to(kwargs, self.device))
            finally:
                if leave is not None:
                    leave()

        setattr(module, name, wrapper)
        self._wrapped.append((module, name, wrapper))

    def _wrap_entry_methods(
        self, module: nn.Module, enter: Callable[[], None], leave: Callable[[], None] | None = None
    ) -> None:
        for kind, names in ENTRY_METHODS.items():
            if isinstance(module, kind):
                for name in names:
                    self._wrap_method(module, name, enter, leave)

    def release(self) -> None:
        """Move whatever is on the execution device back (the end of a pipeline call)."""

    def remove(self) -> None:
        """Take every hook and wrapper off; the weights stay on the offload device (the CPU)."""
        self.release()
        for handle in self._handles:
            handle.remove()
        for module, name, wrapper in self._wrapped:
            if vars(module).get(name) is wrapper:
                delattr(module, name)
        self._handles.clear()
        self._wrapped.clear()


class ModelOffload(_Offload):
    """Model offload of a :class:`~cheers.models.cheers.Cheers` model (module docstring).

    Args:
        model: the model; moved to ``offload_device`` here.
        device: the execution device (e.g. ``cuda``).
        on_move: called ``on_move("on" | "off", component name)`` after every move.
    """

    def __init__(
        self,
        model: nn.Module,
        device: torch.device,
        offload_device: torch.device | str = "cpu",
        on_move: MoveRecorder | None = None,
    ) -> None:
        super().__init__(model, device, offload_device, on_move)
        modules = dict(model.named_modules())
        self.components: dict[str, list[nn.Module]] = {
            name: [modules[p] for p in paths if p in modules]
            for name, paths in COMPONENTS
            if any(p in modules for p in paths)
        }
        owned = {id(t) for parts in self.components.values() for m in parts for t in _tensors(m)}
        missing = [n for n, t in _named_tensors(model) if id(t) not in owned]
        if missing:
            raise ValueError(f"model offload: weights outside every component of COMPONENTS: {missing[:5]}")
        model.to(self.offload_device)
        self.active: str | None = None
        for name, parts in self.components.items():
            enter = functools.partial(self._activate, name)
            for part in parts:
                for m in (part, *part.children()):
                    self._hook_forward(m, enter)
                    self._wrap_entry_methods(m, enter)
        logger.info("model CPU offload to %s: %s", self.device, ", ".join(self.components))

    def _activate(self, name: str) -> None:
        if self.active == name:
            return
        if self.active is not None:
            self._move(self.active, self.components[self.active], on=False)
        self._move(name, self.components[name], on=True)
        self.active = name

    def release(self) -> None:
        if self.active is not None:
            self._move(self.active, self.components[self.active], on=False)
            self.active = None


class SequentialOffload(_Offload):
    """Sequential offload (module docstring): each module that owns weights (or reads its children's, see
    ``_ATOMIC``) is on the execution device only during its own call; inside a unit that is already there,
    the units it contains stay put.

    Args:
        model: the model; moved to ``offload_device`` here.
        device: the execution device.
        on_move: called ``on_move("on" | "off", module name)`` after every move.
    """

    def __init__(
        self,
        model: nn.Module,
        device: torch.device,
        offload_device: torch.device | str = "cpu",
        on_move: MoveRecorder | None = None,
    ) -> None:
        super().__init__(model, device, offload_device, on_move)
        model.to(self.offload_device)
        self.units: dict[nn.Module, str] = {}  # unit -> its name in the model
        self._on: set[nn.Module] = set()  # units that their own hook moved on and that are still running
        self._stack: list[nn.Module | None] = []  # per running unit call: the unit if that call moved it

        def visit(module: nn.Module, name: str, above: tuple[nn.Module, ...]) -> None:
            if isinstance(module, _ATOMIC) or any(True for _ in _tensors(module, recurse=False)):
                self.units[module] = name
                enter = functools.partial(self._enter, module, above)
                self._hook_forward(module, enter, self._leave)
                self._wrap_entry_methods(module, enter, self._leave)
                above = (*above, module)
            for child_name, child in module.named_children():
                visit(child, f"{name}.{child_name}" if name else child_name, above)

        visit(model, "", ())
        logger.info("sequential CPU offload to %s: %d units", self.device, len(self.units))

    def _enter(self, module: nn.Module, above: tuple[nn.Module, ...]) -> None:
        if module in self._on or any(a in self._on for a in above):
            self._stack.append(None)  # already there (re-entered, or inside a unit that is)
            return
        self._move(self.units[module], [module], on=True)
        self._on.add(module)
        self._stack.append(module)

    def _leave(self) -> None:
        module = self._stack.pop()  # calls nest: the innermost running unit call is the one leaving
        if module is not None:
            self._on.discard(module)
            self._move(self.units[module], [module], on=False)


def _tensors(module: nn.Module, recurse: bool = True):
    yield from module.parameters(recurse=recurse)
    yield from module.buffers(recurse=recurse)


def _named_tensors(module: nn.Module):
    yield from module.named_parameters()
    yield from module.named_buffers()
