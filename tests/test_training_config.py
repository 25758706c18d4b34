"""Recipes: strict loading, overrides, the packaged stage recipes against the paper, trainable groups."""

from __future__ import annotations

import pytest

from cheers.training.config import (
    RecipeError,
    load_recipe,
    packaged_recipes,
    parse_override,
    recipe_from_dict,
)
from cheers.training.optim import lr_factor
from cheers.training.stages import ALIGNMENT, PAPER_STAGES, deviations

from model_helpers import tiny_model

STAGE_FILES = {"I": "stage1", "II": "stage2", "III": "stage3", "IV": "stage4"}


def test_packaged_recipes_load_and_follow_the_paper():
    assert {"stage0_vae", "stage1", "stage2", "stage3", "stage4", "tiny-shapes"} <= set(packaged_recipes())
    for stage, name in STAGE_FILES.items():
        recipe = load_recipe(name)
        assert recipe.stage == stage
        assert deviations(recipe) == [], (name, deviations(recipe))
        preset = PAPER_STAGES[stage]
        assert (recipe.train.lr, recipe.train.schedule) == (preset.lr, preset.schedule)
        assert recipe.train.warmup_ratio == 0.02 and recipe.train.grad_clip == 1.0
        assert recipe.train.flow_loss_weight == 1.0 and recipe.data.cfg_dropout == 0.2
    assert [PAPER_STAGES[s].lr for s in ("I", "II", "III", "IV")] == [1e-4, 1e-4, 4e-5, 2e-5]
    assert load_recipe("stage0_vae").stage == "0"
    assert load_recipe("tiny-shapes").data.processor == "shapes"


