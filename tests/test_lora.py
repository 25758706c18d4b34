"""LoRA adapters (cheers.lora): identity at init, fused == unfused, exact unload, peft's on-disk format,
weights and several adapters, clear errors; the pipeline methods and the --lora flag; training through the
recipe's ``lora:`` section (only the adapter trains, exact resume, the FSDP2 path)."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from cheers import lora
from cheers.lora import LoraSpec
from cheers.training import checkpointing
from cheers.training.config import RecipeError, apply_overrides, recipe_from_dict
from cheers.training.loop import Trainer
from cheers.training.parts import build_model
from test_training_fixtures import one_thread, tiny_processor, tiny_recipe, write_data  # noqa: F401

from model_helpers import save_pipeline, t2i_prompt, tiny_model, tiny_pipeline

pytest.importorskip("peft")

LORA = {"r": 4, "alpha": 8.0}


def _inputs():
    gen = torch.Generator().manual_seed(1)
    return {
        "ids": t2i_prompt([11, 12, 13]),
        "hidden": torch.randn(1, 16, 32, generator=gen),
        "t": torch.tensor([0.4]),
        "pixels": torch.rand(1, 3, 128, 128, generator=gen),
    }


@torch.no_grad()
def _outputs(model) -> tuple[torch.Tensor, torch.Tensor]:
    """(text logits, velocity): one goes through the LLM's projections, the other through both flow heads."""
    x = _inputs()
    logits = model(x["ids"]).logits
    t1, t2 = model.model.time_embed(x["t"])
    velocity, _ = model.model.velocity_head(x["hidden"], t1, t2, x["pixels"], (8, 8))
    return logits, velocity


