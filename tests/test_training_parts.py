"""Starting points: separate pretrained parts (Qwen2, SigLIP, a VAE) mapped strictly onto our names, and
stage 0."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2Model,
    SiglipConfig,
    SiglipModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from cheers import checkpoint as ckpt
from cheers.config import preset
from cheers.models.vae import VAEModel
from cheers.training.config import load_recipe, recipe_from_dict
from cheers.training.monitor import read_metrics
from cheers.training.parts import build_model
from cheers.training.vae_stage0 import train_vae
from test_training_fixtures import SIZE, one_thread, tiny_processor  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = preset("tiny").replace(**{"vision.image_size": SIZE})
TEXT = dict(
    vocab_size=512,
    hidden_size=32,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    tie_word_embeddings=True,
)
VISION = dict(
    hidden_size=48,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=6,
    image_size=SIZE,
    patch_size=16,
)


def _recipe(**init):
    return recipe_from_dict(
        {"model": {"preset": "tiny", "overrides": {"vision.image_size": SIZE}}, "init": init}
    )


def _save_parts(root, causal=True, full_siglip=True):
    torch.manual_seed(1)
    llm = (Qwen2ForCausalLM if causal else Qwen2Model)(Qwen2Config(**TEXT))
    llm.save_pretrained(root / "llm")
    if full_siglip:
        vision = SiglipModel(
            SiglipConfig(
                vision_config=VISION,
                text_config=dict(
                    hidden_size=32,
                    intermediate_size=64,
                    num_hidden_layers=1,
                    num_attention_heads=4,
                    vocab_size=64,
                ),
            )
        )
    else:
        vision = SiglipVisionModel(SiglipVisionConfig(**VISION))
    vision.save_pretrained(root / "vision")
    vae = VAEModel(CONFIG.vae_encoder, CONFIG.vae_decoder)
    with torch.no_grad():
        vae.bn.running_mean.normal_()
        vae.bn.running_var.uniform_(0.5, 2.0)
    ckpt.save_state_dict(vae.state_dict(), root / "vae")  # bare BFL names: encoder.*, decoder.*, bn.*
    return llm, vision, vae


@pytest.mark.parametrize("causal,full_siglip", [(True, True), (False, False)])
def test_separate_parts_map_onto_our_names(tmp_path, causal, full_siglip):
    llm, vision, vae = _save_parts(tmp_path, causal, full_siglip)
    model = build_model(
        _recipe(llm=str(tmp_path / "llm"), vision=str(tmp_path / "vision"), vae=str(tmp_path / "vae")),
        tiny_processor().special,
    )
    ours = model.state_dict()
    lm = llm.model if causal else llm
    for name, value in lm.state_dict().items():
        assert torch.equal(ours[f"model.language_model.{name}"], value), name
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight
    tower = vision.vision_model if full_siglip else vision
    for name, value in tower.state_dict().items():
        assert torch.equal(ours[f"model.vision_representation.{name}"], value), name
    for name, value in vae.state_dict().items():
        assert torch.equal(ours[f"model.vae_model.{name}"], value), name
        if name.startswith(("decoder.", "bn.")):  # no pixel decoder of its own: seeded from the VAE decoder
            assert torch.equal(ours[f"model.vae_decoder_projector.{name}"], value), name


def test_parts_are_checked_strictly(tmp_path):
    _save_parts(tmp_path)
    Qwen2ForCausalLM(Qwen2Config(**{**TEXT, "num_hidden_layers": 1})).save_pretrained(tmp_path / "short")
    with pytest.raises(ckpt.CheckpointError, match="num_hidden_layers"):
        build_model(_recipe(llm=str(tmp_path / "short")), tiny_processor().special)
    weights = tmp_path / "vision" / "model.safetensors"
    tensors = load_file(weights)
    tensors.pop("vision_model.post_layernorm.weight")
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(ckpt.CheckpointError, match="post_layernorm.weight"):
        build_model(_recipe(vision=str(tmp_path / "vision")), tiny_processor().special)
    vae = load_file(tmp_path / "vae" / "model.safetensors")
    vae["encoder.extra.weight"] = torch.zeros(1)
    save_file(vae, tmp_path / "vae" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ckpt.CheckpointError, match="encoder.extra.weight"):
        build_model(_recipe(vae=str(tmp_path / "vae")), tiny_processor().special)


def test_stage_zero_trains_the_vae_fits_statistics_and_seeds_the_pixel_decoder(tmp_path):
    recipe = load_recipe(
        "stage0_vae",
        {
            "model.preset": "tiny",
            "model.overrides": {"vision.image_size": SIZE},
            "data.sources.0.size": 32,
            "data.num_workers": 0,
            "train.steps": 3,
            "train.micro_batch": 2,
            "train.global_batch": 4,
            "vae.fit_samples": 6,
            "checkpoint.every": 0,
            "log.every": 1,
            "log.progress": False,
            "log.tensorboard": False,
            "engine.device": "cpu",
            "out": str(tmp_path / "run"),
        },
    )
    vae_dir = train_vae(recipe)
    tensors = ckpt.load_state_dict(vae_dir)
    assert {k.split(".")[0] for k in tensors} == {"vae_model", "vae_decoder_projector"}
    var = tensors["vae_model.bn.running_var"]
    assert not torch.allclose(var, torch.ones_like(var))  # fitted, not the defaults
    for name in [k for k in tensors if k.startswith(("vae_model.decoder.", "vae_model.bn."))]:
        assert torch.equal(tensors[name], tensors[name.replace("vae_model.", "vae_decoder_projector.")])
    logged = read_metrics(tmp_path / "run")
    assert [r["step"] for r in logged if "recon_loss" in r] == [1, 2, 3] and "psnr" in logged[-1]
    model = build_model(_recipe(vae=str(vae_dir)), tiny_processor().special)  # stage 0 feeds init.vae
    assert torch.equal(model.model.vae_model.bn.running_var, var)


def test_vae_and_vision_tower_from_a_release_directory_leave_the_rest_fresh(tmp_path):
    """init.vae / init.vision naming a whole model in the release layout take only that part's tensors (how
    the bundled model's retraining keeps its VAE and vision tower: ``default``)."""
    from cheers.assets import default_model_dir
    from cheers.models.cheers import Cheers
    from cheers.models.pretrained import save_pretrained
    from cheers.training.parts import part_dir

    special = tiny_processor().special
    torch.manual_seed(5)
    donor = Cheers(CONFIG, special=special)
    save_pretrained(donor, tmp_path / "release")
    fresh = build_model(_recipe(), special).state_dict()
    model = build_model(_recipe(vae=str(tmp_path / "release"), vision=str(tmp_path / "release")), special)
    ours, theirs = model.state_dict(), donor.state_dict()
    taken = ("model.vae_model.", "model.vae_decoder_projector.", "model.vision_representation.")
    for name, value in ours.items():
        if name.startswith(taken):
            assert torch.equal(value, theirs[name]), name
        else:  # the LLM, projectors and flow head start as a model built without init
            assert torch.equal(value, fresh[name]), name
    assert not torch.equal(
        ours["model.und_projector.mlp.0.weight"], theirs["model.und_projector.mlp.0.weight"]
    )
    assert part_dir("default") == str(default_model_dir()) and part_dir("some/dir") == "some/dir"