def test_unknown_keys_raise_with_their_path(tmp_path):
    with pytest.raises(RecipeError, match=r"train\.lrr"):
        load_recipe("stage1", ["train.lrr=1"])
    with pytest.raises(RecipeError, match=r"data\.sources\.0\.colour"):
        load_recipe("stage2", ["data.sources.0.colour=red"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("stage: I\nengine:\n  stratgy: fsdp\n")
    with pytest.raises(RecipeError, match=r"engine\.stratgy"):
        load_recipe(bad)
    with pytest.raises(RecipeError, match="no recipe file"):
        load_recipe("no-such-recipe")


def test_values_are_checked_and_coerced():
    recipe = load_recipe(
        "stage1",
        [
            "train.lr=2e-5",
            "train.steps=7",
            "data.sources.1.ratio=3",
            "train.trainable=[llm,flow_head]",
            "engine.gradient_checkpointing=true",
        ],
    )
    assert recipe.train.lr == 2e-5 and isinstance(recipe.train.lr, float)  # YAML 1.1 reads 2e-5 as a string
    assert recipe.train.steps == 7 and recipe.data.sources[1].ratio == 3
    assert recipe.train.trainable == ["llm", "flow_head"] and recipe.engine.gradient_checkpointing is True
    for override, message in [
        ("train.steps=many", r"train\.steps"),
        ("train.steps=2.5", "whole number"),
        ("engine.strategy=zero3", "engine.strategy"),
        ("train.schedule=linear", "schedule"),
        ("train.global_batch=3", "multiple"),
        ("data.sources.5.ratio=1", "out of range"),
        ("engine.gradient_checkpointing=maybe", "true or false"),
        ("stage=V", "stage"),
    ]:
        with pytest.raises(RecipeError, match=message):
            load_recipe("stage1", [override])
    with pytest.raises(RecipeError, match="key.path=value"):
        parse_override("train.lr")
    with pytest.raises(RecipeError, match="from_release"):
        recipe_from_dict({"init": {"from_release": "a", "llm": "b"}})
    with pytest.raises(RecipeError, match="channels_last works with the single and ddp"):
        load_recipe("stage1", ["engine.channels_last=true", "engine.strategy=fsdp"])


def test_stage_one_trains_exactly_the_alignment_groups():
    recipe = load_recipe("stage1")
    assert sorted(recipe.train.trainable) == sorted(ALIGNMENT) == ["flow_head", "hfi_gate", "und_projector"]
    model = tiny_model()
    counts = model.set_trainable(recipe.train.trainable)
    assert {g for g, n in counts.items() if n} == set(ALIGNMENT)
    prefixes = tuple(p for g in ALIGNMENT for p in model.PARAMETER_GROUPS[g])
    for name, p in model.named_parameters():
        assert p.requires_grad == name.startswith(prefixes), name
    for stage in ("II", "III", "IV"):
        assert "vae" not in PAPER_STAGES[stage].trainable
        assert set(PAPER_STAGES[stage].trainable) == set(model.PARAMETER_GROUPS) - {"vae"}
    with pytest.raises(ValueError, match="unknown parameter group"):
        model.set_trainable(["llm", "flux"])


def test_deviations_name_what_differs():
    recipe = load_recipe("stage2", ["train.lr=3e-4", "data.sources.2.ratio=5"])
    found = " ".join(deviations(recipe))
    assert "train.lr" in found and "mixture" in found and "time_sampling" not in found
    noisy = load_recipe("stage2", ["data.time_sampling.kind=logit_normal", "data.time_sampling.loc=-1"])
    assert noisy.data.time_sampling == {"kind": "logit_normal", "loc": -1}
    assert "data.time_sampling" in " ".join(deviations(noisy))


def test_time_sampling_is_checked():
    assert load_recipe("stage2").data.time_sampling == {"kind": "uniform"}  # the release
    for override, message in [
        ("data.time_sampling.kind=beta", "unknown time sampling"),
        ("data.time_sampling.scale=0", "scale > 0"),
        ("data.time_sampling.mode=1", "kind, loc, scale"),
    ]:
        sets = [override] if "kind" in override else ["data.time_sampling.kind=logit_normal", override]
        with pytest.raises(RecipeError, match=message):
            load_recipe("stage2", sets)


def test_lr_schedule_warmup_then_constant_or_cosine():
    total = 100
    warm = [lr_factor(s, total, 0.02, "constant") for s in range(4)]
    assert warm[:2] == [1 / 3, 2 / 3] and warm[2:] == [1.0, 1.0]
    cosine = [lr_factor(s, total, 0.02, "cosine") for s in range(total)]
    assert cosine[2] == pytest.approx(1.0) and cosine[-1] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(cosine[2:], cosine[3:]))
    assert lr_factor(99, total, 0.0, "cosine", min_ratio=0.1) == pytest.approx(0.1)


def test_lr_schedule_wsd_holds_then_falls_linearly_over_the_last_steps():
    total = 100
    wsd = [lr_factor(s, total, 0.02, "wsd", decay_ratio=0.2) for s in range(total)]
    assert wsd[:2] == [1 / 3, 2 / 3] and wsd[2:80] == [1.0] * 78  # warm-up, then the stable phase
    assert wsd[80] == pytest.approx(0.95) and wsd[-1] == pytest.approx(0.0, abs=1e-12)
    decay = wsd[79:]
    assert all(a - b == pytest.approx(0.05) for a, b in zip(decay, decay[1:]))  # linear, 20 steps
    assert lr_factor(99, total, 0.0, "wsd", min_ratio=0.1, decay_ratio=0.5) == pytest.approx(0.1)
    assert lr_factor(49, total, 0.0, "wsd", min_ratio=0.1, decay_ratio=0.5) == pytest.approx(1.0)
    assert lr_factor(50, total, 0.0, "wsd", min_ratio=0.1, decay_ratio=0.5) < 1.0


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.schedule=linear", "train.schedule: 'linear' is not one of"),
        ("train.decay_ratio=0", "decay_ratio"),
        ("train.decay_ratio=0.99", "decay_ratio"),
    ],
)
def test_bad_schedules_are_named(override, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe("tiny-shapes", ["train.schedule=wsd", override] if "decay" in override else [override])


def test_step_budget_fits_the_schedule_to_the_clock(monkeypatch):
    """train.minutes: the total is re-fitted from the measured rate, the cosine ends at the deadline."""
    import torch

    from cheers.training import optim
    from cheers.training.config import TrainSection
    from cheers.training.optim import StepBudget, build_scheduler

    clock = [1000.0]
    monkeypatch.setattr(optim.time, "monotonic", lambda: clock[0])
    train = TrainSection(lr=1.0, steps=100_000, schedule="cosine", minutes=1.0)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, train)
    budget = StepBudget(train.minutes, 0, train.steps, sched, skip=10, every=10)
    totals = []
    for done in range(1, 10_000):
        clock[0] += 0.1  # 10 steps/s: 60 s hold about 600 steps
        total = budget.update(done)
        totals.append(total)
        if done >= total:
            break
    assert totals[5] == 100_000  # nothing measured yet: the upper bound
    assert 590 <= done <= 610 and totals[-1] == done
    assert abs(totals[100] - 600) <= 2  # fitted early from the rate
    assert sched.lr_lambdas[0].total == done
    for _ in range(done):
        sched.step()
    assert opt.param_groups[0]["lr"] < 1e-4  # the cosine reached its end with the budget
    with pytest.raises(ValueError, match="minutes"):
        StepBudget(0, 0, 10, None)
    # several processes: every decision is the agreed one (rank 0's, broadcast), whatever this clock says
    agreed = StepBudget(1.0, 0, 100_000, sched, agree=lambda total: 1234)
    assert agreed.update(5) == 100_000 and agreed.update(10) == 1234 and sched.lr_lambdas[0].total == 1234


