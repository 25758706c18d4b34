"""Starting points: the model and processor a recipe starts from.

* ``init.from_release``: a directory in the release layout (fine-tuning, stages II-IV).
* separate pretrained parts for stage I, each a local directory with ``config.json`` + safetensors:
  ``init.llm`` (Qwen2 / Qwen2.5: ``Qwen2Model`` or ``Qwen2ForCausalLM``), ``init.vision`` (SigLIP:
  ``SiglipVisionModel`` or ``SiglipModel``), ``init.vae`` (our stage-0 output, a release-named
  ``model.vae_model.*`` set, or a bare BFL VAE ``encoder.* / decoder.* / bn.*``). Their tensors are renamed
  onto ours (``model.language_model.*``, ``model.vision_representation.*``, ``model.vae_model.*``) and
  loaded strictly: a missing, unexpected or mis-shaped tensor, or a config that disagrees with the
  recipe's model, raises with the names.
  ``init.vae`` and ``init.vision`` may also name a directory in the release layout, or ``default`` (the
  bundled model): only that part's tensors are taken from it, the rest of the model starts from scratch.
* nothing: a randomly initialised model of ``model.preset`` (ShapesWorld, tests).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from cheers import checkpoint as ckpt
from cheers.config import CheersConfig, preset
from cheers.data.shapes_source import build_shapes_processor
from cheers.models.cheers import Cheers
from cheers.models.pretrained import from_pretrained, resolve_dtype
from cheers.processor import CheersProcessor
from cheers.tokens import SpecialTokens
from cheers.training.config import Recipe, RecipeError

logger = logging.getLogger(__name__)

LLM, VISION = "model.language_model.", "model.vision_representation."
VAE, PIXEL_DECODER = "model.vae_model.", "model.vae_decoder_projector."


def release_dir(recipe: Recipe) -> str | None:
    """``init.from_release`` as a directory; ``default`` names the bundled model (continuing its lineage)."""
    return part_dir(recipe.init.from_release) if recipe.init.from_release else None


def model_config(recipe: Recipe) -> CheersConfig:
    """The architecture: the release's config.json, else the preset; then ``model.overrides``."""
    if recipe.init.from_release:
        config = CheersConfig.from_json_file(Path(release_dir(recipe)) / ckpt.CONFIG_NAME)
    elif recipe.model.preset:
        config = preset(recipe.model.preset)
    else:
        raise RecipeError("model.preset is empty and init.from_release is not set: nothing defines the model")
    return config.replace(**recipe.model.overrides) if recipe.model.overrides else config


def build_processor(recipe: Recipe, config: CheersConfig) -> CheersProcessor:
    """The tokenizer + image preprocessing at the model's resolution (``data.processor``, else a starting
    point)."""
    source = recipe.data.processor or release_dir(recipe) or recipe.init.llm
    size, patch = config.image_size, config.patch_size
    if source is None:
        raise RecipeError(
            "data.processor: no tokenizer; give a tokenizer directory, 'shapes', or init.from_release "
            "/ init.llm with tokenizer files"
        )
    if source == "shapes":
        processor = build_shapes_processor(size, patch, config.text.vocab_size)
    else:
        processor = CheersProcessor.from_pretrained(source, image_size=size, patch_size=patch)
    if len(processor.tokenizer) > config.text.vocab_size:
        raise RecipeError(
            f"the tokenizer has {len(processor.tokenizer)} entries but the model's vocabulary has "
            f"{config.text.vocab_size}"
        )
    return processor


def build_model(recipe: Recipe, special: SpecialTokens, config: CheersConfig | None = None) -> Cheers:
    """The model a recipe starts from, on the CPU in ``model.dtype`` (see the module docstring)."""
    config = config or model_config(recipe)
    dtype = resolve_dtype(recipe.model.dtype)
    release = release_dir(recipe)
    if release and not recipe.model.overrides:
        model = from_pretrained(release, dtype=dtype, special=special)
        model = reinitialize(model, recipe.init.reinitialize, recipe.train.seed)
        return scale_und_projector(model, recipe.init.und_projector_scale).train()
    torch.manual_seed(recipe.train.seed)
    model = Cheers(config, special=special)
    if release:
        ckpt.load_into(model, ckpt.load_state_dict(release), strict=True)
    if recipe.init.llm:
        load_llm(model, recipe.init.llm)
    if recipe.init.vision:
        load_vision(model, part_dir(recipe.init.vision))
    if recipe.init.vae:
        load_vae(model, part_dir(recipe.init.vae))
    model = reinitialize(model, recipe.init.reinitialize, recipe.train.seed)
    return scale_und_projector(model, recipe.init.und_projector_scale).to(dtype).train()


