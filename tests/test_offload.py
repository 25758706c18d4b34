"""CPU offload on a tiny pipeline, on the CPU: the execution device is injected (``device="cpu"``), so nothing
really moves; each move is recorded instead (``on_move``), and a torch function mode checks that every weight
an operation reads belongs to a part the offload has on the execution device at that moment. Outputs must
equal the plain pipeline's, and the order of moves the model's execution order."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from cheers.offload import COMPONENTS, ModelOffload, SequentialOffload

from model_helpers import tiny_pipeline

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

# the components a text-to-image call runs, in order (reference §10): the prompt's (dummy) image is encoded
# and tokenized, then the prompt prefilled; each step tokenizes the latent, runs the LLM and the flow head
# (the ViT again for the HFI); the final latent is decoded
PREFILL = ["vae_model", "vae_decoder_projector", "vision_representation", "und_projector", "time_embed"]
PREFILL += ["language_model"]
STEP = ["vae_decoder_projector", "vision_representation", "und_projector", "language_model", "time_embed"]
STEP += ["gen_projector", "vision_representation", "hi_gate", "hi_projector"]


class WeightUseChecker(TorchFunctionMode):
    """Records every operation that reads a weight none of whose owners is on the execution device."""

    def __init__(self, owners: dict[int, set[str]], on: set[str]) -> None:
        super().__init__()
        self.owners, self.on = owners, on
        self.paused, self.misses, self.reads = False, [], 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.paused and getattr(func, "__name__", "") != "__get__":  # .dtype / .shape are free
            for t in tree_flatten((args, kwargs))[0]:
                if isinstance(t, torch.Tensor) and id(t) in self.owners:
                    self.reads += 1
                    if not self.owners[id(t)] & self.on:
                        self.misses.append((getattr(func, "__name__", str(func)), sorted(self.owners[id(t)])))
        return func(*args, **kwargs)


def watch(pipe):
    """Record the offload's moves, keep the set of parts on the execution device, and check weight reads."""
    offload = pipe.offload
    if isinstance(offload, ModelOffload):
        parts = {name: modules for name, modules in offload.components.items()}
    else:
        parts = {name: [module] for module, name in offload.units.items()}
    owners: dict[int, set[str]] = {}
    for name, modules in parts.items():
        for m in modules:
            for t in [*m.parameters(), *m.buffers()]:
                owners.setdefault(id(t), set()).add(name)
    on: set[str] = set()
    events: list[tuple[str, str]] = []
    checker = WeightUseChecker(owners, on)

    def on_move(direction: str, name: str) -> None:
        events.append((direction, name))
        (on.add if direction == "on" else on.discard)(name)
        if isinstance(offload, ModelOffload):
            assert len(on) <= 1, f"more than one component on the execution device: {on}"

    move = offload._move

    def paused_move(*args, **kwargs):  # the moves themselves read every weight: not a use
        checker.paused = True
        try:
            move(*args, **kwargs)
        finally:
            checker.paused = False

    offload.on_move, offload._move = on_move, paused_move
    return events, on, checker


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def image() -> Image.Image:
    return Image.fromarray((np.random.default_rng(0).random((96, 80, 3)) * 255).astype(np.uint8))


T2I = dict(num_inference_steps=2, guidance_scale=2.0, output_type="pt")
MESSAGES = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]


def run_all(pipe) -> dict[str, object]:
    return {
        "generate": pipe.generate("two red circles", generator=gen(0), **T2I).images[0],
        "edit": pipe.edit(
            image(), "make it blue", num_inference_steps=3, generator=gen(1), output_type="pt"
        ).images[0],
        "chat": pipe.chat(MESSAGES, images=[image()], max_new_tokens=4).token_ids,
    }


@pytest.fixture(scope="module")
def reference():
    return run_all(tiny_pipeline(seed=5))


def same(a, b) -> bool:
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


