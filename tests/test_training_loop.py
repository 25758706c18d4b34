"""The training loop on one CPU process: every stage end to end, overfitting, exact resume, atomic
checkpoints, export, hooks and metrics."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch

from cheers.checkpoint import load_state_dict
from cheers.eval.train_hooks import recipe_hooks, shapes_prompt_gain_fn, shapes_sample_fn, shapes_score_fn
from cheers.models.cheers import Cheers
from cheers.models.pretrained import from_pretrained
from cheers.processor import CheersProcessor
from cheers.training import checkpointing
from cheers.training.config import RecipeError, load_recipe
from cheers.training.ema import ema_decay
from cheers.training.hooks import SampleImages, Score
from cheers.training.loop import Trainer, train
from cheers.training.monitor import read_metrics
from cheers.training.optim import lr_factor
from cheers.training.parts import build_model
from test_training_fixtures import SIZE, one_thread, tiny_processor, tiny_recipe, write_data  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

STAGES = {"I": "stage1", "II": "stage2", "III": "stage3", "IV": "stage4"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("loop-data")
    return root, write_data(root)


def _stage_recipe(name: str, root, files, run_dir):
    """A packaged stage recipe pointed at the tiny model and tiny data (keeping its groups, lr and
    mixture)."""
    recipe = load_recipe(name)
    sets = {
        "model.preset": "tiny",
        "model.overrides": {"vision.image_size": SIZE},
        "init.llm": None,
        "init.vision": None,
        "init.vae": None,
        "init.from_release": None,
        "train.steps": 2,
        "train.micro_batch": 2,
        "train.global_batch": 4,
        "data.num_workers": 0,
        "checkpoint.every": 0,
        "checkpoint.export": False,
        "log.progress": False,
        "log.tensorboard": False,
        "engine.device": "cpu",
        "out": str(run_dir),
    }
    for i, source in enumerate(recipe.data.sources):
        task = {"understanding": "und", "generation": "gen", "text": "text", "editing": "edit"}[source.task]
        sets.update(
            {
                f"data.sources.{i}.kind": "jsonl",
                f"data.sources.{i}.path": str(files[task]),
                f"data.sources.{i}.image_root": str(root / "images"),
            }
        )
    return load_recipe(name, sets)


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_each_stage_runs_end_to_end(stage, data, tmp_path, caplog):
    root, files = data
    recipe = _stage_recipe(STAGES[stage], root, files, tmp_path / "run")
    processor = tiny_processor()
    model = build_model(recipe, processor.special)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with caplog.at_level(logging.INFO, logger="cheers.training.loop"):
        result = Trainer(recipe, processor=processor, model=model).run()
    assert result.step == 2 and len(result.history) == 2
    assert all(
        math.isfinite(h["loss"]) and h["image_loss"] > 0 and h["text_loss"] > 0 for h in result.history
    )
    assert (
        "trainable und_projector" in caplog.text and "trainable vae                        0" in caplog.text
    )
    trained = set(recipe.train.trainable)
    for name, value in model.state_dict().items():
        group = next(
            g for g, ps in Cheers.PARAMETER_GROUPS.items() if any(name.startswith(p + ".") for p in ps)
        )
        if group not in trained or ".head." in name or value.dtype == torch.long:
            assert torch.equal(value, before[name]), f"stage {stage} changed frozen {name}"
    changed = {
        g
        for g in trained
        if any(
            not torch.equal(model.state_dict()[n], before[n])
            for n in before
            if n.startswith(Cheers.PARAMETER_GROUPS[g])
        )
    }
    assert (
        changed == trained - {"hfi_gate"} or changed == trained
    )  # the zero-init gate may need a step to move
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2]


@pytest.mark.slow
def test_overfitting_a_fixed_batch_lowers_the_loss(data, tmp_path):
    root, files = data
    one = tmp_path / "one.jsonl"
    one.write_text(files["und"].read_text().splitlines()[1] + "\n")
    recipe = tiny_recipe(
        root,
        files,
        **{
            "data.sources": [
                {
                    "name": "und",
                    "kind": "jsonl",
                    "task": "understanding",
                    "path": str(one),
                    "image_root": str(root / "images"),
                }
            ],
            "train.steps": 20,
            "train.global_batch": 2,
            "train.lr": 1e-2,
            "train.trainable": ["und_projector", "llm", "flow_head"],
        },
    )
    losses = [h["loss"] for h in train(recipe, tmp_path / "run", processor=tiny_processor()).history]
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.25 * losses[0]
    assert sum(b < a for a, b in zip(losses, losses[1:])) >= 17


@pytest.mark.slow
def test_resume_is_bit_exact(data, tmp_path):
    root, files = data
    recipe = tiny_recipe(
        root,
        files,
        **{"train.steps": 6, "train.warmup_ratio": 0.2, "train.schedule": "cosine", "data.cfg_dropout": 0.5},
    )
    straight = Trainer(recipe, tmp_path / "a", processor=tiny_processor()).run()
    first = Trainer(recipe, tmp_path / "b", processor=tiny_processor(), stop_after=3).run()
    assert first.step == 3 and checkpointing.latest_checkpoint(tmp_path / "b").name == "step-00000003"
    recipe.data.num_workers = 2  # workers read the same micro-batches in the same order
    second = Trainer(recipe, tmp_path / "b", processor=tiny_processor(), resume=True).run()
    keys = ("loss", "text_loss", "image_loss", "grad_norm", "lr", "samples")
    a = [[h[k] for k in keys] for h in straight.history]
    b = [[h[k] for k in keys] for h in first.history + second.history]
    assert a == b  # every logged number, exactly
    assert [r["step"] for r in read_metrics(tmp_path / "b")] == [1, 2, 3, 4, 5, 6]
    sa = checkpointing.latest_checkpoint(tmp_path / "a")
    sb = checkpointing.latest_checkpoint(tmp_path / "b")

    wa, wb = load_state_dict(sa), load_state_dict(sb)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_resumed_run_follows_a_longer_schedule_and_a_new_lr_from_the_recipe(data, tmp_path, caplog):
    root, files = data
    sets = {"train.steps": 4, "train.warmup_ratio": 0.25, "train.schedule": "wsd", "train.decay_ratio": 0.5}
    first = Trainer(tiny_recipe(root, files, **sets), tmp_path / "run", processor=tiny_processor()).run()
    assert first.history[-1]["lr"] == pytest.approx(1e-3 * lr_factor(3, 4, 0.25, "wsd", 0.0, 0.5))
    # extended to 10 steps at twice the lr: without the recipe's schedule the run would go on at lr 0
    longer = tiny_recipe(root, files, **{**sets, "train.steps": 10, "train.lr": 2e-3})
    with caplog.at_level(logging.WARNING, logger="cheers.training.loop"):
        second = Trainer(longer, tmp_path / "run", processor=tiny_processor(), resume=True).run()
    assert [h["step"] for h in second.history] == [5, 6, 7, 8, 9, 10]
    expected = [2e-3 * lr_factor(s, 10, 0.25, "wsd", 0.0, 0.5) for s in range(4, 10)]
    assert [h["lr"] for h in second.history] == pytest.approx(expected)
    assert expected[0] == pytest.approx(2e-3) and expected[-1] < expected[0]
    assert "changes the lr schedule" in caplog.text and "total 4 -> 10" in caplog.text
    assert "lr 0.001 -> 0.002" in caplog.text


def test_channels_last_trains_the_same_numbers_and_resumes(data, tmp_path):
    root, files = data
    sets = {"train.trainable": ["vision_encoder", "und_projector", "llm", "flow_head", "hfi_gate"]}
    plain = Trainer(tiny_recipe(root, files, **sets), tmp_path / "a", processor=tiny_processor()).run()
    last = tiny_recipe(root, files, **sets, **{"engine.channels_last": True})
    first = Trainer(last, tmp_path / "b", processor=tiny_processor(), stop_after=2).run()
    processor = tiny_processor()
    model = build_model(last, processor.special)
    second = Trainer(last, tmp_path / "b", processor=processor, model=model, resume=True).run()
    assert second.step == 3
    losses = [h["loss"] for h in first.history + second.history]
    assert losses == pytest.approx([h["loss"] for h in plain.history], rel=1e-4)
    conv = model.model.vision_representation.embeddings.patch_embedding.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and conv.requires_grad


def test_a_failed_save_keeps_the_previous_checkpoint(data, tmp_path, monkeypatch):
    root, files = data
    recipe = tiny_recipe(root, files, **{"train.steps": 3, "checkpoint.every": 1, "checkpoint.keep": 2})
    real_save = torch.save

    def flaky_save(obj, file, *args, **kwargs):
        path = str(getattr(file, "name", file))  # the saver hands torch.save an open file
        if "step-00000003" in path and path.endswith(checkpointing.OPTIMIZER):
            raise OSError("disk full")
        return real_save(obj, file, *args, **kwargs)

    monkeypatch.setattr(checkpointing.torch, "save", flaky_save)
    with pytest.raises(OSError, match="disk full"):
        Trainer(recipe, tmp_path / "run", processor=tiny_processor()).run()
    monkeypatch.setattr(checkpointing.torch, "save", real_save)
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-00000001", "step-00000002"]
    assert json.loads((ckpts / "latest").read_text()) == {"step": 2, "dir": "step-00000002"}
    resumed = Trainer(recipe, tmp_path / "run", processor=tiny_processor(), resume=True).run()
    assert [h["step"] for h in resumed.history] == [3]
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-00000002", "step-00000003"]


def test_the_weight_average_is_exported_checkpointed_and_resumed_exactly(data, tmp_path):
    root, files = data
    recipe = tiny_recipe(
        root,
        files,
        **{
            "train.steps": 4,
            "train.ema_decay": 0.6,
            "checkpoint.every": 1,
            "checkpoint.keep": 10,
            "checkpoint.export": True,
        },
    )
    processor = tiny_processor()
    model = build_model(recipe, processor.special)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    start = {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}
    straight = Trainer(recipe, tmp_path / "a", processor=processor, model=model).run()
    # the average by hand, from the weights each step's checkpoint holds
    expected = dict(start)
    for n in range(4):
        weights = load_state_dict(tmp_path / "a" / "checkpoints" / checkpointing.step_name(n + 1))
        decay = ema_decay(0.6, n)
        expected = {k: decay * expected[k] + (1 - decay) * weights[k].float() for k in names}
    exported = load_state_dict(straight.export_dir)
    last = load_state_dict(checkpointing.latest_checkpoint(tmp_path / "a"))
    for k in names:
        torch.testing.assert_close(exported[k].float(), expected[k], rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(exported[k], last[k]) for k in names)  # not the last step's weights
    frozen = [k for k in last if k not in names and k != "lm_head.weight"]  # lm_head: tied to the embeddings
    assert frozen and all(torch.equal(exported[k], last[k]) for k in frozen)
    # stopped after two steps and resumed: the same average, to the bit
    Trainer(recipe, tmp_path / "b", processor=tiny_processor(), stop_after=2).run()
    resumed = Trainer(recipe, tmp_path / "b", processor=tiny_processor(), resume=True).run()
    again = load_state_dict(resumed.export_dir)
    assert all(torch.equal(again[k], exported[k]) for k in exported)
    state = checkpointing.read_trainer_state(checkpointing.latest_checkpoint(tmp_path / "b"))
    assert state["ema_updates"] == 4


def test_a_checkpoint_without_an_average_starts_it_and_bad_settings_are_named(data, tmp_path, caplog):
    root, files = data
    plain = tiny_recipe(root, files, **{"train.steps": 2})
    Trainer(plain, tmp_path / "run", processor=tiny_processor()).run()
    averaged = tiny_recipe(root, files, **{"train.steps": 3, "train.ema_decay": 0.9})
    with caplog.at_level(logging.WARNING, logger="cheers.training.loop"):
        result = Trainer(averaged, tmp_path / "run", processor=tiny_processor(), resume=True).run()
    assert result.step == 3 and "holds no weight average" in caplog.text
    for bad in (1.0, -0.1):
        with pytest.raises(RecipeError, match="train.ema_decay"):
            tiny_recipe(root, files, **{"train.ema_decay": bad})
    with pytest.raises(RecipeError, match="fsdp"):
        tiny_recipe(root, files, **{"train.ema_decay": 0.99, "engine.strategy": "fsdp"})


def test_export_round_trips_through_from_pretrained(data, tmp_path):
    root, files = data
    recipe = tiny_recipe(root, files, **{"train.steps": 1, "checkpoint.export": True})
    processor = tiny_processor()
    model = build_model(recipe, processor.special)
    result = Trainer(recipe, tmp_path / "run", processor=processor, model=model).run()
    loaded = from_pretrained(result.export_dir)
    assert loaded.special == processor.special
    mine, theirs = model.state_dict(), loaded.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert CheersProcessor.from_pretrained(result.export_dir).special == processor.special
    assert not (result.export_dir / "sampling_defaults.json").exists()  # a model from scratch: none to keep


def test_a_continued_model_keeps_its_sampling_defaults_in_the_export(data, tmp_path):
    """Continuing a release directory (e.g. the bundled model) keeps its prompt template, steps, guidance and
    prefix image: the export samples the way its start was trained and scored."""
    from cheers.models.pretrained import save_pretrained
    from cheers.pipeline import SamplingDefaults

    root, files = data
    processor = tiny_processor()
    start = tmp_path / "start"
    save_pretrained(build_model(tiny_recipe(root, files), processor.special), start)
    processor.save_pretrained(start)
    defaults = '{"num_inference_steps": 7, "prompt_template": "{sentence}", "prefix_image": null}'
    (start / "sampling_defaults.json").write_text(defaults)
    recipe = tiny_recipe(
        root,
        files,
        **{
            "train.steps": 1,
            "checkpoint.export": True,
            "init.from_release": str(start),
            "model.preset": None,
            "model.overrides": {},
        },
    )
    result = Trainer(recipe, tmp_path / "run", processor=processor).run()
    kept = SamplingDefaults(**json.loads((result.export_dir / "sampling_defaults.json").read_text()))
    assert kept == SamplingDefaults(num_inference_steps=7, prompt_template="{sentence}", prefix_image=None)


@pytest.mark.slow
def test_hooks_save_samples_and_log_scores(data, tmp_path):
    root, files = data
    recipe = tiny_recipe(root, files, **{"train.steps": 2, "train.global_batch": 2})
    calls = []
    hooks = [
        SampleImages(2, shapes_sample_fn(count=2, steps=2)),
        Score(2, shapes_score_fn(count=2, steps=2)),
        Score(2, shapes_prompt_gain_fn(count=2, times=(0.5,))),
        Score(1, lambda ctx: calls.append((ctx.step, ctx.model.training)) or {"custom": 1.0}),
    ]
    result = Trainer(recipe, tmp_path / "run", processor=tiny_processor(), hooks=hooks).run()
    assert calls == [(1, False), (2, False)]  # eval mode inside hooks
    assert (tmp_path / "run" / "samples" / "step-00000002.png").is_file()
    scores = [h for h in result.history if "shapes_geneval" in h]
    assert len(scores) == 1 and 0.0 <= scores[0]["shapes_geneval"] <= 1.0
    assert math.isfinite(scores[0]["shapes_prompt_gain"])
    assert any("custom" in r for r in read_metrics(tmp_path / "run"))


def test_recipe_hooks_follow_the_log_section(data):
    """``cheers train`` passes these: the ShapesWorld hooks of log.sample_every / log.score_every, none
    otherwise."""
    shapes = load_recipe("tiny-shapes", ["log.sample_every=5", "log.score_every=7"])
    assert [(type(h).__name__, h.every) for h in recipe_hooks(shapes)] == [
        ("SampleImages", 5),
        ("Score", 7),
        ("Score", 7),
    ]
    assert recipe_hooks(load_recipe("tiny-shapes", ["log.sample_every=0", "log.score_every=0"])) == []
    root, files = data
    assert (
        recipe_hooks(tiny_recipe(root, files, **{"log.sample_every": 5, "log.score_every": 7})) == []
    )  # jsonl


def test_monitor_writes_jsonl_and_tensorboard_when_available(tmp_path):
    from PIL import Image

    from cheers.training.monitor import Monitor

    tensorboard = True
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        tensorboard = False
    monitor = Monitor(tmp_path, total_steps=3, tensorboard=True, progress=True)
    for step in (1, 2, 3):
        monitor.log(step, {"loss": 1.0 / step, "lr": 1e-4, "note": "text"})
        monitor.advance()
    monitor.add_image("samples", Image.new("RGB", (8, 8)), 3)
    monitor.close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    assert any((tmp_path / "tensorboard").glob("events.*")) == tensorboard
    Monitor(tmp_path, total_steps=3, start_step=2, tensorboard=False, progress=False).close()  # a resume at 2
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]


def test_too_many_corrupt_samples_stop_the_run(data, tmp_path):
    from cheers.data.loader import CorruptDataError

    root, files = data
    lines = files["gen"].read_text().splitlines()
    bad = tmp_path / "half-bad.jsonl"
    bad.write_text("\n".join(line if i % 2 else "{broken" for i, line in enumerate(lines)) + "\n")
    sources = [
        {
            "name": "gen",
            "kind": "jsonl",
            "task": "generation",
            "path": str(bad),
            "image_root": str(root / "images"),
        }
    ]
    tolerant = tiny_recipe(
        root, files, **{"data.sources": sources, "train.steps": 2, "data.max_corrupt_fraction": 0.8}
    )
    result = Trainer(tolerant, tmp_path / "ok", processor=tiny_processor()).run()  # skipped and replaced
    assert result.step == 2 and result.history[-1]["corrupt"] > 0
    strict = tiny_recipe(
        root, files, **{"data.sources": sources, "train.steps": 2, "data.max_corrupt_fraction": 0.05}
    )
    with pytest.raises(CorruptDataError, match="max_corrupt_fraction"):
        Trainer(strict, tmp_path / "strict", processor=tiny_processor()).run()


def test_non_finite_steps_are_skipped_then_stop_the_run(data, tmp_path, monkeypatch):
    root, files = data
    real = Cheers._training_losses
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] in bad_calls:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(Cheers, "_training_losses", poisoned)
    bad_calls = {2}  # one poisoned micro-batch: its step is skipped, the run goes on
    recipe = tiny_recipe(
        root,
        files,
        **{"train.steps": 4, "train.global_batch": 2, "train.micro_batch": 2, "train.max_nonfinite_steps": 2},
    )
    history = train(recipe, tmp_path / "a", processor=tiny_processor()).history
    assert [h["skipped"] for h in history] == [0, 1, 0, 0]
    assert all(math.isfinite(h["loss"]) for i, h in enumerate(history) if i != 1)
    calls["n"], bad_calls = 0, set(range(1, 100))  # every step poisoned: stops after 2 skipped in a row
    with pytest.raises(FloatingPointError, match="max_nonfinite_steps=2"):
        train(
            tiny_recipe(
                root,
                files,
                **{
                    "train.steps": 6,
                    "train.global_batch": 2,
                    "train.micro_batch": 2,
                    "train.max_nonfinite_steps": 2,
                },
            ),
            tmp_path / "b",
            processor=tiny_processor(),
        )