def test_lr_multipliers_scale_whole_groups_and_are_checked():
    import torch

    from cheers.training.optim import build_optimizer, build_scheduler, trainable_parameters

    recipe = load_recipe("stage2", ["train.lr_multipliers.und_projector=0.1", "train.weight_decay=0.01"])
    assert recipe.train.lr_multipliers == {"und_projector": 0.1}
    assert "train.lr_multipliers" in " ".join(deviations(recipe))
    model = tiny_model()
    model.set_trainable(recipe.train.trainable)
    named = trainable_parameters(model)
    opt = build_optimizer(named, recipe.train)
    assert opt.param_groups[0]["lr"] == recipe.train.lr  # the base lr first (the trainer logs group 0)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    decay_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert len(lr_of) == len(named)  # every trainable parameter once
    for name, p in named:
        want = recipe.train.lr * (0.1 if name.startswith("model.und_projector.") else 1.0)
        assert lr_of[id(p)] == pytest.approx(want), name
        assert decay_of[id(p)] == (0.01 if p.ndim >= 2 else 0.0), name
    sched = build_scheduler(opt, recipe.train)  # the schedule scales every group by the same factor
    opt.step(), sched.step()
    ratios = {round(g["lr"] / g["initial_lr"], 12) for g in opt.param_groups}
    assert len(ratios) == 1
    assert torch.isfinite(torch.tensor([g["lr"] for g in opt.param_groups])).all()
    for override, message in [
        ("train.lr_multipliers.projector=0.1", "unknown group 'projector'"),
        ("train.lr_multipliers.llm=0", "must be a number > 0"),
        ("train.lr_multipliers.llm=fast", "must be a number > 0"),
    ]:
        with pytest.raises(RecipeError, match=message):
            load_recipe("stage2", [override])


@pytest.mark.slow
def test_init_und_projector_scale_and_the_bundled_model_as_a_start(tmp_path):
    import torch

    from cheers.training.parts import build_model, build_processor, model_config

    recipe = load_recipe("tiny-shapes-follow")
    assert recipe.init.from_release == "default" and recipe.init.und_projector_scale == 0.05
    assert recipe.train.lr_multipliers == {"und_projector": 0.1}
    config = model_config(recipe)
    processor = build_processor(recipe, config)
    scaled = build_model(recipe, processor.special, config)
    plain = build_model(
        load_recipe("tiny-shapes-follow", ["init.und_projector_scale=1"]), processor.special, config
    )
    a, b = scaled.model.und_projector.mlp[-1], plain.model.und_projector.mlp[-1]
    assert torch.allclose(a.weight, 0.05 * b.weight) and torch.allclose(a.bias, 0.05 * b.bias)
    first = plain.model.und_projector.mlp[0]
    assert torch.equal(scaled.model.und_projector.mlp[0].weight, first.weight)  # only the output layer
    with pytest.raises(RecipeError, match="und_projector_scale"):
        load_recipe("tiny-shapes-follow", ["init.und_projector_scale=0"])


@pytest.mark.slow
def test_init_reinitialize_redraws_only_the_named_parts():
    """init.reinitialize: llm_layers redraws the LLM's decoder layers and final norm, keeps its embeddings
    (and so the tied head) and every other part as loaded; llm redraws the embeddings and the head with them;
    an unknown part is refused before any training."""
    import torch

    from cheers.training.parts import build_model, build_processor, model_config

    recipe = load_recipe("tiny-shapes-follow", ["init.und_projector_scale=1"])
    config = model_config(recipe)
    processor = build_processor(recipe, config)
    plain = build_model(recipe, processor.special, config).state_dict()
    layers = build_model(
        load_recipe("tiny-shapes-follow", ["init.und_projector_scale=1", "init.reinitialize=[llm_layers]"]),
        processor.special,
        config,
    )
    state = layers.state_dict()
    moved = {k for k in plain if not torch.equal(plain[k], state[k])}
    assert moved and all(
        k.startswith(("model.language_model.layers.", "model.language_model.norm.")) for k in moved
    )
    assert any(".self_attn.q_proj.weight" in k for k in moved)  # the weights really were redrawn
    llm = build_model(
        load_recipe("tiny-shapes-follow", ["init.und_projector_scale=1", "init.reinitialize=[llm]"]),
        processor.special,
        config,
    )
    assert not torch.equal(llm.lm_head.weight, layers.lm_head.weight)
    assert llm.lm_head.weight.data_ptr() == llm.model.language_model.embed_tokens.weight.data_ptr()
    assert torch.equal(llm.model.und_projector.mlp[0].weight, layers.model.und_projector.mlp[0].weight)
    with pytest.raises(RecipeError, match="init.reinitialize: unknown part"):
        build_model(
            load_recipe("tiny-shapes-follow", ["init.reinitialize=[llm_head]"]), processor.special, config
        )


