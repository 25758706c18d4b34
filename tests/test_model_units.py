"""Behaviour of the model's parts, pinned on tiny random configurations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cheers.config import CheersConfig, ConfigError, preset
from cheers.flow import interpolate, time_shift, velocity_target
from cheers.models.cheers import Cheers
from cheers.models.flow_head import DiTBlock, DiTHead, HiGate, rope_tables
from cheers.models.sequence import hybrid_mask, shift_labels
from cheers.models.vae import Upsample, patchify, unpatchify
from cheers.models.vae_fast import install_fast_vae, reference_layers, upsample_conv
from cheers.models.vision import merge_2x2, split_2x2
from cheers.sampling import apply_guidance, schedule

from model_helpers import TINY_SPECIAL, t2i_prompt, tiny_model

OFFICIAL = Path(__file__).parent / "fixtures/official"


# -- configuration -------------------------------------------------------------------------------------------


def test_official_preset_on_meta_matches_the_release_manifest():
    manifest = json.loads((OFFICIAL / "full_manifest.json").read_text())
    with torch.device("meta"):
        model = Cheers(preset("official"))
    state = model.state_dict()
    expected = {t["name"]: t["shape"] for t in manifest["tensors"]}
    assert set(state) == set(expected)
    assert {k: list(v.shape) for k, v in state.items()} == expected
    assert sum(p.numel() for p in model.parameters()) == manifest["unique_parameter_count"] == 2_571_337_735
    assert sum(v.numel() for v in state.values()) == manifest["stored_element_count"]
    index = json.loads((OFFICIAL / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(state)
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight


def test_release_config_json_resolves_to_the_official_preset():
    cfg = CheersConfig.from_json_file(OFFICIAL / "config.json")
    assert cfg == preset("official")
    assert cfg.text.num_hidden_layers == 28 and cfg.text.rope_theta == 1e6  # both omitted by the file
    assert cfg.vae_encoder.ch_mult == (1, 2, 4, 4) and cfg.vae_decoder.out_ch == 3
    assert CheersConfig.from_dict(cfg.to_dict()) == cfg


def test_config_defaults_are_the_release_code_defaults():
    cfg = CheersConfig.from_dict(
        {
            "model_type": "umm",
            "vision_representation_config": {"patch_size": 16},
            "text_config": {"num_key_value_heads": 4},
        }
    )
    assert cfg.text.vocab_size == 152064 and cfg.text.hidden_size == 3584  # 7B-style Qwen defaults
    assert cfg.vae_encoder.resolution == 256 and cfg.vae_encoder.z_channels == 32


@pytest.mark.parametrize(
    "data, needle",
    [
        ({"model_type": "llama"}, "model_type"),
        ({"text_config": {"hidden_sizee": 3}}, "hidden_sizee"),
        ({"vae_decoder_config": {"ch": 64}}, r"4 \* z_channels"),
        ({"text_config": {"num_attention_heads": 5}}, "divisible"),
        (
            {"vae_encoder_config": {"ch_mult": [1, 2]}, "vae_decoder_config": {"ch_mult": [1, 2]}},
            "patch size",
        ),
        ({"vision_representation_config": {"patch_size": 0}}, "patch_size"),
    ],
)
def test_bad_configs_raise_naming_the_problem(data, needle):
    with pytest.raises(ConfigError, match=needle):
        CheersConfig.from_dict({"model_type": "umm", **data})


# -- layout conventions --------------------------------------------------------------------------------------


def test_patchify_channel_order_and_inverse():
    m = torch.randn(2, 3, 8, 6)
    p = patchify(m)
    assert p.shape == (2, 12, 4, 3)
    # out[b, c·4 + pi·2 + pj, i, j] = m[b, c, 2i+pi, 2j+pj]
    assert p[1, 2 * 4 + 1 * 2 + 0, 3, 2] == m[1, 2, 7, 4]
    assert torch.equal(unpatchify(p), m)


@pytest.mark.parametrize("channels_last", [False, True])
def test_polyphase_upsample_conv_is_interpolate_then_conv(channels_last):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(6, 5, 3, padding=1).double()
    x = torch.randn(2, 6, 3, 5, dtype=torch.float64, requires_grad=True)  # odd, non-square grid
    xin = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    plain = conv(torch.nn.functional.interpolate(xin, scale_factor=2.0, mode="nearest"))
    fast = upsample_conv(xin, conv.weight, conv.bias)
    assert fast.shape == plain.shape == (2, 5, 6, 10)
    assert fast.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert torch.allclose(fast, plain, atol=1e-12, rtol=0)
    grad = torch.randn_like(plain)
    wanted = torch.autograd.grad(plain, (x, conv.weight, conv.bias), grad)
    got = torch.autograd.grad(upsample_conv(xin, conv.weight, conv.bias), (x, conv.weight, conv.bias), grad)
    for a, b in zip(got, wanted):
        assert torch.allclose(a, b, atol=1e-10, rtol=0)


def test_installed_polyphase_upsampling_comes_off_again():
    torch.manual_seed(0)
    up = Upsample(4)
    x = torch.randn(1, 4, 4, 4)
    literal = up(x)  # the reference: interpolate, then conv
    fast = install_fast_vae(up)
    assert fast.upsamplers == [up] and "forward" in vars(up)
    assert (up(x) - literal).abs().max() < 1e-5
    with pytest.raises(ValueError, match="already have a forward installed"):
        install_fast_vae(up)
    fast.remove()
    assert "forward" not in vars(up) and torch.equal(up(x), literal)
    model = install_fast_vae(tiny_model())  # both decoders of a model, all their upsamplers
    assert len(model.decoders) == 2 and len(model.upsamplers) > 2
    with pytest.raises(ValueError, match="no VAE Decoder"):
        install_fast_vae(torch.nn.Linear(2, 2))
    bf16 = Upsample(4).bfloat16()  # the summed taps are formed in float32, then cast once
    plain = bf16(x.bfloat16())
    install_fast_vae(bf16)
    assert (bf16(x.bfloat16()).float() - plain.float()).abs().max() < 0.05


def _small_latent_decoder(channels_last: bool):
    from cheers.config import VAEDecoderConfig
    from cheers.models.vae import LatentDecoder

    torch.manual_seed(0)
    cfg = VAEDecoderConfig(resolution=64, ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4)
    dec = LatentDecoder(cfg).eval()  # a 64 -> 32 channel shortcut, an upsampler, the attention block
    if channels_last:
        dec.to(memory_format=torch.channels_last)
    return dec, torch.randn(2, 16, 2, 2)


@pytest.mark.parametrize("channels_last", [False, True])
def test_installed_vae_path_falls_back_to_the_reference_forward_and_trains(channels_last, monkeypatch):
    """Where the buffers do not apply (autograd, another dtype or device, no oneDNN fused conv) a decoder
    runs its reference forward with the polyphase upsamplers, which backpropagates; reference_layers() and
    remove() give the release's layers back."""
    from cheers.models import vae_fast

    dec, z = _small_latent_decoder(channels_last)
    with torch.no_grad():
        literal = dec(z)
    fast = install_fast_vae(dec)
    slow = dec(z)  # parameters require grad: the reference forward, polyphase upsampling
    assert slow.requires_grad and (slow - literal).abs().max() < 1e-5
    fast.reuse_buffers = False
    with torch.no_grad():
        assert torch.equal(dec(z), slow.detach())
    fast.reuse_buffers = True
    slow.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in dec.decoder.parameters())
    z_grad = z.clone().requires_grad_()  # frozen weights, input recording gradients
    dec.requires_grad_(False)
    out = dec(z_grad)
    (g,) = torch.autograd.grad(out.sum(), z_grad)
    assert torch.equal(out.detach(), slow.detach()) and torch.isfinite(g).all() and fast.nbytes == 0
    with torch.no_grad():
        if vae_fast._fused_conv_available():
            assert fast.applies(z)
        assert not fast.applies(z.double()) and not fast.applies(z.bfloat16())
        assert not fast.applies(torch.empty(z.shape, device="meta"))
        monkeypatch.setattr(vae_fast, "_fused_conv_available", lambda: False)  # a build without oneDNN's op
        assert not fast.applies(z)
        with reference_layers(dec):  # the release-style loop's layers
            assert "forward" not in vars(dec.decoder) and torch.equal(dec(z), literal)
        assert "forward" in vars(dec.decoder)
        fast.remove()
        assert torch.equal(dec(z), literal)
    assert not fast.applies(z)  # autograd on


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("phase_upsampling", [False, True])
def test_installed_cpu_decoder_reuses_its_buffers_and_matches_the_reference(channels_last, phase_upsampling):
    """Installed, the CPU decoder writes its activations into buffers it keeps: the output matches the
    reference (its convs give the same bits as the polyphase reference; GroupNorm's two-pass statistics differ
    by rounding), is a fresh tensor, and a second call makes no new buffer. Large upsampler outputs go through
    the phase convs into buffers (forced here with a zero size threshold). A decoder run while the buffers are
    in use (from inside another decoder here; another thread likewise) takes its own: same numbers."""
    from cheers.models import vae_fast

    if not vae_fast._fused_conv_available():
        pytest.skip("the buffered path needs oneDNN's fused convolution")
    dec, z = _small_latent_decoder(channels_last)
    twin, _ = _small_latent_decoder(channels_last)  # the same weights: a second decoder under one handle
    both = torch.nn.ModuleList([dec, twin])
    with torch.no_grad():
        literal = dec(z)
        fast = install_fast_vae(both)
        if phase_upsampling:
            fast.mapped_afresh = 0
        fast.reuse_buffers = False
        plain = dec(z)  # the reference forward, polyphase upsampling
        fast.reuse_buffers = True
        assert fast.applies(z) and fast.nbytes == 0
        first = dec(z)
        held = fast.nbytes
        assert held > 0 and len(fast.buffer_keys()) >= 3
        assert any(key[0] == "upsample" for key in fast.buffer_keys()) == phase_upsampling
        second = dec(z)
        assert fast.nbytes == held  # reused, none made
        assert torch.equal(twin(z), first) and fast.nbytes == held  # shared by the handle's decoders
        inner = []
        hook = dec.decoder.mid.attn_1.register_forward_pre_hook(lambda m, args: inner.append(twin(z)))
        try:
            nested = dec(z)
        finally:
            hook.remove()
        assert torch.equal(nested, first) and torch.equal(inner[0], first) and fast.nbytes == held
        for buf in fast._idle[0]._buffers.values():
            assert first.untyped_storage().data_ptr() != buf.untyped_storage().data_ptr()
        fast.clear()
        assert fast.nbytes == 0
    assert torch.equal(first, second)
    assert first.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert (first - plain).abs().max() <= 1e-5 * plain.abs().max()
    assert (first - literal).abs().max() <= 1e-5 * literal.abs().max()