@torch.no_grad()
def reinitialize(model: Cheers, parts: list[str], seed: int) -> Cheers:
    """Draw ``parts`` (parameter groups or :attr:`Cheers.PART_ALIASES`) afresh, as a new model of the same
    configuration would have them (seeded by ``seed``); everything else stays as loaded. Tied weights follow
    their owner (re-initialising ``llm`` redraws the embeddings and so the tied head). Builds one fresh model
    of the same configuration on the CPU for this, so at start-up the model's memory is needed twice."""
    if not parts:
        return model
    known = {**Cheers.PARAMETER_GROUPS, **Cheers.PART_ALIASES}
    unknown = sorted(set(parts) - set(known))
    if unknown:
        raise RecipeError(f"init.reinitialize: unknown part(s) {unknown}; known: {sorted(known)}")
    prefixes = tuple(p for part in parts for p in known[part])
    torch.manual_seed(seed)
    fresh = Cheers(model.config, special=model.special).state_dict()
    own = model.state_dict()
    chosen = [k for k in own if any(k == p or k.startswith(p + ".") for p in prefixes)]
    for k in chosen:
        own[k].copy_(fresh[k].to(own[k].dtype))
    model.tie_weights()
    logger.info("re-initialised %s (%d tensors)", ", ".join(parts), len(chosen))
    return model


@torch.no_grad()
def scale_und_projector(model: Cheers, factor: float) -> Cheers:
    """Multiply the und_projector's output layer (weight and bias) by ``factor``: the image tokens the LLM
    reads scale with it. Used at the start of a run only (``init.und_projector_scale``)."""
    if factor != 1.0:
        out = model.model.und_projector.mlp[-1]
        out.weight.mul_(factor)
        out.bias.mul_(factor)
        logger.info("und_projector output layer scaled by %g at init", factor)
    return model


# ------------------------------------------------------------------------------------------------------------
# the parts


def _read_config(directory: str | Path, what: str) -> dict:
    path = Path(directory) / ckpt.CONFIG_NAME
    if not path.is_file():
        raise ckpt.CheckpointError(f"{what}: no {ckpt.CONFIG_NAME} in {directory}")
    return json.loads(path.read_text())


def _check_fields(theirs: dict, ours: dict, what: str) -> None:
    bad = [
        f"{k}: checkpoint {theirs[k]!r} vs model {v!r}"
        for k, v in ours.items()
        if k in theirs and theirs[k] != v
    ]
    if bad:
        raise ckpt.CheckpointError(f"{what} config disagrees with the recipe's model: {'; '.join(bad)}")


def _assign(
    model: Cheers,
    mapped: dict[str, torch.Tensor],
    prefixes: tuple[str, ...],
    what: str,
    optional: tuple[str, ...] = (),
) -> None:
    """Strictly load ``mapped`` (already our names) into the parameters under ``prefixes``."""
    expected = {k: v for k, v in model.state_dict().items() if k.startswith(prefixes)}
    if model.config.text.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    missing = sorted(k for k in expected.keys() - mapped.keys() if not k.startswith(optional))
    unexpected = sorted(mapped.keys() - expected.keys())
    shapes = [
        f"{k}: {tuple(mapped[k].shape)} vs {tuple(expected[k].shape)}"
        for k in sorted(mapped.keys() & expected.keys())
        if mapped[k].shape != expected[k].shape
    ]
    if missing or unexpected or shapes:
        raise ckpt.CheckpointError(
            f"{what} does not match the model: missing {ckpt._cap(missing)}; unexpected "
            f"{ckpt._cap(unexpected)}; shape mismatches {ckpt._cap(shapes)}"
        )
    skipped = sorted(k for k in expected.keys() - mapped.keys())
    if skipped:
        logger.warning(
            "%s: %d tensor(s) absent from the checkpoint keep their initialisation: %s",
            what,
            len(skipped),
            ckpt._cap(skipped),
        )
    model.load_state_dict(mapped, strict=False)
    model.tie_weights()
    logger.info("%s: loaded %d tensors", what, len(mapped))