@pytest.mark.slow
def test_the_scratch_recipe_keeps_the_bundled_vae_and_vision_tower_and_trains_the_rest_with_the_fix():
    """tiny-shapes-scratch (run 1 of the issue #18 retraining): the und_projector at 0.01x the lr, flat
    backgrounds and the L1 rung for most generation samples, the bundled VAE and vision tower as its only
    pretrained parts."""
    import torch

    from cheers.assets import BUNDLED_DIR, has_bundled_model
    from cheers.checkpoint import load_state_dict
    from cheers.training.parts import build_model, build_processor, model_config

    recipe = load_recipe("tiny-shapes-scratch")
    assert recipe.train.lr_multipliers == {"und_projector": 0.01} and recipe.init.from_release is None
    assert recipe.init.und_projector_scale == 0.5
    assert (recipe.init.vae, recipe.init.vision, recipe.init.llm) == ("default", "default", None)
    worlds = {s.name: s.options.get("world", {}) for s in recipe.data.sources if s.task == "generation"}
    assert worlds == {"gen-l1": {}, "gen": {"textures": ["flat"]}, "gen-full": {}}
    assert {s.name: s.options.get("rung") for s in recipe.data.sources}["gen-l1"] == "L1"
    assert "vae" not in recipe.train.trainable and recipe.engine.precision == "bf16"
    if not has_bundled_model():
        return
    config = model_config(recipe)
    model = build_model(recipe, build_processor(recipe, config).special, config)
    bundled = load_state_dict(BUNDLED_DIR)
    ours = model.state_dict()
    for name in (
        "model.vae_model.decoder.conv_in.weight",
        "model.vision_representation.embeddings.patch_embedding.weight",
    ):
        assert torch.equal(ours[name], bundled[name].float()), name
    assert not torch.equal(
        ours["model.und_projector.mlp.0.weight"], bundled["model.und_projector.mlp.0.weight"].float()
    )


def test_every_packaged_recipe_loads():
    from cheers.training.config import packaged_recipes

    names = packaged_recipes()
    assert {"tiny-shapes-scratch", "tiny-shapes-onset", "tiny-shapes-mix"} <= set(names)
    for name in names:
        load_recipe(name)
    onset, mix = load_recipe("tiny-shapes-onset"), load_recipe("tiny-shapes-mix")
    assert onset.init.from_release == "runs/tiny-shapes-scratch/export"
    assert mix.init.from_release == "runs/tiny-shapes-onset/export"
    assert {s.options.get("rung") for s in onset.data.sources} == {None, "L1"}
    restart, objects = load_recipe("tiny-shapes-restart"), load_recipe("tiny-shapes-restart-objects")
    assert restart.init.reinitialize == ["llm_layers", "flow_head", "hfi_gate"]
    assert "pixel_decoder" not in restart.train.trainable and restart.train.ema_decay == 0
    l0 = sum(s.ratio for s in restart.data.sources if s.options.get("rung") == "L0")
    assert l0 / sum(s.ratio for s in restart.data.sources) == 0.5  # half of every batch: L0
    assert objects.init.from_release == "runs/tiny-shapes-restart/export"


def test_bf16_autocast_on_a_cpu_that_emulates_it_is_warned_about(monkeypatch, caplog):
    import contextlib

    import torch

    from cheers.training import loop

    cpu = torch.device("cpu")
    assert isinstance(loop.cpu_has_native_bf16(), bool)  # this machine's answer, whatever it is
    monkeypatch.setattr(loop, "cpu_has_native_bf16", lambda: False)
    with caplog.at_level("WARNING", logger="cheers.training.loop"):
        assert loop.autocast_context("auto", cpu) is contextlib.nullcontext  # auto: float32 on CPUs
        assert not caplog.records
        assert loop.autocast_context("bf16", cpu) is not contextlib.nullcontext  # asked for: still honoured
    assert "without native bfloat16" in caplog.text and "engine.precision=auto" in caplog.text
    caplog.clear()
    monkeypatch.setattr(loop, "cpu_has_native_bf16", lambda: True)
    with caplog.at_level("WARNING", logger="cheers.training.loop"):
        loop.autocast_context("bf16", cpu)
    assert not caplog.records
