"""Weight-only quantisation (torchao) on a tiny model: what is quantised, how close it stays, the options.

Tolerances (relative L2 error against the float model, tiny random model): logits 1e-2 and velocities 3e-2;
int8 measured 0.2 % and 0.8 % on three seeds.
"""

from __future__ import annotations

import io
import sys

import pytest
import torch
from torch import nn

from cheers.generation import ImageSampler, prefill
from cheers.quantization import (
    QUANTIZATIONS,
    check_quantization,
    quantize_model,
    quantized_layers,
    weight_nbytes,
)

from model_helpers import save_pipeline, t2i_prompt, tiny_model, tiny_pipeline

pytest.importorskip("torchao")
pytestmark = pytest.mark.usefixtures("one_cpu_thread")

LOGITS_RTOL, VELOCITY_RTOL = 1e-2, 3e-2


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@torch.no_grad()
def logits_and_velocity(model, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Understanding logits of a prompt with an image, and the flow velocity of a latent after it."""
    gen = torch.Generator().manual_seed(seed)
    ids = t2i_prompt([5, 6, 7])
    pixels = torch.rand(1, 3, 128, 128, generator=gen)
    x = torch.randn(1, model.config.latent_channels, 8, 8, generator=gen)
    logits = model(ids, torch.ones_like(ids), pixels).logits
    state = prefill(model, ids, torch.ones_like(ids), pixels)
    v, _, _ = ImageSampler(model, state, None, torch.ones(1, dtype=torch.bool)).velocity(x, torch.tensor(0.3))
    return logits, v


def test_int8_quantises_the_llm_and_flow_head_linears_only():
    model = quantize_model(tiny_model(), "int8")
    done = quantized_layers(model)
    for name, module in model.named_modules():
        if type(module) is not nn.Linear:
            continue
        in_parts = name.startswith(("model.language_model.", "model.gen_projector.", "model.hi_projector."))
        assert (name in done) == in_parts, name
        if in_parts:
            assert module.weight.qdata.dtype == torch.int8  # the stored weight is int8
            assert module.weight.qdata.shape == module.weight.shape
    # the tied head stays float with the embeddings it shares its weight with; convs and norms stay float
    lm = model.model.language_model
    assert model.lm_head.weight is lm.embed_tokens.weight and type(lm.embed_tokens.weight) is nn.Parameter
    assert all(type(p) is nn.Parameter for p in model.model.vae_model.parameters())
    assert type(lm.norm.weight) is nn.Parameter


@pytest.mark.slow
def test_int8_logits_and_velocities_stay_close_to_float():
    for seed in (0, 1):
        logits, v = logits_and_velocity(tiny_model(seed), seed)
        q_logits, q_v = logits_and_velocity(quantize_model(tiny_model(seed), "int8"), seed)
        assert 0 < rel(q_logits, logits) < LOGITS_RTOL
        assert 0 < rel(q_v, v) < VELOCITY_RTOL


def test_int8_shrinks_the_weights_and_the_state_dict():
    model = tiny_model()
    llm = sum(p.numel() for n, p in model.named_parameters() if n.startswith("model.language_model.layers"))
    before, saved_before = weight_nbytes(model), _saved_size(model)
    quantize_model(model, "int8")
    after, saved_after = weight_nbytes(model), _saved_size(model)
    assert after < before - 2 * llm  # float32 -> int8 saves 3 bytes a weight, minus per-row scales
    assert saved_after < saved_before - 2 * llm
    prefix = "model.language_model.layers"
    assert weight_nbytes(model, lambda n: n.startswith(prefix)) < 0.35 * llm * 4  # ~ a quarter


def _saved_size(model) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return len(buffer.getvalue())


def test_options_are_checked_with_clear_errors(monkeypatch):
    assert check_quantization(None) is None and check_quantization("int8") == "int8"
    with pytest.raises(ValueError, match=r"quantization must be one of \('int8', 'float8', 'int4'\)"):
        check_quantization("int3")
    model = tiny_model()
    with pytest.raises(ValueError, match="must be one of"):
        quantize_model(model, None)
    with pytest.raises(ValueError, match="parts must be a non-empty subset"):
        quantize_model(model, "int8", parts=["vae"])
    with pytest.raises(ValueError, match="no linear layer"):
        quantize_model(model, "int8", min_features=10_000)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="float8.*compute capability >= 8.9.*on 'cpu'"):
            quantize_model(model, "float8")
        with pytest.raises(ValueError, match="int4.*compute capability >= 8.0"):
            quantize_model(model, "int4")
    assert not quantized_layers(model)  # the refusals changed nothing
    quantize_model(model, "int8", parts=["flow_head"])
    assert all(n.startswith(("model.gen_projector", "model.hi_projector")) for n in quantized_layers(model))
    with pytest.raises(ValueError, match="already quantised"):
        quantize_model(model, "int8")
    monkeypatch.setitem(sys.modules, "torchao", None)  # as if not installed
    with pytest.raises(ImportError, match=r"pip install 'cheers\[quant\]'"):
        quantize_model(tiny_model(), "int8")
    assert set(QUANTIZATIONS) == {"int8", "float8", "int4"}


@pytest.mark.slow
def test_from_pretrained_quantizes_and_the_cli_takes_the_option(tmp_path, capsys):
    from cheers.cli import main
    from cheers.pipeline import CheersPipeline

    directory = save_pipeline(tiny_pipeline(seed=5), tmp_path / "tiny")
    with pytest.raises(ValueError, match="quantization must be one of"):
        CheersPipeline.from_pretrained(directory, device="cpu", quantization="int3")
    plain = CheersPipeline.from_pretrained(directory, device="cpu", progress=False)
    pipe = CheersPipeline.from_pretrained(directory, device="cpu", progress=False, quantization="int8")
    assert quantized_layers(pipe.model) and not quantized_layers(plain.model)
    kw = dict(num_inference_steps=2, guidance_scale=2.0, output_type="latent")
    a = plain.generate("two red circles", generator=torch.Generator().manual_seed(0), **kw).images[0]
    b = pipe.generate("two red circles", generator=torch.Generator().manual_seed(0), **kw).images[0]
    assert 0 < rel(b, a) < 0.1  # two sampling steps of the quantised model stay near the float ones
    assert isinstance(pipe.chat([{"role": "user", "content": "hi"}], max_new_tokens=2).texts[0], str)

    out = tmp_path / "q.png"
    args = ["generate", "x", "--model", str(directory), "--steps", "1", "--quiet", "--out", str(out)]
    assert main([*args, "--quantization", "int8"]) == 0 and out.exists()
    if not torch.cuda.is_available():
        assert main([*args, "--quantization", "float8"]) == 2
        assert "needs a CUDA GPU" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*args, "--quantization", "int3"])  # argparse: invalid choice


def test_serve_takes_the_option():
    pytest.importorskip("fastapi")
    from cheers.cli import build_parser

    for value in QUANTIZATIONS:
        assert build_parser().parse_args(["serve", "--quantization", value]).quantization == value
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--quantization", "int3"])