def part_dir(name: str) -> str:
    """A part's starting point: a directory, or ``default`` for the bundled model."""
    if name == "default":
        from cheers.assets import default_model_dir

        return str(default_model_dir())
    return name


def _release_part(directory: str | Path, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor] | None:
    """The tensors under ``prefixes`` when ``directory`` holds a whole model in the release layout, else
    None."""
    config = Path(directory) / ckpt.CONFIG_NAME
    if not config.is_file() or "vision_representation_config" not in json.loads(config.read_text()):
        return None
    state = ckpt.load_state_dict(directory)
    return {k: v for k, v in state.items() if k.startswith(prefixes)}


def load_llm(model: Cheers, directory: str | Path) -> None:
    """A Qwen2 / Qwen2.5 checkpoint (``Qwen2Model``: ``layers.*``; ``Qwen2ForCausalLM``:
    ``model.layers.*``)."""
    what = f"LLM {directory}"
    cfg, text = _read_config(directory, what), model.config.text
    _check_fields(
        cfg,
        {
            "hidden_size": text.hidden_size,
            "intermediate_size": text.intermediate_size,
            "num_hidden_layers": text.num_hidden_layers,
            "num_attention_heads": text.num_attention_heads,
            "num_key_value_heads": text.num_key_value_heads,
            "vocab_size": text.vocab_size,
            "tie_word_embeddings": text.tie_word_embeddings,
        },
        what,
    )
    mapped: dict[str, torch.Tensor] = {}
    for name, tensor in ckpt.load_state_dict(directory).items():
        if name == "lm_head.weight":
            if not text.tie_word_embeddings:
                mapped[name] = tensor
            continue
        mapped[LLM + name.removeprefix("model.")] = tensor
    prefixes = (LLM,) if text.tie_word_embeddings else (LLM, "lm_head.")
    _assign(model, mapped, prefixes, what)


def load_vision(model: Cheers, directory: str | Path) -> None:
    """A SigLIP vision tower (``SiglipVisionModel``, or ``SiglipModel`` whose text half is ignored).

    The pooling head (``head.*``), which Cheers never runs, may be absent.
    """
    what = f"vision tower {directory}"
    part = _release_part(directory, (VISION,))
    if part is not None:
        _assign(model, part, (VISION,), what, optional=(VISION + "head.",))
        return
    cfg = _read_config(directory, what)
    cfg = cfg.get("vision_config", cfg)
    vis = model.config.vision
    _check_fields(
        cfg,
        {
            "hidden_size": vis.hidden_size,
            "intermediate_size": vis.intermediate_size,
            "num_hidden_layers": vis.num_hidden_layers,
            "num_attention_heads": vis.num_attention_heads,
            "patch_size": vis.patch_size,
            "image_size": vis.image_size,
        },
        what,
    )
    mapped = {}
    for name, tensor in ckpt.load_state_dict(directory).items():
        if name.startswith("text_model.") or name in ("logit_scale", "logit_bias"):
            continue
        mapped[VISION + name.removeprefix("vision_model.")] = tensor
    _assign(model, mapped, (VISION,), what, optional=(VISION + "head.",))


def load_vae(model: Cheers, directory: str | Path) -> None:
    """A VAE: our stage-0 output (``vae_model.*`` + ``vae_decoder_projector.*``), release names with
    ``model.``, or a bare BFL VAE (``encoder.*``, ``decoder.*``, ``bn.*``). Without a pixel decoder of its
    own, the VAE's decoder and latent statistics are copied into ``vae_decoder_projector``."""
    what = f"VAE {directory}"
    part = _release_part(directory, (VAE, PIXEL_DECODER))
    if part is not None:
        _assign(model, part, (VAE, PIXEL_DECODER), what)
        return
    mapped = {}
    for name, tensor in ckpt.load_state_dict(directory).items():
        name = name.removeprefix("model.")
        if name.startswith(("encoder.", "decoder.", "bn.")):
            name = "vae_model." + name
        mapped["model." + name] = tensor
    if not any(k.startswith(PIXEL_DECODER) for k in mapped):
        for name in [k for k in mapped if k.startswith((VAE + "decoder.", VAE + "bn."))]:
            mapped[PIXEL_DECODER + name[len(VAE) :]] = mapped[name].clone()
        logger.info(
            "%s has no pixel decoder: vae_decoder_projector starts as a copy of the VAE decoder", what
        )
    _assign(model, mapped, (VAE, PIXEL_DECODER), what)
