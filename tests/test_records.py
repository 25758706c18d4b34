"""The release-format jsonl reader: kinds, validation errors that name the line, round trip."""

import json

import pytest

from cheers.data.records import (
    Record,
    RecordError,
    Turn,
    iter_records,
    parse_record,
    read_records,
    write_records,
)

UND = {
    "id": "u1",
    "image": "a.png",
    "conversations": [
        {"from": "human", "value": "<im_start><image><im_end>\nWhat is this?"},
        {"from": "gpt", "value": "An apple."},
    ],
}
GEN = {
    "id": 7,
    "image": "b.png",
    "conversations": [
        {"from": "human", "value": "An apple.\nBased on the above description, generate an image."},
        {"from": "gpt", "value": "<im_start><image_gen><im_end>"},
    ],
}
EDIT = {
    "id": "e1",
    "image": "a.png, b.png",
    "conversations": [
        {"from": "human", "value": "<im_start><image><im_end>\nMake it red."},
        {"from": "gpt", "value": "<im_start><image_gen><im_end>"},
    ],
}
TEXT = {"id": "t1", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}


@pytest.fixture
def root(tmp_path):
    for name in ("a.png", "b.png"):
        (tmp_path / name).write_bytes(b"png")
    return tmp_path


def _write(path, objs):
    path.write_text("".join((o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objs))
    return path


def test_kinds_and_paths(root):
    recs = read_records(_write(root / "d.jsonl", [UND, GEN, EDIT, TEXT]), root)
    assert [r.kind for r in recs] == ["understanding", "generation", "editing", "text"]
    assert recs[1].id == "7"
    assert recs[2].images == (root / "a.png", root / "b.png")
    assert recs[3].images == ()
    assert recs[0].conversations[1] == Turn("gpt", "An apple.")


def test_round_trip_through_writer(root):
    src = _write(root / "d.jsonl", [UND, GEN, EDIT, TEXT, {**UND, "id": "u2", "meta": {"k": 1}}])
    recs = read_records(src, root)
    assert recs[4].extra == {"meta": {"k": 1}}
    out = root / "out.jsonl"
    write_records(out, recs, root)
    again = read_records(out, root)
    assert again == recs
    assert json.loads(out.read_text().splitlines()[2])["image"] == "a.png, b.png"


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("{not json", "invalid JSON"),
        ({"id": "x"}, "'conversations' must be a non-empty list"),
        ({**TEXT, "conversations": [{"from": "gpt", "value": "x"}]}, "expected 'human'"),
        ({**TEXT, "conversations": [{"from": "user", "value": "x"}]}, "turn 0"),
        ({**UND, "image": None}, "1 image marker"),
        ({**TEXT, "image": "a.png"}, "0 image marker"),
        (
            {
                **GEN,
                "conversations": [{"from": "human", "value": "<image_gen>"}, {"from": "gpt", "value": "x"}],
            },
            "only appear in gpt",
        ),
        ({**UND, "image": "missing.png"}, "does not exist"),
        ({**EDIT, "image": "a.png, b.png, a.png"}, "src_path, target_path"),
        ({**UND, "id": ""}, "'id'"),
    ],
)
def test_errors_name_file_and_line(root, bad, message):
    path = _write(root / "d.jsonl", [TEXT, bad])
    with pytest.raises(RecordError, match=message) as e:
        read_records(path, root)
    assert "d.jsonl:2" in str(e.value)


def test_duplicate_ids_and_blank_lines(root):
    path = _write(root / "d.jsonl", [TEXT, "", TEXT])
    assert len(list(iter_records(path))) == 2
    with pytest.raises(RecordError, match="duplicate id 't1'"):
        read_records(path)


def test_without_image_root_paths_are_kept_as_written():
    r = parse_record(EDIT, check_images=True)
    assert [str(p) for p in r.images] == ["a.png", "b.png"]
    assert isinstance(r, Record) and r.to_json()["image"] == "a.png, b.png"