def test_token_merge_and_pixel_shuffle_are_inverse():
    x = torch.randn(3, 4 * 6, 5)  # grid 4 x 6
    merged = merge_2x2(x, (4, 6))
    assert merged.shape == (3, 6, 20)
    # token (I, J) = (1, 2) holds fine token (2I+pi, 2J+pj) at feature block k = pi·2 + pj
    assert torch.equal(merged[0, 1 * 3 + 2, 3 * 5 : 4 * 5], x[0, (2 * 1 + 1) * 6 + (2 * 2 + 1)])
    assert torch.equal(split_2x2(merged, (4, 6)), x)


def test_hybrid_mask_structure():
    # row: text, text, img, img, text, img, img, pad, pad
    flags = torch.tensor([[0, 0, 1, 1, 0, 1, 1, 0, 0]], dtype=torch.bool)
    valid = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    m = hybrid_mask(flags, valid)[0, 0]
    assert m[1, 0] and not m[0, 1]  # causal text
    assert m[2, 3] and m[3, 2]  # bidirectional inside an image
    assert not m[2, 5] and m[5, 2]  # image blocks are separate runs; later sees earlier causally
    assert not m[4, 5] and m[5, 4]
    assert not m[:7, 7:].any()  # real tokens never see padding
    assert m[7, 8] and m[8, 7] and not m[7, :7].any()  # padding sees its own run only


