"""ShapesDataset / ShapesStream: deterministic samples in the release's conversation form."""

import numpy as np
import pytest
import torch
from PIL import Image

import cheers.data.shapes.dataset as dataset_mod
from cheers.data.records import parse_record
from cheers.data.shapes import KINDS, Mix, ShapesDataset, ShapesStream, make_sample, split_seeds


def test_items_are_deterministic_and_follow_the_release_form():
    ds = ShapesDataset(range(40), resolution=64)
    assert len(ds) == 40
    for i in range(40):
        a, b = ds[i], ds[i]
        assert a["conversations"] == b["conversations"] and a["spec"] == b["spec"]
        assert [np.asarray(x).tobytes() for x in a["images"]] == [
            np.asarray(x).tobytes() for x in b["images"]
        ]
        roles = [t["from"] for t in a["conversations"]]
        assert roles == ["human", "gpt"] * (len(roles) // 2)
        # The in-memory sample is a valid release record once images have paths.
        obj = {"id": a["id"], "conversations": a["conversations"]}
        if a["images"]:
            obj["image"] = ", ".join(f"{k}.png" for k in range(len(a["images"])))
        assert parse_record(obj).kind == a["kind"]
        assert all(isinstance(im, Image.Image) and im.size == (64, 64) for im in a["images"])
    with pytest.raises(IndexError):
        ds[40]


def test_kind_markers_and_specs():
    gen = make_sample(3, "generation", 64)
    assert gen["conversations"][0]["value"].endswith("\nBased on the above description, generate an image.")
    assert gen["conversations"][1]["value"] == "<im_start><image_gen><im_end>"
    assert "include" in gen["spec"] and gen["spec"]["tag"]
    und = make_sample(3, "understanding", 64)
    assert und["conversations"][0]["value"].startswith("<im_start><image><im_end>\n")
    assert "scene" in und["spec"]
    edit = make_sample(3, "editing", 64)
    assert len(edit["images"]) == 2 and edit["spec"]["kind"] in (
        "recolor",
        "remove",
        "add",
        "move",
        "background",
    )
    text = make_sample(3, "text", 64)
    assert text["images"] == [] and text["spec"] is None


def test_mix_sets_the_kind_shares():
    mix = Mix(understanding=3, generation=6, text=1)
    kinds = [mix.kind_for(s) for s in range(5000)]
    shares = {k: kinds.count(k) / len(kinds) for k in KINDS}
    assert shares["editing"] == 0
    assert abs(shares["understanding"] - 0.3) < 0.03 and abs(shares["generation"] - 0.6) < 0.03
    assert abs(shares["text"] - 0.1) < 0.02
    only_text = ShapesDataset(range(5), mix=Mix(understanding=0, generation=0, text=1))
    assert {only_text[i]["kind"] for i in range(5)} == {"text"}
    with pytest.raises(ValueError, match="Mix weights"):
        Mix(understanding=-1)


def test_tensor_images():
    ds = ShapesDataset(range(3), resolution=64, kind="editing", image_format="tensor")
    im = ds[0]["images"][0]
    assert isinstance(im, torch.Tensor) and im.shape == (3, 64, 64) and im.dtype == torch.float32
    assert 0.0 <= float(im.min()) and float(im.max()) <= 1.0
    with pytest.raises(ValueError, match="image_format"):
        ShapesDataset(image_format="numpy")


def test_splits_are_disjoint():
    tr, va, te = split_seeds("train"), split_seeds("val"), split_seeds("test")
    assert tr.stop <= va.start and va.stop <= te.start
    assert list(split_seeds("val", 2)) == [va.start, va.start + 1]


class _Info:
    def __init__(self, wid, n):
        self.id, self.num_workers = wid, n


def test_stream_is_infinite_and_worker_and_rank_aware(monkeypatch):
    def first_seeds(rank, wid):
        monkeypatch.setattr(dataset_mod, "get_worker_info", lambda: _Info(wid, 2))
        it = ShapesStream(start=100, resolution=64, rank=rank, world_size=2).seeds()
        return [next(it) for _ in range(5)]

    all_seeds = [first_seeds(r, w) for r in range(2) for w in range(2)]
    flat = [s for seeds in all_seeds for s in seeds]
    assert len(set(flat)) == len(flat) == 20
    assert sorted(flat) == list(range(100, 120))
    monkeypatch.setattr(dataset_mod, "get_worker_info", lambda: None)
    stream = iter(ShapesStream(start=5, resolution=64))
    samples = [next(stream) for _ in range(3)]
    assert [s["seed"] for s in samples] == [5, 6, 7]
    with pytest.raises(ValueError, match="rank"):
        ShapesStream(rank=2, world_size=2)