@pytest.mark.slow
def test_model_offload_moves_components_in_execution_order(reference):
    pipe = tiny_pipeline(seed=5).enable_model_cpu_offload(device="cpu")
    events, on, checker = watch(pipe)
    with checker:
        out = pipe.generate("two red circles", generator=gen(0), **T2I).images[0]
    assert torch.equal(out, reference["generate"])
    loaded = [name for direction, name in events if direction == "on"]
    assert loaded == PREFILL + STEP * 2 + ["vae_model"]
    # each move on follows the move off of the component before it; the last goes back when the call ends
    assert events[0] == ("on", "vae_model") and events[-1] == ("off", "vae_model") and not on
    for (d1, previous), (d2, _) in zip(events[1::2], events[2::2]):
        assert (d1, d2) == ("off", "on") and previous in loaded
    assert checker.reads > 100 and not checker.misses, checker.misses[:5]

    events.clear()
    with checker:
        answer = pipe.chat(MESSAGES, images=[image()], max_new_tokens=4).token_ids
    assert answer == reference["chat"]
    # understanding: the image is tokenized at t = 1, then every token is the LLM's alone
    assert [name for direction, name in events if direction == "on"] == PREFILL
    assert not checker.misses, checker.misses[:5]

    events.clear()
    with checker:
        edited = pipe.edit(image(), "make it blue", num_inference_steps=3, generator=gen(1), output_type="pt")
    assert torch.equal(edited.images[0], reference["edit"]) and not checker.misses
    assert [name for direction, name in events if direction == "on"][:2] == [
        "vae_model",
        "vae_decoder_projector",
    ]


@pytest.mark.slow
def test_sequential_offload_moves_each_weight_only_for_its_own_call(reference):
    pipe = tiny_pipeline(seed=5).enable_sequential_cpu_offload(device="cpu")
    events, on, checker = watch(pipe)
    with checker:
        out = run_all(pipe)
    assert all(same(out[k], reference[k]) for k in reference)
    assert checker.reads > 100 and not checker.misses, checker.misses[:5]
    assert not on  # everything went back
    moved = {name for _, name in events}
    names = set(pipe.offload.units.values())
    # the LLM's layers, the heads' blocks and the VAE decoder (one unit: the fast VAE reads its weights)
    assert "model.language_model.layers.0.self_attn.q_proj" in moved and "model.vae_model.decoder" in moved
    assert "model.vae_model.decoder.conv_in" in names and "model.vae_model.decoder.conv_in" not in moved
    assert "model.vision_representation.head" not in moved  # never runs, never moves
    # every move on is undone before the next move on of the same unit
    state: dict[str, str] = {}
    for direction, name in events:
        assert state.get(name, "off") != direction, (direction, name)
        state[name] = direction


def test_device_reports_the_execution_device_and_disable_removes_every_hook():
    pipe = tiny_pipeline(seed=5)
    model = pipe.model
    hooks_before = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())
    pipe.enable_model_cpu_offload(device="cuda")  # injected: nothing moves until a component runs
    assert pipe.device == torch.device("cuda") and next(model.parameters()).device.type == "cpu"
    assert "encode" in vars(model.model.vae_model)
    pipe.enable_sequential_cpu_offload(device="cpu")  # replaces the model offload
    assert isinstance(pipe.offload, SequentialOffload) and pipe.device == torch.device("cpu")
    pipe.disable_cpu_offload()
    assert pipe.offload is None and pipe.device.type == "cpu"
    assert sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()) == hooks_before
    assert not any(k in vars(m) for m in model.modules() for k in ("encode", "decode", "normalize"))


def test_components_cover_the_model_and_no_accelerator_is_refused():
    pipe = tiny_pipeline(seed=5)
    covered = {p for _, paths in COMPONENTS for p in paths}
    top = {f"model.{n}" for n, _ in pipe.model.model.named_children()} | {"lm_head"}
    assert top <= covered
    if not (torch.cuda.is_available() or torch.backends.mps.is_available()):
        with pytest.raises(ValueError, match="none was found"):
            pipe.enable_model_cpu_offload()
    assert pipe.offload is None


@pytest.mark.slow
def test_offload_of_an_int8_model_gives_its_outputs():
    pytest.importorskip("torchao")
    from cheers.quantization import quantize_model

    plain = tiny_pipeline(seed=5)
    quantize_model(plain.model, "int8")
    expected = plain.generate("two red circles", generator=gen(0), **T2I).images[0]
    pipe = tiny_pipeline(seed=5)
    quantize_model(pipe.model, "int8")
    pipe.enable_model_cpu_offload(device="cpu")
    _, _, checker = watch(pipe)
    with checker:
        out = pipe.generate("two red circles", generator=gen(0), **T2I).images[0]
    assert torch.equal(out, expected) and not checker.misses
