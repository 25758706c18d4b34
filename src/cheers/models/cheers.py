"""Cheers: composition of the unified vision tokenizer, the Qwen2 LLM and the cascaded flow head
(paper Fig. 3).

Dimension legend: B rows, L' expanded length, n images, H×W pixels, h×w = H/p×W/p grid, N = hw/4 LLM tokens
per image, M = hw fine tokens, C latent channels, Dt text width, Dv vision width, V vocabulary.

State-dict names are the release's: ``model.<part>`` for every part and ``lm_head.weight`` (tied to
``model.language_model.embed_tokens.weight``).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from transformers import Qwen2Config, Qwen2Model

from cheers.config import CheersConfig, TextConfig
from cheers.flow import flow_loss, interpolate, velocity_target
from cheers.models.flow_head import DiTHead, HiGate, TimestepEmbedder
from cheers.models.sequence import IGNORE_INDEX, Assembled, assemble, hybrid_mask, shift_labels
from cheers.models.vae import LatentDecoder, VAEModel
from cheers.models.vision import (
    UnderstandingProjector,
    build_vision_tower,
    patch_embeddings,
    split_2x2,
    vit_features,
)
from cheers.tokens import SpecialTokens

# transformers 5.x renamed Qwen2Model's ``past_key_values`` argument and output to ``cache`` (the old name
# warns and goes in 5.40): pass the KV cache under whichever name the installed version takes.
_LM_CACHE_ARG = "cache" if "cache" in inspect.signature(Qwen2Model.forward).parameters else "past_key_values"


def lm_output_cache(out):
    """The KV cache of a Qwen2Model output, under its current or its former name."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def build_language_model(cfg: TextConfig) -> Qwen2Model:
    hf = Qwen2Config(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        hidden_act=cfg.hidden_act,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=cfg.tie_word_embeddings,
        use_sliding_window=False,
        attention_dropout=cfg.attention_dropout,
        # set explicitly: the release's config.json omits it, and library defaults have changed over time
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
    )
    hf._attn_implementation = "sdpa"  # the boolean-mask semantics the release relies on (reference §5)
    return Qwen2Model(hf)


@dataclass
class ImageFeatures:
    """What the vision tokenizer makes of a stack of images at their flow times."""

    tokens: torch.Tensor  # (n, N, Dt) LLM tokens of D(z_t)
    pixel_hat: torch.Tensor  # (n, 3, H, W) the projector decoder's pixels of z_t
    target: torch.Tensor  # (n, M, C) velocity target, zero for t = 1
    temb1: torch.Tensor  # (n, 1, Dt)
    temb2: torch.Tensor  # (n, 1, Dv)
    grid: tuple[int, int]


@dataclass
class CheersOutput:
    logits: torch.Tensor | None = None  # (B, L', V), or (B·(L'-1), V) text logits when labels are given
    hidden_states: torch.Tensor | None = None  # (B, L', Dt) final normed hidden states
    loss: torch.Tensor | None = None
    text_loss: torch.Tensor | None = None
    image_loss: torch.Tensor | None = None
    pred_velocity: torch.Tensor | None = None  # (n, C, h, w)
    target_velocity: torch.Tensor | None = None  # (n, M, C)
    time_embeds_1: torch.Tensor | None = None
    time_embeds_2: torch.Tensor | None = None
    assembled: Assembled | None = None
    past_key_values: object | None = None


