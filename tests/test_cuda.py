"""CUDA-only checks (skipped without a CUDA device; ``bash bench/gpu_suite.sh`` runs them on a GPU machine).

* bf16 against float32 on a tiny random model: the prompt's next-token logits and one velocity, relative L2
  error ``|a - b| / |b|`` within ``BF16_LOGITS_TOL`` / ``BF16_VELOCITY_TOL``. On a CPU the same comparison
  gives 0.7-1.4 % (logits) and 2.0-2.9 % (velocities) over seeds 0-2; the tolerances leave 2-3x for the GPU's
  kernels (flash attention, cuDNN convolutions).
* int8 weights (torchao, weight-only) on CUDA: within ``INT8_LOGITS_TOL`` / ``INT8_VELOCITY_TOL`` of the
  float32 model (CPU: 0.3 % / 0.8 %), the quantised weights on the GPU; and the pipeline's
  ``from_pretrained(..., quantization="int8")`` on CUDA.
* CPU offload on CUDA: the weights rest on the CPU, each component (model offload) or layer (sequential
  offload) is on the GPU while it runs and back on the CPU after the call, and the images and answers equal
  those of the model held on the GPU.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from cheers.generation import ImageSampler, prefill

from model_helpers import t2i_prompt, tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

BF16_LOGITS_TOL, BF16_VELOCITY_TOL = 4e-2, 7e-2
INT8_LOGITS_TOL, INT8_VELOCITY_TOL = 2e-2, 4e-2


@pytest.fixture(autouse=True, scope="module")
def exact_float32():
    """float32 references without TF32 (cuDNN convolutions use it by default); module-scoped, so that it is
    set before the module-scoped references are made."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@torch.no_grad()
def logits_and_velocity(model) -> tuple[torch.Tensor, torch.Tensor]:
    """(next-token logits (1, V) after a text-to-image prompt, velocity (1, C, 8, 8) at t = 0.3)."""
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    gen = torch.Generator().manual_seed(0)
    ids = t2i_prompt([40, 41, 42]).to(device)
    size = model.config.image_size
    pixels = torch.rand(1, 3, size, size, generator=gen).to(device, dtype)
    x = torch.randn(1, model.config.latent_channels, 8, 8, generator=gen).to(device, dtype)
    state = prefill(model, ids, torch.ones_like(ids), pixels)
    sampler = ImageSampler(model, state, None, torch.ones(1, dtype=torch.bool, device=device))
    v, _, _ = sampler.velocity(x, torch.tensor(0.3, device=device))
    return state.last_logits.float(), v.float()


@pytest.mark.parametrize("seed", [0, 1])
def test_bf16_logits_and_velocities_match_float32(seed):
    model = tiny_model(seed=seed).cuda()
    logits, velocity = logits_and_velocity(model)
    logits16, velocity16 = logits_and_velocity(copy.deepcopy(model).to(torch.bfloat16))
    assert torch.isfinite(logits16).all() and torch.isfinite(velocity16).all()
    assert relative_error(logits16, logits) < BF16_LOGITS_TOL
    assert relative_error(velocity16, velocity) < BF16_VELOCITY_TOL


def test_int8_weights_on_cuda_stay_close_to_float32():
    from cheers.quantization import is_quantized, quantized_layers, weight_nbytes

    pytest.importorskip("torchao")
    from cheers.quantization import quantize_model

    model = tiny_model(seed=0).cuda()
    logits, velocity = logits_and_velocity(model)
    quantized = quantize_model(copy.deepcopy(model), "int8")
    assert is_quantized(quantized) and quantized_layers(quantized)
    assert weight_nbytes(quantized) < weight_nbytes(model)
    assert all(p.device.type == "cuda" for p in quantized.parameters())
    logits8, velocity8 = logits_and_velocity(quantized)
    assert relative_error(logits8, logits) < INT8_LOGITS_TOL
    assert relative_error(velocity8, velocity) < INT8_VELOCITY_TOL


def chat_inputs():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8))
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What shapes are there?"}]}
    ]
    return messages, [image]


def outputs(pipe) -> tuple[torch.Tensor, list[str]]:
    """A 3-step image and a short answer, both seeded."""
    image = pipe.generate(
        "a red circle",
        num_inference_steps=3,
        guidance_scale=3.0,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images[0]
    messages, images = chat_inputs()
    return image, pipe.chat(messages, images=images, max_new_tokens=8).texts


def test_int8_pipeline_on_cuda():
    pytest.importorskip("torchao")
    from cheers.pipeline import CheersPipeline
    from cheers.quantization import is_quantized

    pipe = CheersPipeline.from_pretrained("default", device="cuda", quantization="int8", progress=False)
    assert is_quantized(pipe.model) and pipe.device.type == "cuda"
    image, texts = outputs(pipe)
    assert image.shape[0] == 3 and torch.isfinite(image).all() and isinstance(texts[0], str)


@pytest.fixture(scope="module")
def on_gpu():
    """The bundled model held on the GPU in float32, and its outputs (the references of the offload tests)."""
    from cheers.pipeline import CheersPipeline

    pipe = CheersPipeline.from_pretrained("default", device="cuda", dtype="float32", progress=False)
    return outputs(pipe)


@pytest.mark.parametrize("kind", ["model", "sequential"])
def test_cpu_offload_moves_weights_to_cuda_while_they_run(kind, on_gpu):
    from cheers.pipeline import CheersPipeline

    pipe = CheersPipeline.from_pretrained("default", device="cpu", dtype="float32", progress=False)
    if kind == "model":
        pipe.enable_model_cpu_offload(device="cuda")
    else:
        pipe.enable_sequential_cpu_offload(device="cuda")
    core = pipe.model.model
    assert all(p.device.type == "cpu" for p in pipe.model.parameters())
    seen: dict[str, set[str]] = {"llm": set(), "pixel decoder": set()}

    def llm_runs(module, args, kwargs):
        # hooks registered after the offload's run after its own: the weights have been moved by now
        seen["llm"].add(core.language_model.norm.weight.device.type)
        seen["pixel decoder"].add(next(core.vae_decoder_projector.parameters()).device.type)

    handle = core.language_model.norm.register_forward_pre_hook(llm_runs, with_kwargs=True)
    try:
        image, texts = outputs(pipe)
    finally:
        handle.remove()
    assert seen["llm"] == {"cuda"}
    assert seen["pixel decoder"] == {"cpu"}  # while the LLM runs
    assert all(p.device.type == "cpu" for p in pipe.model.parameters())  # back after the call
    assert image.device.type == "cpu" and torch.allclose(image, on_gpu[0], atol=1e-5, rtol=0)
    assert texts == on_gpu[1]
