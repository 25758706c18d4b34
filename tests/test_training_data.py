"""Training data: sample rules (t, dummy image, CFG dropout), collation, mixing, positions, corrupt samples,
shards."""

from __future__ import annotations

import functools
from collections import Counter

import numpy as np
import pytest
import torch

from cheers.data.collate import collate
from cheers.data.loader import CorruptDataError, CorruptTracker, Layout, MicroBatches, Mixture
from cheers.data.samples import SampleBuilder
from cheers.data.shapes_source import ShapesSource
from cheers.data.shards import ShardSource, jsonl_to_shards
from cheers.data.sources import CorruptSample, JsonlSource
from cheers.models.sequence import IGNORE_INDEX
from test_training_fixtures import SIZE, one_thread, tiny_processor, write_data  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

LATENT = (32, SIZE // 16, SIZE // 16)  # tiny preset: C = 4 x 8


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return root, write_data(root)


def _source(data, task):
    root, files = data
    return JsonlSource(files[task], root / "images", name=task, task=task)


def test_samples_follow_the_release_rules(data):
    proc = tiny_processor()
    build = SampleBuilder(proc, LATENT, cfg_dropout=0.0)
    und = build(*_source(data, "und").load(0), seed=1)
    assert und.task == "understanding" and und.t.tolist() == [1.0] and not und.x0.any()
    assert und.pixel_values.shape == (1, 3, SIZE, SIZE)
    assert proc.special.image_marker in und.input_ids.tolist()
    assert proc.special.image_marker not in und.labels.tolist()  # user-turn markers are not targets
    gen = build(*_source(data, "gen").load(0), seed=1)
    assert gen.task == "generation" and 0 < float(gen.t) < 1 and gen.x0.std() > 0.5
    assert proc.special.image_gen_marker in gen.labels.tolist()
    text = build(*_source(data, "text").load(0), seed=1)
    assert text.task == "text" and text.t.tolist() == [0.0]
    assert not text.pixel_values.any() and text.pixel_values.shape == (1, 3, SIZE, SIZE)  # the all-zero image
    edit = build(*_source(data, "edit").load(0), seed=1)
    assert edit.task == "editing" and edit.t[0] == 1 and 0 < float(edit.t[1]) < 1  # source first, then target
    again = build(*_source(data, "gen").load(0), seed=1)
    assert torch.equal(gen.t, again.t) and torch.equal(gen.x0, again.x0)  # the seed decides everything
    assert not torch.equal(gen.x0, build(*_source(data, "gen").load(0), seed=2).x0)


def test_cfg_dropout_rewrites_generation_ids_only(data):
    proc = tiny_processor()
    always = SampleBuilder(proc, LATENT, cfg_dropout=1.0)
    plain = SampleBuilder(proc, LATENT, cfg_dropout=0.0)(*_source(data, "gen").load(1), seed=3)
    dropped = always(*_source(data, "gen").load(1), seed=3)
    assert dropped.cfg_dropped and torch.equal(dropped.labels, plain.labels)
    assert torch.equal(dropped.input_ids, proc.cfg_dropout_ids(plain.input_ids))
    assert set(dropped.input_ids.tolist()) <= {
        proc.special.no_mean,
        proc.special.im_start,
        proc.special.im_end,
        proc.special.image_gen_marker,
    }
    und = always(*_source(data, "und").load(1), seed=3)
    assert not und.cfg_dropped  # understanding samples are never dropped
    rate = np.mean(
        [
            SampleBuilder(proc, LATENT, 0.2)(*_source(data, "gen").load(0), seed=s).cfg_dropped
            for s in range(200)
        ]
    )
    assert 0.12 < rate < 0.28


def test_time_sampling_of_generation_images(data):
    from cheers.flow import sample_t

    proc = tiny_processor()
    record = _source(data, "gen").load(0)
    noisy = SampleBuilder(
        proc, LATENT, 0.0, time_sampling={"kind": "logit_normal", "loc": -1.5, "scale": 0.5}
    )
    times = torch.cat([noisy(*record, seed=s).t for s in range(400)])
    assert 0.12 < float(times.median()) < 0.25 and float(times.max()) < 0.6  # sigmoid(-1.5) = 0.18
    uniform = torch.cat([SampleBuilder(proc, LATENT, 0.0)(*record, seed=s).t for s in range(400)])
    assert 0.4 < float(uniform.median()) < 0.6
    assert float(sample_t(1000, torch.Generator().manual_seed(0)).min()) >= 1e-6
    with pytest.raises(ValueError, match="unknown time sampling"):
        SampleBuilder(proc, LATENT, 0.0, time_sampling={"kind": "cosmic"})


def test_collate_pads_right_and_keeps_image_order(data):
    proc = tiny_processor()
    build = SampleBuilder(proc, LATENT, cfg_dropout=0.0)
    samples = [build(*_source(data, t).load(0), seed=i) for i, t in enumerate(("text", "edit", "und"))]
    batch = collate(samples, proc.special.pad)
    lengths = [s.input_ids.shape[0] for s in samples]
    assert batch.input_ids.shape == (3, max(lengths))
    for b, n in enumerate(lengths):
        assert batch.attention_mask[b].tolist() == [1] * n + [0] * (max(lengths) - n)
        assert (batch.input_ids[b, n:] == proc.special.pad).all() and (
            batch.labels[b, n:] == IGNORE_INDEX
        ).all()
    assert torch.equal(batch.t, torch.cat([s.t for s in samples]))  # 1 + 2 + 1 images, row by row
    assert batch.pixel_values.shape[0] == 4 and torch.equal(batch.x0[1:3], samples[1].x0)


def test_mixture_ratios_are_exact_per_cycle():
    mix = Mixture([3, 6, 1], seed=5)
    located = [mix.locate(p) for p in range(1000)]
    counts = Counter(s for s, _ in located)
    assert counts == {0: 300, 1: 600, 2: 100}
    for s in range(3):  # each source's items are visited in order 0, 1, 2, ...
        assert [k for src, k in located if src == s] == list(range(counts[s]))
    assert [mix.locate(p) for p in range(20)] == [Mixture([3, 6, 1], seed=5).locate(p) for p in range(20)]
    assert [mix.locate(p) for p in range(20)] != [Mixture([3, 6, 1], seed=6).locate(p) for p in range(20)]


def test_positions_do_not_depend_on_the_number_of_processes():
    def step_positions(world, micro):
        accumulation = 8 // (world * micro)
        layouts = [Layout(micro, accumulation, world, r) for r in range(world)]
        return sorted(
            p
            for layout in layouts
            for a in range(accumulation)
            for p in layout.positions(2 * accumulation + a)
        )

    assert step_positions(1, 1) == step_positions(2, 2) == step_positions(4, 1) == list(range(16, 24))


def _dataset(sources, ratios, proc, **kw):
    return MicroBatches(
        sources,
        ratios,
        SampleBuilder(proc, LATENT, 0.2),
        functools.partial(collate, pad_id=proc.special.pad),
        Layout(2, 1),
        seed=0,
        **kw,
    )


def test_corrupt_samples_are_skipped_counted_and_replaced(data, tmp_path):
    root, files = data
    lines = files["gen"].read_text().splitlines()
    lines[1] = "{not json"
    lines[2] = lines[2].replace("gen2.png", "missing.png")
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "gen0.png").write_bytes(b"\x89PNG truncated")
    for i in range(3, 6):
        (tmp_path / "images" / f"gen{i}.png").write_bytes((root / "images" / f"gen{i}.png").read_bytes())
    source = JsonlSource(tmp_path / "bad.jsonl", tmp_path / "images", name="bad", task="generation")
    for i, reason in [(0, "unreadable_image"), (1, "bad_record"), (2, "missing_image")]:
        with pytest.raises(CorruptSample) as err:
            source.load(i)
        assert err.value.reason == reason
    dataset = _dataset([source], [1], tiny_processor())
    tracker = CorruptTracker()
    for m in range(3):  # 6 positions: every record once (epoch 0), corrupt ones replaced by good ones
        batch = dataset[m]
        assert len(batch) == 2 and batch.tasks == ["generation", "generation"]
        tracker.add(batch.attempted, batch.corrupt, batch.reasons)
    assert tracker.corrupt >= 3 and tracker.attempted == 6 + tracker.corrupt
    assert set(tracker.reasons) == {"unreadable_image", "bad_record", "missing_image"}
    tracker.check(max_fraction=0.9, grace=0)
    with pytest.raises(CorruptDataError, match="max_corrupt_fraction"):
        tracker.check(max_fraction=0.1, grace=0)
    tracker.check(max_fraction=0.1, grace=1000)  # not judged before the grace count
    (tmp_path / "all-bad.jsonl").write_text("{oops\n[1, 2]\n")
    hopeless = _dataset(
        [JsonlSource(tmp_path / "all-bad.jsonl", name="x")], [1], tiny_processor(), max_retries=3
    )
    with pytest.raises(CorruptDataError, match="all corrupt"):
        hopeless[0]