def test_shifted_labels_follow_the_release_relabelling():
    s = TINY_SPECIAL
    n = 3
    labels = torch.tensor([[5, s.im_start, *([-300] * n), s.im_end, 9, 10]])
    target = shift_labels(labels, (-200, -300), s.im_end)
    # x predicts IM_START, IM_START and the image positions predict nothing, IM_END predicts y
    assert target.tolist() == [[s.im_start, -100, -100, -100, -100, 9, 10]]


# -- flow and sampling ---------------------------------------------------------------------------------------


def test_flow_path_and_target():
    z1, x0 = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    t = torch.tensor([0.0, 0.25, 1.0])
    zt = interpolate(z1, x0, t)
    assert torch.allclose(zt[1], 0.25 * z1[1] + 0.75 * x0[1])
    assert torch.equal(zt[2], z1[2]) and torch.equal(zt[0], x0[0])
    u = velocity_target(z1, x0, t)
    assert torch.equal(u[2], torch.zeros_like(u[2])) and torch.allclose(u[0], z1[0] - x0[0])


def test_time_shift_formula():
    t = torch.linspace(0, 1, 11)
    for alpha in (0.25, 0.5, 1.0, 3.0):
        s = time_shift(t, alpha)
        assert torch.allclose(s, alpha * t / (1 + (alpha - 1) * t))
        assert s[0] == 0 and s[-1] == 1
    assert torch.equal(time_shift(t, 1.0), t)
    assert (time_shift(t, 0.5)[1:-1] < t[1:-1]).all()  # alpha < 1 lingers near the noise end
    assert torch.allclose(schedule(4, 0.5), torch.tensor([0.0, 0.2, 0.5, 1.0]))
    with pytest.raises(ValueError):
        time_shift(t, 0.0)


