"""`cheers shapes ...` through a small argparse main, as the lead's CLI will call it."""

import argparse
import json

from cheers.data.records import read_records
from cheers.data.shapes.cli import add_shapes_parser, main


def test_add_shapes_parser_registers_commands():
    parser = argparse.ArgumentParser(prog="cheers")
    add_shapes_parser(parser.add_subparsers(dest="command"))
    for cmd in ("render", "export", "prompts", "judge", "validate", "tokenizer"):
        extra = (
            ["x"]
            if cmd == "judge"
            else (["--out", "x"] if cmd in ("render", "export", "prompts", "tokenizer") else [])
        )
        args = parser.parse_args(["shapes", cmd, *extra])
        assert callable(args.func)


def test_render_writes_images_sheet_and_text(tmp_path, capsys):
    assert main(["shapes", "render", "--n", "5", "--res", "64", "--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.glob("scene_*.png")) == [f"scene_{i:04d}.png" for i in range(5)]
    assert (tmp_path / "contact_sheet.png").is_file()
    lines = [json.loads(x) for x in (tmp_path / "scenes.jsonl").read_text().splitlines()]
    assert len(lines) == 5 and all(line["questions"] and line["prompt_spec"]["include"] for line in lines)
    assert "wrote 5 scenes" in capsys.readouterr().out


def test_export_writes_the_release_layout(tmp_path):
    argv = [
        "shapes",
        "export",
        "--out",
        str(tmp_path),
        "--res",
        "64",
        "--understanding",
        "2",
        "--generation",
        "3",
        "--editing",
        "1",
        "--text",
        "1",
    ]
    assert main(argv) == 0
    assert len(read_records(tmp_path / "generation.jsonl", tmp_path / "images")) == 3
    assert len(read_records(tmp_path / "editing.jsonl", tmp_path / "images")) == 1


def test_prompts_then_judge_ground_truth_scores_one(tmp_path, capsys):
    truth = tmp_path / "truth"
    argv = [
        "shapes",
        "prompts",
        "--n",
        "3",
        "--dense",
        "--out",
        str(tmp_path / "p.jsonl"),
        "--truth-dir",
        str(truth),
    ]
    assert main(argv) == 0
    specs = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert len(specs) == 21 and {s["tag"] for s in specs} >= {"counting", "position", "dense"}
    assert main(["shapes", "judge", str(truth), "--json", str(tmp_path / "r.json")]) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["summary"]["overall"] == 1.0 and len(result["samples"]) == 21
    # A wrong image for a prompt must fail: swap two prompt folders' samples.
    a, b = truth / "00000" / "samples" / "0000.png", truth / "00001" / "samples" / "0000.png"
    a_bytes = a.read_bytes()
    a.write_bytes(b.read_bytes())
    b.write_bytes(a_bytes)
    main(["shapes", "judge", str(truth), "--json", str(tmp_path / "r2.json")])
    assert json.loads((tmp_path / "r2.json").read_text())["summary"]["overall"] < 1.0
    assert "overall" in capsys.readouterr().out


def test_validate_prints_a_table(capsys):
    assert main(["shapes", "validate", "--n", "3", "--res", "64", "--perturb", "clean"]) == 0
    out = capsys.readouterr().out
    assert "| 64 | clean | 3 |" in out
