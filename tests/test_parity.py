"""Parity with the official release, driven by a reference directory (default: the copy of config_a).

Every case found in ``cases.json`` runs; what to call is read from the case's ``call`` and ``settings``, never
from its name, and every ``out`` tensor must be reproduced within ``suggested_atol + rtol·|ref|`` (token ids
exactly). Point ``CHEERS_REFERENCE_DIR`` at another directory of the same layout to check another
configuration.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cheers.generation import ImageSampler, generate, prefill
from cheers.parity_fixtures import load_cases, reference_dir
from cheers.sampling import ImageSampling
from cheers.text_sampling import TextSampling
from cheers.tokens import unconditional_ids

REFERENCE = load_cases(reference_dir(Path(__file__).parent / "fixtures/reference/config_a"))
MAX_ERRORS: dict[str, float] = {}  # tensor -> max abs error, printed at the end of the session
META, TENSORS = REFERENCE.meta, REFERENCE.tensors
CASES = sorted(META["cases"])


@pytest.fixture(scope="module")
def model():
    return REFERENCE.load_model()


def kind_of(call: str, tensors: dict) -> str:
    """Which path a case exercises, from its recorded call."""
    if "vae_model.encode" in call:
        return "vae_encode"
    if "vae_model.decode" in call:
        return "vae_decode"
    if "_drift_fn" in call:
        return "velocity"
    if ".generate(" in call:
        return "generate"
    if "labels=labels" in call:
        return "train"
    if call.startswith("model("):
        return "understanding"
    raise AssertionError(f"unrecognised reference call: {call}")


def run_case(model, name: str, case: dict) -> dict[str, torch.Tensor]:
    """Run one case; returns our tensors keyed like the reference (``<case>/<role>/<name>``)."""

    def inp(key):
        return TENSORS[f"{name}/in/{key}"]

    def has(key):
        return f"{name}/in/{key}" in TENSORS

    settings, out = case["settings"], {}
    core = model.model
    kind = kind_of(case["call"], case["tensors"])
    if kind == "vae_encode":
        out["out/latent"] = core.vae_model.encode(inp("pixel_values"))
        moments = core.vae_model.encoder(inp("pixel_values"))
        out["debug/encoder_moments"] = moments
    elif kind == "vae_decode":
        out["out/pixels"] = core.vae_model.decode(inp("latent"))
        out["out/projector_pixels"] = core.vae_decoder_projector(inp("latent"))
    elif kind == "understanding":
        res = model(inp("input_ids"), inp("attention_mask"), inp("pixel_values"))
        out["out/logits"] = res.logits
        out["out/time_embeds_1"], out["out/time_embeds_2"] = res.time_embeds_1, res.time_embeds_2
        out["out/valid_positions"] = res.assembled.valid.to(torch.uint8)
        from cheers.models.sequence import hybrid_mask

        out["debug/lm_attention_mask"] = hybrid_mask(res.assembled.image_flags, res.assembled.valid)[:, 0]
    elif kind == "train":
        res = model(
            inp("input_ids"),
            inp("attention_mask"),
            inp("pixel_values"),
            t=inp("t"),
            labels=inp("labels"),
            x0=inp("x0"),
        )
        out.update(
            {
                "out/loss": res.loss.reshape(1),
                "out/text_loss": res.text_loss.reshape(1),
                "out/image_loss": res.image_loss.reshape(1),
                "out/text_logits": res.logits,
                "out/pred_velocity": res.pred_velocity,
                "out/target_velocity": res.target_velocity,
            }
        )
    elif kind == "velocity":
        ids, pixels = inp("input_ids"), inp("pixel_values")
        uncond = unconditional_ids(ids, model.special)
        if has("uncond_input_ids"):
            assert torch.equal(uncond, inp("uncond_input_ids")), (
                "unconditional prompt differs from the release's"
            )
        for prefix, prompt in (("", ids), ("uncond_", uncond)):
            out[f"out/{prefix}prefill_logits"] = model(prompt, torch.ones_like(prompt), pixels).logits
            state = prefill(model, prompt, torch.ones_like(prompt), pixels)
            assert state.length == settings.get("prefix_len", state.length)
            sampler = ImageSampler(model, state, None, torch.ones(1, dtype=torch.bool))
            for i, t in enumerate(settings["t_values"]):
                v, _, gate = sampler.velocity(inp("x_t"), torch.tensor(t, dtype=torch.float32))
                out[f"out/{prefix}velocity_t{i}"] = v
                if not prefix:
                    out[f"out/heat_map_t{i}"] = gate[0]
    elif kind == "generate":
        steps_seen = []
        res = generate(
            model,
            inp("input_ids"),
            torch.ones_like(inp("input_ids")),
            inp("pixel_values"),
            # the fixture keeps the release's names: cfg_scale, alpha, max_length (= max_new_tokens - 1)
            image_sampling=ImageSampling(
                settings["num_inference_steps"], guidance_scale=settings["cfg_scale"], shift=settings["alpha"]
            ),
            edit_image=settings["edit_image"],
            max_new_tokens=settings["max_length"] + 1,
            text_sampling=TextSampling(temperature=settings["temperature"]),
            latents=inp("init_noise"),
            callback=lambda n, t, x, v: steps_seen.append((t, x[0])),
        )
        out["out/generated_ids"] = torch.tensor([res.sequences[0]])
        for i, (img, lat) in enumerate(zip(res.images[0], res.latents[0])):
            out[f"out/image_{i}"], out[f"out/final_latent_{i}"] = img[None], lat[None]
        out["debug/step_t"] = torch.stack([t for t, _ in steps_seen])
        out["debug/step_x"] = torch.stack([x for _, x in steps_seen])
    return out


@pytest.mark.parametrize("name", CASES)
def test_parity_case(model, name):
    case = META["cases"][name]
    rtol = META.get("suggested_rtol", 1e-4)
    with torch.no_grad():
        ours = run_case(model, name, case)
    expected_outputs = [k for k, t in case["tensors"].items() if t["role"] == "out"]
    assert expected_outputs, f"case {name} has no outputs"
    checked = 0
    for key, info in case["tensors"].items():
        short = key[len(name) + 1 :]
        if info["role"] == "in":
            continue
        if short not in ours:
            assert info["role"] == "debug", f"{key}: an output of the release that we did not produce"
            continue
        ref, got = TENSORS[key], ours[short].detach()
        assert tuple(got.shape) == tuple(ref.shape), f"{key}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
        if not ref.is_floating_point():
            assert torch.equal(got.to(ref.dtype), ref), f"{key}: {got.tolist()} != {ref.tolist()}"
        else:
            err = (got.float() - ref).abs()
            tol = info["suggested_atol"] + rtol * ref.abs()
            MAX_ERRORS[key] = float(err.max())
            assert bool((err <= tol).all()), (
                f"{key}: max error {float(err.max()):.3e} (atol {info['suggested_atol']})"
            )
        checked += 1
    assert checked >= len(expected_outputs)


def test_a_directory_without_cases_is_named(tmp_path):
    (tmp_path / "cases.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="cases.safetensors missing"):
        load_cases(tmp_path)