def test_guidance_scale_one_is_the_conditional_velocity():
    vc, vu = torch.randn(2, 8), torch.randn(2, 8)
    assert torch.allclose(apply_guidance(vc, vu, 1.0), vc)
    assert torch.allclose(apply_guidance(vc, vu, 0.0), vu)


# -- zero init -----------------------------------------------------------------------------------------------


def test_adaln_zero_blocks_are_identity_and_the_gate_is_closed_at_init():
    head = DiTHead(32, 2, 4, 2, out_dim=12)
    head.zero_init()
    x, c = torch.randn(2, 16, 32), torch.randn(2, 1, 32)
    rope = rope_tables(torch.arange(16), 8, 10000.0, x.dtype)
    for block in head.diffusion_head_a:
        assert torch.equal(block(x, c, rope), x)
    final = head.diffusion_head_b
    assert torch.allclose(head(x, c), final.linear(final.norm_final(x)))  # modulation off, output layer live
    gate = HiGate(32)
    gate.zero_init()
    low, high = torch.randn(2, 16, 32), torch.randn(2, 16, 32)
    fused, g = gate(low, high)
    assert torch.equal(g, torch.zeros_like(g)) and torch.allclose(fused, gate.layer_norm(low))


def test_fresh_model_learns_the_flow_through_every_head():
    """Regression: zeroing the heads' output layers too left only the output bias with a gradient."""
    torch.manual_seed(0)
    model = Cheers(preset("tiny"), special=TINY_SPECIAL)
    block = model.model.gen_projector.diffusion_head_a[0]
    assert isinstance(block, DiTBlock) and not block.adaLN_modulation[-1].weight.any()
    ids = t2i_prompt([11, 12])[:, :-1]
    ids = torch.cat([ids, torch.tensor([[TINY_SPECIAL.im_start, -300, TINY_SPECIAL.im_end]])], dim=1)
    out = model(ids, pixel_values=torch.rand(1, 3, 64, 64), t=torch.tensor([0.3]), labels=ids)
    out.image_loss.backward()
    for name in (
        "gen_projector.diffusion_head_b.linear.weight",
        "hi_projector.diffusion_head_b.linear.weight",
        "hi_gate.gate.2.weight",
        "gen_projector.diffusion_head_a.0.adaLN_modulation.1.weight",
        "hi_projector.diffusion_head_a.2.adaLN_modulation.1.weight",
    ):
        grad = model.model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_hi_projector_positions_wrap_at_half():
    head = DiTHead(48, 1, 6, 2, out_dim=8, wrap_positions=True)
    assert head.positions(8, torch.device("cpu")).tolist() == [0, 1, 2, 3, 0, 1, 2, 3]


def test_model_without_hfi_ignores_the_high_frequency_branch():
    model = tiny_model(**{"options.high_frequency_injection": False})
    hidden = torch.randn(1, 16, 32)
    t1, t2 = model.model.time_embed(torch.tensor([0.5]))
    a, gate = model.model.velocity_head(hidden, t1, t2, torch.rand(1, 3, 128, 128), (8, 8))
    b, _ = model.model.velocity_head(hidden, t1, t2, torch.rand(1, 3, 128, 128), (8, 8))
    assert torch.equal(a, b) and not gate.any()


def test_model_without_pixel_reconstruction_reads_the_latent_directly():
    """Paper Table 6's ablation: the ViT sees a learned linear image of z_t, never the pixel decoder."""
    model = tiny_model(**{"options.pixel_reconstruction": False})
    decoder = model.model.vae_decoder_projector
    decoder.forward = lambda *a, **k: (_ for _ in ()).throw(AssertionError("pixel decoder used"))
    x_t = torch.randn(2, model.config.latent_channels, 8, 8)
    tokens, pixel_hat = model.model.tokenize_latent(x_t)
    assert pixel_hat.shape == (2, 3, 128, 128) and tokens.shape[:2] == (2, 16)
    # Each latent token is exactly one ViT patch: changing token (0, 0) changes only patch (0, 0).
    x2 = x_t.clone()
    x2[:, :, 0, 0] += 1
    diff = (model.model.tokenize_latent(x2)[1] - pixel_hat).abs().sum(1)
    assert diff[:, :16, :16].sum() > 0 and diff[:, 16:, :].sum() == 0 and diff[:, :, 16:].sum() == 0
    tokens.sum().backward()
    assert model.model.latent_to_patch.weight.grad.abs().sum() > 0
    groups = {g: [n for n, _ in ps] for g, ps in model.parameter_groups().items()}
    assert "model.latent_to_patch.weight" in groups["vision_encoder"]
    assert "model.latent_to_patch.weight" not in dict(tiny_model().named_parameters())