class CheersModel(nn.Module):
    """The release's ``UMMModel``: every part but the LM head (state-dict prefix ``model.``)."""

    def __init__(self, cfg: CheersConfig) -> None:
        super().__init__()
        self.config = cfg
        dt, dv, opt = cfg.text.hidden_size, cfg.vision.hidden_size, cfg.options
        self.vae_model = VAEModel(cfg.vae_encoder, cfg.vae_decoder)
        self.vae_decoder_projector = LatentDecoder(cfg.vae_decoder)
        self.vision_representation = build_vision_tower(cfg.vision)
        if not opt.pixel_reconstruction:
            # Paper Table 6's ablation: each latent token becomes one ViT patch of pseudo-pixels.
            p = cfg.patch_size
            self.latent_to_patch = nn.Linear(cfg.latent_channels, 3 * p * p)
        self.und_projector = UnderstandingProjector(dv, dt)
        self.gen_projector = DiTHead(
            dt, opt.gen_head_depth, cfg.text.num_attention_heads, cfg.text.num_key_value_heads, out_dim=4 * dv
        )
        self.hi_gate = HiGate(dv)
        # The release gives stage 2 the vision heads but the *text* KV-head count, and RoPE positions that
        # wrap at half the token count (reference §8).
        self.hi_projector = DiTHead(
            dv,
            opt.hi_head_depth,
            cfg.vision.num_attention_heads,
            cfg.text.num_key_value_heads,
            out_dim=cfg.vae_decoder.ch,
            wrap_positions=True,
        )
        self.time_embed = TimestepEmbedder(dt, dv, opt.time_embed_dim)
        self.language_model = build_language_model(cfg.text)

    # -- the unified vision tokenizer ------------------------------------------------------------------------
    def grid_of(self, pixels_or_latent: torch.Tensor) -> tuple[int, int]:
        """(h, w) of an image (B, 3, H, W) or a latent (B, C, h, w)."""
        if pixels_or_latent.shape[1] == self.config.latent_channels:
            return tuple(pixels_or_latent.shape[-2:])
        p = self.config.patch_size
        height, width = pixels_or_latent.shape[-2:]
        if height % (2 * p) or width % (2 * p):
            raise ValueError(f"image size {height}x{width} must be a multiple of {2 * p} (2 x patch size)")
        return height // p, width // p

    def tokenize_latent(self, x_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z_t (n, C, h, w) -> (LLM tokens (n, N, Dt), pixel_hat (n, 3, H, W)) via D(z_t) and the ViT.

        With ``options.pixel_reconstruction`` off, pixel_hat is the learned linear image of the latent
        instead.
        """
        if self.config.options.pixel_reconstruction:
            pixel_hat = self.vae_decoder_projector(x_t)  # (n, 3, H, W)
        else:
            p = self.config.patch_size
            pixel_hat = rearrange(
                self.latent_to_patch(rearrange(x_t, "n c h w -> n h w c")),
                "n h w (c p q) -> n c (h p) (w q)",
                p=p,
                q=p,
            )
        feats = vit_features(self.vision_representation, pixel_hat)  # (n, M, Dv)
        return self.und_projector(feats, tuple(x_t.shape[-2:])), pixel_hat

    def image_features(
        self,
        pixel_values: torch.Tensor,
        t: torch.Tensor | None = None,
        x0: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> ImageFeatures:
        """Images at flow times t (default 1) -> tokens, pixel_hat, velocity target, time embeddings
        (reference §4).

        Args:
            pixel_values: (n, 3, H, W) in [0, 1].
            t: (n,) flow times; None means every image is clean (t = 1).
            x0: (n, C, h, w) noise; drawn from ``generator`` when needed and not given.
        """
        dtype = next(self.parameters()).dtype
        pixel_values = pixel_values.to(dtype)
        n = pixel_values.shape[0]
        t = torch.ones(n, device=pixel_values.device) if t is None else t.to(pixel_values.device).reshape(n)
        z1 = self.vae_model.encode(pixel_values)  # (n, C, h, w)
        if x0 is None:
            if bool((t == 1).all()):
                x0 = torch.zeros_like(z1)  # t·z1 + 0·x0 = z1 exactly; no draw needed
            else:
                x0 = torch.randn(z1.shape, generator=generator, device=z1.device, dtype=z1.dtype)
        x0 = x0.to(z1)
        x_t = interpolate(z1, x0, t)
        tokens, pixel_hat = self.tokenize_latent(x_t)
        target = rearrange(velocity_target(z1, x0, t), "n c h w -> n (h w) c")
        temb1, temb2 = self.time_embed(t.to(dtype))
        return ImageFeatures(tokens, pixel_hat, target, temb1, temb2, tuple(z1.shape[-2:]))

    # -- the cascaded flow head -----------------------------------------------------------------------------
    def velocity_head(
        self,
        hidden: torch.Tensor,
        temb1: torch.Tensor,
        temb2: torch.Tensor,
        pixel_hat: torch.Tensor,
        grid: tuple[int, int],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """LLM image states -> velocity (reference §9).

        Args:
            hidden: (n, N, Dt) final-normed LLM states at the image positions.
            pixel_hat: (n, 3, H, W) the decoded image that produced those tokens (the HFI source).
        Returns:
            velocity (n, C, h, w) and the raw HiGate gate (n, h, w).
        """
        h, w = grid
        low = split_2x2(self.gen_projector(hidden, temb1), grid)  # (n, N, 4Dv) -> (n, M, Dv)
        if self.config.options.high_frequency_injection:
            high = patch_embeddings(self.vision_representation, pixel_hat.to(low.dtype))  # (n, M, Dv)
            fused, gate = self.hi_gate(low, high)
        else:
            fused, gate = self.hi_gate.layer_norm(low), torch.zeros_like(low[..., :1])
        v = self.hi_projector(fused, temb2)  # (n, M, C)
        return rearrange(v, "n (h w) c -> n c h w", h=h, w=w), rearrange(gate, "n (h w) 1 -> n h w", h=h, w=w)

    def initialize_weights(self) -> None:
        """Zero-init every AdaLN modulation and the HFI gate's output (the release's zero-initialised
        layers)."""
        self.gen_projector.zero_init()
        self.hi_projector.zero_init()
        self.hi_gate.zero_init()


class Cheers(nn.Module):
    """The full model: :class:`CheersModel` as ``model`` plus the tied ``lm_head``.

    Args:
        config: the model configuration.
        special: special-token ids (from the tokenizer); needed for training labels and generation.
    """

    def __init__(self, config: CheersConfig, special: SpecialTokens | None = None) -> None:
        super().__init__()
        self.config = config
        self.special = special
        self.model = CheersModel(config)
        self.lm_head = nn.Linear(config.text.hidden_size, config.text.vocab_size, bias=False)
        self.tie_weights()
        self.model.initialize_weights()

    # Parts a recipe can train or freeze, by name (paper Table 1 stages choose among these).
    PARAMETER_GROUPS: dict[str, tuple[str, ...]] = {
        "vae": ("model.vae_model",),
        "pixel_decoder": ("model.vae_decoder_projector",),
        "vision_encoder": ("model.vision_representation", "model.latent_to_patch"),
        "und_projector": ("model.und_projector",),
        "llm": ("model.language_model", "lm_head"),
        "flow_head": ("model.gen_projector", "model.hi_projector", "model.time_embed"),
        "hfi_gate": ("model.hi_gate",),
    }

    # Finer parts than the groups, for re-initialisation (``init.reinitialize``).
    PART_ALIASES: dict[str, tuple[str, ...]] = {
        "llm_layers": ("model.language_model.layers", "model.language_model.norm"),
    }

    @classmethod
    def group_of(cls, name: str) -> str | None:
        """The parameter group that owns parameter ``name`` (None for a name outside every group)."""
        return next(
            (
                g
                for g, prefixes in cls.PARAMETER_GROUPS.items()
                if any(name == p or name.startswith(p + ".") for p in prefixes)
            ),
            None,
        )

    def parameter_groups(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Named groups of (name, parameter); every parameter is in exactly one group (tied ones once)."""
        groups: dict[str, list[tuple[str, nn.Parameter]]] = {g: [] for g in self.PARAMETER_GROUPS}
        for name, param in self.named_parameters():
            owner = self.group_of(name)
            if owner is None:
                raise AssertionError(f"parameter {name} belongs to no group")
            groups[owner].append((name, param))
        return groups

    def set_trainable(self, groups: list[str] | tuple[str, ...]) -> dict[str, int]:
        """Train exactly ``groups`` (freeze the rest); returns the trainable parameter count per group."""
        unknown = sorted(set(groups) - set(self.PARAMETER_GROUPS))
        if unknown:
            raise ValueError(f"unknown parameter group(s) {unknown}; known: {sorted(self.PARAMETER_GROUPS)}")
        counts = {}
        for group, params in self.parameter_groups().items():
            for _, p in params:
                p.requires_grad_(group in groups)
            counts[group] = sum(p.numel() for _, p in params) if group in groups else 0
        return counts

    def to_channels_last(self) -> Cheers:
        """Keep the VAE decoders' and the ViT's convolutions in NHWC memory format: faster with oneDNN and
        cuDNN, the same numbers up to rounding (``CheersPipeline.optimize``, ``engine.channels_last``).

        The VAE encoder stays in NCHW: its first GroupNorms see images, and on flat regions a channel can be
        constant; PyTorch's channels-last GroupNorm on the CPU then loses the variance to cancellation (the
        bundled model's latent of a flat image 1.7e-3 off, relative, against 3e-7 in NCHW; a random-weight
        tiny model's 29 %). It runs once per input image, not per sampling step."""
        core = self.model
        for part in (core.vae_model.decoder, core.vae_decoder_projector, core.vision_representation):
            part.to(memory_format=torch.channels_last)
        return self

    def tie_weights(self) -> None:
        if self.config.text.tie_word_embeddings:
            self.lm_head.weight = self.model.language_model.embed_tokens.weight

    @property
    def markers(self) -> tuple[int, int]:
        s = self.special or SpecialTokens
        return s.image_marker, s.image_gen_marker

    def require_special(self) -> SpecialTokens:
        if self.special is None:
            raise ValueError(
                "this Cheers model has no special-token ids; pass special=SpecialTokens.from_tokenizer(...)"
            )
        return self.special

    def run_language_model(
        self,
        embeds: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        past_key_values=None,
        use_cache: bool = False,
    ):
        """One call of the Qwen2 stack with an explicit boolean 4-D mask and explicit positions."""
        return self.model.language_model(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=positions,
            use_cache=use_cache,
            **{_LM_CACHE_ARG: past_key_values},
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        t: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        x0: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        past_key_values=None,
        use_cache: bool = False,
        flow_loss_weight: float = 1.0,
        image_features: ImageFeatures | None = None,
    ) -> CheersOutput:
        """Understanding forward (no labels) or training forward (labels), reference §5, §6, §11.

        Args:
            input_ids: (B, L) with image markers.
            attention_mask: (B, L) 1 = real; default all ones.
            pixel_values: (n, 3, H, W) images in order of appearance, all of one size.
            t: (n,) flow time per image (default 1: clean).
            labels: (B, L) unshifted labels aligned with ``input_ids``.
            x0: (n, C, h, w) the flow noise (drawn from ``generator`` if needed and not given).
            flow_loss_weight: lambda in ``L_AR + lambda·L_FM``.
            image_features: precomputed :meth:`CheersModel.image_features` of ``pixel_values`` (reused, e.g.
                by both guidance branches); ``pixel_values`` is then ignored.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        feats = image_features
        if feats is None and pixel_values is not None:
            feats = self.model.image_features(pixel_values, t, x0, generator)
        asm = assemble(
            input_ids,
            attention_mask,
            feats.tokens if feats else None,
            self.model.language_model.embed_tokens,
            self.markers,
            labels,
            self.config.options.max_sequence_length,
        )
        mask = hybrid_mask(asm.image_flags, asm.valid)
        positions = torch.arange(asm.embeds.shape[1], device=input_ids.device).expand(asm.embeds.shape[0], -1)
        lm = self.run_language_model(asm.embeds, mask, positions, past_key_values, use_cache)
        hidden = lm.last_hidden_state  # (B, L', Dt)
        out = CheersOutput(
            hidden_states=hidden, assembled=asm, past_key_values=lm_output_cache(lm) if use_cache else None
        )
        if feats is not None:
            out.time_embeds_1, out.time_embeds_2 = feats.temb1, feats.temb2
        if labels is None:
            out.logits = self.lm_head(hidden)
            return out
        return self._training_losses(out, asm, feats, flow_loss_weight)

    def _training_losses(
        self, out: CheersOutput, asm: Assembled, feats: ImageFeatures | None, flow_loss_weight: float
    ) -> CheersOutput:
        special = self.require_special()
        hidden = out.hidden_states
        target = shift_labels(asm.labels, self.markers, special.im_end)  # (B, L'-1)
        logits = self.lm_head(hidden[:, :-1]).flatten(0, 1)  # (B·(L'-1), V)
        flat_target = target.flatten()
        n_text = (flat_target != IGNORE_INDEX).sum().clamp(min=1)
        text_loss = (
            F.cross_entropy(logits.float(), flat_target, ignore_index=IGNORE_INDEX, reduction="sum") / n_text
        )
        out.logits, out.text_loss = logits, text_loss
        if feats is None:
            out.image_loss = text_loss.new_zeros(())
        else:
            n_img = feats.tokens.shape[0]
            # image states: every image slot, row by row then by position (= pixel_values order)
            img_hidden = hidden[asm.image_slots].reshape(n_img, -1, hidden.shape[-1])  # (n, N, Dt)
            v, _ = self.model.velocity_head(img_hidden, feats.temb1, feats.temb2, feats.pixel_hat, feats.grid)
            out.pred_velocity, out.target_velocity = v, feats.target
            out.image_loss = flow_loss(rearrange(v, "n c h w -> n (h w) c"), feats.target)
        out.loss = out.text_loss + flow_loss_weight * out.image_loss
        return out