def test_shards_hold_the_same_records(data, tmp_path):
    root, files = data
    jsonl_to_shards(files["edit"], root / "images", tmp_path / "shards", samples_per_shard=4)
    shards = ShardSource(tmp_path / "shards", name="edit", task="editing")
    plain = _source(data, "edit")
    assert len(shards) == len(plain) == 6 and shards.counts.tolist() == [4, 2]
    for i in range(6):
        (r1, im1), (r2, im2) = shards.load(i), plain.load(i)
        assert r1["conversations"] == r2["conversations"] and len(im1) == len(im2) == 2
        assert [np.asarray(a).tolist() == np.asarray(b).tolist() for a, b in zip(im1, im2)] == [True, True]
    order = shards.epoch_order(0, seed=1)
    assert sorted(order.tolist()) == list(range(6))
    assert set(order[:4].tolist()) == {0, 1, 2, 3} or set(order[:2].tolist()) == {4, 5}  # shard-local reads
    assert order.tolist() == shards.epoch_order(0, seed=1).tolist() != shards.epoch_order(1, seed=1).tolist()
    (tmp_path / "shards" / "index.json").unlink()  # without the index, the shards are scanned
    assert len(ShardSource(tmp_path / "shards")) == 6


def test_shapes_source_gives_release_records():
    proc = tiny_processor()
    build = SampleBuilder(proc, LATENT, 0.0)
    for task in ("understanding", "generation", "editing", "text"):
        source = ShapesSource(task, size=10, first_seed=5, resolution=64)
        record, images = source.load(3)
        again, _ = source.load(3)
        assert record == again and record["kind"] == task  # a pure function of the index
        sample = build(record, images, seed=0)
        assert sample.task == task and sample.pixel_values.shape[-1] == SIZE
    mixed = ShapesSource("mixed", size=40, options={"mix": {"understanding": 1, "generation": 1, "text": 0}})
    assert {mixed.load(i)[0]["kind"] for i in range(40)} == {"understanding", "generation"}
    with pytest.raises(ValueError, match="unknown ShapesWorld options"):
        ShapesSource("text", size=4, options={"colour": 1})