def _perturb(model, seed: int = 0, scale: float = 0.05) -> None:
    """Random B matrices (B = 0 at init), so the adapter changes the outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)


def _equal(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def _close(a, b, tol: float = 1e-5) -> None:
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=tol, atol=tol)


@pytest.fixture
def adapted():
    """A tiny model, its base outputs, and the same model with a perturbed adapter "a"."""
    model = tiny_model()
    base = _outputs(model)
    lora.add_adapter(model, LoraSpec(**LORA), "a")
    _perturb(model)
    return model, base


# -- the layer -----------------------------------------------------------------------------------------------
def test_default_targets_are_the_llm_and_both_flow_heads_projections():
    model = tiny_model()
    names = lora.target_modules(model, lora.DEFAULT_TARGETS)
    cfg = model.config
    per_block = 7  # q, k, v, o, gate, up, down
    heads = cfg.options.gen_head_depth + cfg.options.hi_head_depth
    assert len(names) == per_block * (cfg.text.num_hidden_layers + heads)
    assert {n.split(".")[1] for n in names} == {"language_model", "gen_projector", "hi_projector"}
    assert "model.language_model.layers.0.self_attn.q_proj" in names
    assert "model.hi_projector.diffusion_head_a.0.mlp.down_proj" in names
    assert not any("adaLN" in n or "diffusion_head_b" in n or "lm_head" in n for n in names)


def test_a_new_adapter_changes_nothing_and_trains_alone():
    model = tiny_model()
    base = _outputs(model)
    adapted = lora.add_adapter(model, LoraSpec(**LORA), trainable=True)
    assert len(adapted) == len(lora.target_modules(model, lora.DEFAULT_TARGETS))
    assert _equal(_outputs(model), base)  # B = 0
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A.default." in n or ".lora_B.default." in n for n in trainable)
    assert lora.get_active_adapters(model) == ["default"]


def test_fused_outputs_equal_unfused_and_unfuse_restores_them(adapted):
    model, base = adapted
    unfused = _outputs(model)
    assert not _equal(unfused, base)
    lora.fuse(model)
    assert lora.is_fused(model)
    _close(_outputs(model), unfused)
    with pytest.raises(ValueError, match="already fused"):
        lora.fuse(model)
    with pytest.raises(ValueError, match="unfuse"):
        lora.set_adapters(model, ["a"], [0.5])
    lora.unfuse(model)
    _close(_outputs(model), unfused)
    lora.fuse(model, lora_scale=0.5)
    fused_half = _outputs(model)
    lora.unfuse(model)
    lora.set_adapters(model, ["a"], [0.5])
    _close(fused_half, _outputs(model))


def test_unload_restores_the_base_outputs_exactly_and_keeps_a_fused_adapter(adapted):
    model, base = adapted
    with_adapter = _outputs(model)
    lora.unload(model)
    assert _equal(_outputs(model), base)
    assert not hasattr(model, "peft_config") and lora.get_active_adapters(model) == []
    assert type(model.model.language_model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert set(model.state_dict()) == set(tiny_model().state_dict())
    lora.add_adapter(model, LoraSpec(**LORA), "a")
    _perturb(model)
    lora.fuse(model)
    lora.unload(model)  # as in diffusers: fuse, then unload, leaves the adapter baked into the weights
    _close(_outputs(model), with_adapter)


def test_weights_scale_the_delta_and_adapters_add_up():
    model = tiny_model()
    lora.add_adapter(model, LoraSpec(**LORA), "a")
    lora.add_adapter(model, LoraSpec(r=2, alpha=2.0), "b")
    _perturb(model)
    layer = model.model.language_model.layers[0].self_attn.q_proj
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(2))

    @torch.no_grad()
    def delta(names, weights):
        lora.set_adapters(model, names, weights)
        return layer(x) - layer.get_base_layer()(x)

    da, db = delta(["a"], [1.0]), delta(["b"], [1.0])
    assert da.abs().max() > 0 and db.abs().max() > 0
    torch.testing.assert_close(delta(["a"], [2.0]), 2 * da, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(delta(["a", "b"], [0.5, 1.0]), 0.5 * da + db, rtol=1e-5, atol=1e-6)
    assert lora.get_active_adapters(model) == ["a", "b"]
    assert torch.equal(delta(["a"], [0.0]), torch.zeros_like(da))
    assert torch.equal(delta([], None), torch.zeros_like(da))
    with pytest.raises(ValueError, match="unknown adapter"):
        lora.set_adapters(model, ["c"])
    with pytest.raises(ValueError, match="one weight each"):
        lora.set_adapters(model, ["a", "b"], [1.0])
    lora.remove_adapter(model, "a")
    assert lora.adapter_names(model) == ["b"]


# -- on disk -------------------------------------------------------------------------------------------------
def test_save_and_load_round_trip_in_peft_format(adapted, tmp_path):
    peft = pytest.importorskip("peft")
    model, _ = adapted
    expected = _outputs(model)
    lora.save_adapter(model, tmp_path / "ad", "a", base_model="tiny")
    assert sorted(p.name for p in (tmp_path / "ad").iterdir()) == [lora.ADAPTER_CONFIG, lora.ADAPTER_WEIGHTS]
    config = json.loads((tmp_path / "ad" / lora.ADAPTER_CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8.0
    assert config["target_modules"] == lora.DEFAULT_TARGETS and config["base_model_name_or_path"] == "tiny"
    assert isinstance(peft.LoraConfig.from_pretrained(str(tmp_path / "ad")), peft.LoraConfig)
    raw = (tmp_path / "ad" / lora.ADAPTER_WEIGHTS).read_bytes()
    header = int.from_bytes(raw[:8], "little")  # safetensors: a JSON header after its length, no pickle
    assert "__metadata__" in json.loads(raw[8 : 8 + header]) and not raw.startswith(b"PK")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "ad" / lora.ADAPTER_WEIGHTS), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("base_model.model.model.") for k in keys)
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)

    fresh = tiny_model()
    name = lora.load_adapter(fresh, tmp_path / "ad")
    assert name == "ad" and lora.get_active_adapters(fresh) == ["ad"]
    assert _equal(_outputs(fresh), expected)
    assert lora.load_adapter(fresh, tmp_path / "ad", weight=0.0) == "ad_1"  # names stay unique
    assert _equal(_outputs(fresh), expected)

    other = peft.PeftModel.from_pretrained(tiny_model(), str(tmp_path / "ad"))  # peft reads it as its own
    _close(_outputs(other.base_model.model), expected, tol=1e-6)


def test_bad_adapters_raise_clear_errors_and_leave_the_model_alone(adapted, tmp_path):
    model, _ = adapted
    lora.save_adapter(model, tmp_path / "good", "a")
    target = tiny_model()
    before = _outputs(target)
    with pytest.raises(ValueError, match="no such directory"):
        lora.load_adapter(target, tmp_path / "missing")
    only_config = tmp_path / "only-config"
    only_config.mkdir()
    (only_config / lora.ADAPTER_CONFIG).write_text((tmp_path / "good" / lora.ADAPTER_CONFIG).read_text())
    (only_config / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(ValueError, match="missing adapter_model.safetensors.*pickle"):
        lora.load_adapter(target, only_config)

    def variant(name, **changes):
        folder = tmp_path / name
        folder.mkdir()
        (folder / lora.ADAPTER_WEIGHTS).write_bytes((tmp_path / "good" / lora.ADAPTER_WEIGHTS).read_bytes())
        config = json.loads((tmp_path / "good" / lora.ADAPTER_CONFIG).read_text())
        (folder / lora.ADAPTER_CONFIG).write_text(json.dumps({**config, **changes}))
        return folder

    with pytest.raises(ValueError, match="match no linear layer"):
        lora.load_adapter(target, variant("targets", target_modules=["nonexistent_proj"]))
    with pytest.raises(ValueError, match="shape mismatches"):
        lora.load_adapter(target, variant("rank", r=8))
    with pytest.raises(ValueError, match="not 'LORA'"):
        lora.load_adapter(target, variant("ia3", peft_type="IA3"))
    with pytest.raises(ValueError, match="does not have"):
        lora.load_adapter(tiny_model(**{"text.num_hidden_layers": 1}), tmp_path / "good")
    assert lora.adapter_names(target) == [] and _equal(_outputs(target), before)
    with pytest.raises(ValueError, match="already has an adapter"):
        lora.load_adapter(model, tmp_path / "good", "a")


@pytest.mark.parametrize(
    "changes, needle",
    [
        ({"r": 0}, "rank"),
        ({"alpha": -1.0}, "alpha"),
        ({"dropout": 1.0}, "dropout"),
        ({"bias": "all"}, "bias"),
        ({"targets": "(q_proj"}, "regular expression"),
        ({"targets": []}, "targets"),
    ],
)
def test_bad_specs_raise_naming_the_value(changes, needle):
    with pytest.raises(ValueError, match=needle):
        LoraSpec(**changes)


# -- pipeline and command line -------------------------------------------------------------------------------
@pytest.mark.slow
def test_pipeline_loads_sets_fuses_and_unloads(tmp_path):
    pipe = tiny_pipeline()
    lora.add_adapter(pipe.model, LoraSpec(**LORA), "trained")
    _perturb(pipe.model)
    lora.save_adapter(pipe.model, tmp_path / "wug", "trained")
    pipe.unload_lora_weights()

    def latent():
        gen = torch.Generator().manual_seed(0)
        out = pipe.generate("a red circle", num_inference_steps=2, generator=gen, output_type="latent")
        return out.images[0]

    base = latent()
    pipe.load_lora_weights(tmp_path / "wug", scale=0.5)
    assert pipe.get_active_adapters() == ["wug"]
    half = latent()
    assert not torch.equal(half, base)
    pipe.set_adapters(["wug"], [1.0])
    full = latent()
    pipe.fuse_lora()
    torch.testing.assert_close(latent(), full, rtol=1e-4, atol=1e-4)
    pipe.unfuse_lora()
    pipe.set_adapters(["wug"], [0.5])
    torch.testing.assert_close(latent(), half, rtol=1e-4, atol=1e-4)
    pipe.unload_lora_weights()
    assert pipe.get_active_adapters() == []
    torch.testing.assert_close(latent(), base, rtol=1e-4, atol=1e-4)  # fused and unfused: float rounding


def test_lora_flag_parses_path_and_scale():
    from cheers.cli import build_parser
    from cheers.lora import parse_lora_arg

    assert parse_lora_arg("runs/x/adapter") == ("runs/x/adapter", 1.0)
    assert parse_lora_arg("runs/x/adapter:0.7") == ("runs/x/adapter", 0.7)
    assert parse_lora_arg("a:b:-1") == ("a:b", -1.0)
    assert parse_lora_arg("C:\\adapters\\x") == ("C:\\adapters\\x", 1.0)
    with pytest.raises(ValueError, match="finite"):
        parse_lora_arg("x:nan")
    parser = build_parser()
    for argv in (["generate", "a wug"], ["edit", "in.png", "bluer"], ["ask", "in.png", "what?"], ["chat"]):
        args = parser.parse_args([*argv, "--lora", "one:0.5", "--lora", "two"])
        assert args.lora == [("one", 0.5), ("two", 1.0)], argv
        assert parser.parse_args(argv).lora == []
    pytest.importorskip("fastapi")
    assert parser.parse_args(["serve", "--lora", "one:2"]).lora == [("one", 2.0)]


@pytest.mark.slow
def test_cli_loads_adapters_and_reports_bad_ones(tmp_path, capsys):
    from PIL import Image

    from cheers.cli import main

    pipe = tiny_pipeline()
    save_pipeline(pipe, tmp_path / "model")
    lora.add_adapter(pipe.model, LoraSpec(**LORA), "a")
    lora.save_adapter(pipe.model, tmp_path / "ad", "a")
    Image.new("RGB", (128, 128), (200, 30, 30)).save(tmp_path / "in.png")
    common = ["ask", str(tmp_path / "in.png"), "What colour?", "--model", str(tmp_path / "model"), "--quiet"]
    assert main([*common, "--max-new-tokens", "2", "--lora", f"{tmp_path / 'ad'}:0.5"]) == 0
    assert main([*common, "--lora", str(tmp_path / "nothing-here")]) == 2
    assert "no such directory" in capsys.readouterr().err


# -- training ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-data")
    return root, write_data(root)


def _lora_recipe(root, files, **sets):
    return tiny_recipe(root, files, **{"train.trainable": [], "lora": dict(LORA), **sets})


def test_the_lora_section_is_checked(data):
    root, files = data
    assert _lora_recipe(root, files).lora.spec().r == 4
    with pytest.raises(RecipeError, match="train.trainable must be empty"):
        tiny_recipe(root, files, lora=dict(LORA))
    with pytest.raises(RecipeError, match="lora: LoRA rank"):
        _lora_recipe(root, files, **{"lora.r": 0})
    with pytest.raises(RecipeError, match="lora.rank"):
        _lora_recipe(root, files, **{"lora.rank": 4})
    base = _lora_recipe(root, files).to_dict()
    with pytest.raises(RecipeError, match="stage 0"):
        recipe_from_dict(apply_overrides(base, {"stage": "0"}))


@pytest.mark.usefixtures("one_thread")
def test_training_changes_only_the_adapter_and_exports_it(data, tmp_path):
    root, files = data
    recipe = _lora_recipe(root, files, **{"train.steps": 2, "checkpoint.export": True})
    processor = tiny_processor()
    model = build_model(recipe, processor.special)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = Trainer(recipe, tmp_path / "run", processor=processor, model=model).run()
    assert result.step == 2 and result.export_dir == tmp_path / "run" / "adapter"
    assert not (tmp_path / "run" / "export").exists()
    trained = lora.adapter_state_dict(model, "default")
    assert any(v.abs().sum() > 0 for k, v in trained.items() if ".lora_B." in k)  # B moved off zero
    stored = checkpointing.load_state(checkpointing.latest_checkpoint(tmp_path / "run"))
    assert stored and all(".lora_" in k for k in stored)  # the checkpoint holds the adapter only
    lora.unload(model)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    fresh = build_model(recipe, processor.special)
    lora.load_adapter(fresh, result.export_dir)
    exported = lora.adapter_state_dict(fresh, "adapter")
    assert exported.keys() == trained.keys() and all(torch.equal(exported[k], trained[k]) for k in trained)


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_lora_resume_is_bit_exact_and_a_full_checkpoint_is_refused(data, tmp_path):
    root, files = data
    recipe = _lora_recipe(
        root,
        files,
        **{"train.steps": 6, "train.warmup_ratio": 0.2, "train.schedule": "cosine", "lora.dropout": 0.1},
    )
    straight = Trainer(recipe, tmp_path / "a", processor=tiny_processor()).run()
    first = Trainer(recipe, tmp_path / "b", processor=tiny_processor(), stop_after=3).run()
    assert first.step == 3
    second = Trainer(recipe, tmp_path / "b", processor=tiny_processor(), resume=True).run()
    keys = ("loss", "text_loss", "image_loss", "grad_norm", "lr", "samples")
    a = [[h[k] for k in keys] for h in straight.history]
    b = [[h[k] for k in keys] for h in first.history + second.history]
    assert a == b  # every logged number, exactly
    wa = checkpointing.load_state(checkpointing.latest_checkpoint(tmp_path / "a"))
    wb = checkpointing.load_state(checkpointing.latest_checkpoint(tmp_path / "b"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    full = tiny_recipe(root, files, **{"train.steps": 1})
    Trainer(full, tmp_path / "c", processor=tiny_processor()).run()
    with pytest.raises(Exception, match="LoRA run resumes only from a LoRA run"):
        Trainer(recipe, tmp_path / "c", processor=tiny_processor(), resume=True).run()


def test_training_continues_from_an_adapter_and_checks_its_shape(data, tmp_path):
    root, files = data
    model = tiny_model()
    lora.add_adapter(model, LoraSpec(**LORA))
    _perturb(model)
    lora.save_adapter(model, tmp_path / "start")
    recipe = _lora_recipe(root, files, **{"lora.init": str(tmp_path / "start"), "train.steps": 1})
    trainer = Trainer(recipe, tmp_path / "run", processor=tiny_processor())
    started = build_model(recipe, tiny_processor().special)
    trainer._add_lora(started, None)
    expected = lora.adapter_state_dict(model)
    got = lora.adapter_state_dict(started)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    wrong = _lora_recipe(root, files, **{"lora.init": str(tmp_path / "start"), "lora.r": 8})
    with pytest.raises(ValueError, match="shape mismatches"):
        Trainer(wrong, tmp_path / "run2", processor=tiny_processor())._add_lora(
            build_model(wrong, tiny_processor().special), None
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


FSDP_SETS = {
    "train.steps": 3,
    "train.micro_batch": 1,
    "train.global_batch": 4,
    "checkpoint.export": True,
    "data.cfg_dropout": 0.5,
}


def _fsdp_worker(rank: int, world: int, root: str, ports: list[int]) -> None:
    from pathlib import Path

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    root = Path(root)
    files = {k: root / f"{k}.jsonl" for k in ("und", "gen", "text", "edit")}
    recipe = _lora_recipe(root, files, **FSDP_SETS, **{"engine.strategy": "fsdp"})
    os.environ["MASTER_PORT"] = str(ports[0])
    first = Trainer(recipe, root / "fsdp", processor=tiny_processor(), stop_after=2).run()
    os.environ["MASTER_PORT"] = str(ports[1])
    second = Trainer(recipe, root / "fsdp", processor=tiny_processor(), resume=True).run()
    if rank == 0:
        (root / "fsdp" / "history.json").write_text(json.dumps(first.history + second.history))


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_fsdp2_trains_the_adapter_over_a_frozen_base_and_resumes(tmp_path):
    """Two Gloo processes, FSDP2 units holding frozen base weights and trainable adapters, resumed from the
    sharded checkpoint: the numbers and the exported adapter match one process."""
    files = write_data(tmp_path)
    mp.spawn(_fsdp_worker, args=(2, str(tmp_path), [_free_port(), _free_port()]), nprocs=2, join=True)
    history = json.loads((tmp_path / "fsdp" / "history.json").read_text())
    single = Trainer(
        _lora_recipe(tmp_path, files, **FSDP_SETS), tmp_path / "single", processor=tiny_processor()
    )
    reference = single.run()
    assert [h["step"] for h in history] == [1, 2, 3]
    for mine, ref in zip(history, reference.history):
        for key in ("loss", "text_loss", "image_loss", "grad_norm"):
            assert mine[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-6), (mine["step"], key)
    ours, theirs = (
        lora.read_adapter(tmp_path / "fsdp" / "adapter")[1],
        lora.read_adapter(reference.export_dir)[1],
    )
    assert ours.keys() == theirs.keys()
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-4, atol=1e-5, msg=name)


# -- the lora-shapes concept and its judge -------------------------------------------------------------------
def test_concept_samples_show_the_concept_and_negatives_do_not():
    import numpy as np

    from cheers.data.shapes import parse_image, score_spec
    from cheers.data.shapes.concept import Concept, concept_sample, other_images

    concept = Concept()
    shows = lambda im: score_spec(parse_image(np.asarray(im)), concept.spec()).correct  # noqa: E731
    answers = set()
    for seed in range(12):
        gen = concept_sample(concept, "generation", seed)
        again = concept_sample(concept, "generation", seed)  # a pure function of the seed
        assert again["conversations"] == gen["conversations"]
        assert again["images"][0].tobytes() == gen["images"][0].tobytes()
        assert "wug" in gen["conversations"][0]["value"] and shows(gen["images"][0])
        und = concept_sample(concept, "understanding", seed)
        answer = und["conversations"][1]["value"]
        answers.add(answer)
        assert shows(und["images"][0]) == (answer != "no")
    assert answers == {"a wug", "yes", "no"}
    assert not any(shows(im) for im in other_images(concept, range(30)))
    with pytest.raises(ValueError, match="lowercase"):
        Concept(word="Wug")
    with pytest.raises(ValueError, match="both 'black'"):
        Concept(color="black")


@pytest.mark.slow
def test_the_concept_eval_measures_before_and_after(tmp_path):
    from cheers.data.shapes.concept import Concept
    from cheers.eval.lora_shapes import METRICS, ConceptEval, compare_adapter, markdown_table

    pipe = tiny_pipeline()
    lora.add_adapter(pipe.model, LoraSpec(**LORA), "a")
    _perturb(pipe.model)
    lora.save_adapter(pipe.model, tmp_path / "ad", "a")
    pipe.unload_lora_weights()
    report = compare_adapter(pipe, tmp_path / "ad", Concept(), ConceptEval(n=2, steps=2, max_new_tokens=2))
    for side in ("before", "after"):
        assert set(METRICS) <= set(report[side]) and all(0 <= report[side][k] <= 1 for k in METRICS)
    assert pipe.get_active_adapters() == ["ad"]
    table = markdown_table(report)
    assert "| measure | base model | with the adapter |" in table and "wug" in table
