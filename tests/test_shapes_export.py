"""The exporter's output round-trips through the release-format reader."""

import json

import numpy as np
from PIL import Image

from cheers.data.records import read_records
from cheers.data.shapes import export_shapes, make_sample, split_seeds


def test_export_round_trips_through_the_reader(tmp_path):
    counts = {"understanding": 4, "generation": 4, "editing": 3, "text": 2}
    summary = export_shapes(tmp_path, counts, resolution=64, split="val")
    assert summary.counts == counts
    seeds = split_seeds("val")
    for kind, n in counts.items():
        records = read_records(summary.files[kind], summary.image_root)
        assert len(records) == n and {r.kind for r in records} == {kind}
        for i, rec in enumerate(records):
            sample = make_sample(int(seeds[i]), kind, 64)
            assert rec.id == sample["id"]
            assert [{"from": t.role, "value": t.value} for t in rec.conversations] == sample["conversations"]
            assert rec.extra["meta"] == json.loads(
                json.dumps({"seed": int(seeds[i]), "spec": sample["spec"]})
            )
            assert len(rec.images) == len(sample["images"])
            for path, im in zip(rec.images, sample["images"]):
                assert path.is_relative_to(summary.image_root)
                assert np.array_equal(np.asarray(Image.open(path)), np.asarray(im))
    lines = summary.files["geneval_prompts"].read_text().splitlines()
    assert len(lines) == counts["generation"]
    assert all("include" in json.loads(line) and "prompt" in json.loads(line) for line in lines)


def test_editing_image_field_holds_source_then_target(tmp_path):
    summary = export_shapes(tmp_path, {"editing": 1}, resolution=64)
    line = json.loads(summary.files["editing"].read_text().splitlines()[0])
    src, tgt = line["image"].split(", ")
    assert src.endswith("_src.png") and tgt.endswith("_tgt.png")
    assert "<image>" in line["conversations"][0]["value"]
    assert line["conversations"][1]["value"] == "<im_start><image_gen><im_end>"
    assert set(summary.files) == {"editing"}