def test_shapes_source_can_serve_a_ladder_rung_and_a_flat_world():
    """Generation sources of the bundled model's recipe: a learnability-ladder rung (L1: one large object, the
    background named) and the world with flat backgrounds only."""
    from cheers.data.shapes import parse_image
    from cheers.data.shapes.ladder import rung_sample

    proc = tiny_processor()
    build = SampleBuilder(proc, LATENT, 0.0)
    rung = ShapesSource("generation", size=10, first_seed=7, resolution=64, options={"rung": "L1"})
    record, images = rung.load(2)
    expected = rung_sample("L1", 9, 64)  # item 2 of a split starting at seed 7
    assert record["conversations"] == expected.record["conversations"] and record["kind"] == "generation"
    assert images[0].tobytes() == expected.image.tobytes() and rung.load(2)[0] == record
    assert build(record, images, seed=0).task == "generation"
    flat = ShapesSource("generation", size=6, resolution=128, options={"world": {"textures": ["flat"]}})
    for i in range(6):  # a flat background: the corner (never covered by an object) is one colour
        _, (image,) = flat.load(i)
        corner = np.asarray(image)[:6, :6].reshape(-1, 3)
        assert (corner == corner[0]).all() and parse_image(np.asarray(image)).background in (
            "gray",
            "white",
            "black",
        )
    with pytest.raises(ValueError, match="task: generation"):
        ShapesSource("understanding", size=4, options={"rung": "L1"})
    with pytest.raises(ValueError, match="unknown ladder rung"):
        ShapesSource("generation", size=4, options={"rung": "L9"})
    zoomed = ShapesSource(
        "generation", size=10, first_seed=7, resolution=64, options={"rung": "L1", "zoom": [1.5, 2]}
    )
    assert zoomed.load(2)[1][0].tobytes() == rung_sample("L1", 9, 64, (1.5, 2)).image.tobytes()
    assert zoomed.load(2)[0]["conversations"] == record["conversations"]
    with pytest.raises(ValueError, match="zoom needs a ladder rung"):
        ShapesSource("generation", size=4, options={"zoom": 2})
    short = ShapesSource(
        "generation", size=10, first_seed=7, resolution=64, options={"rung": "L1", "short": True}
    )
    assert short.load(2)[0]["conversations"] == rung_sample("L1", 9, 64, short=True).record["conversations"]
    with pytest.raises(ValueError, match="short needs a ladder rung L1 or L2"):
        ShapesSource("generation", size=4, options={"rung": "L0", "short": True})
    with pytest.raises(ValueError, match="source 'shapes': zoom applies to rungs L1 and L2"):
        ShapesSource("generation", size=4, options={"rung": "L3", "zoom": 2})
    two = ShapesSource("generation", size=4, first_seed=3, resolution=64, options={"rung": "L2", "zoom": 2})
    assert two.load(1)[1][0].tobytes() == rung_sample("L2", 4, 64, 2).image.tobytes()
