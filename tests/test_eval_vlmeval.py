"""The VLMEvalKit adapter under a fake, minimal VLMEvalKit (the real one is not installed in tests)."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
from PIL import Image

from cheers.eval.vlmeval import CheersVLM, main, register
from cheers.image_ops import load_image
from cheers.models.pretrained import save_pretrained

from model_helpers import tiny_pipeline

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline(seed=5)


@pytest.fixture()
def fake_vlmeval(monkeypatch):
    """``vlmeval.config.supported_VLM`` as VLMEvalKit exposes it: a dict of model constructors."""
    package, config = types.ModuleType("vlmeval"), types.ModuleType("vlmeval.config")
    config.supported_VLM = {}
    package.config = config
    monkeypatch.setitem(sys.modules, "vlmeval", package)
    monkeypatch.setitem(sys.modules, "vlmeval.config", config)
    return config.supported_VLM


class FakeDataset:
    """What VLMEvalKit's ImageBaseDataset gives infer_data: rows, build_prompt and dump_image."""

    dataset_name = "FakeBench"

    def __init__(self, rows):
        self.rows = rows

    def dump_image(self, line):
        return [line["image_path"]]

    def build_prompt(self, line):
        msgs = [] if line.get("image_path") is None else [{"type": "image", "value": line["image_path"]}]
        return msgs + [{"type": "text", "value": line["question"]}]


def infer_data(model_name, supported_vlm, dataset):
    """vlmeval/inference.py's infer_data loop, reduced to the calls it makes on a model."""
    model = supported_vlm[model_name]()
    assert not getattr(model, "is_api", False)
    model.set_dump_image(dataset.dump_image)
    answers = {}
    for line in dataset.rows:
        if hasattr(model, "use_custom_prompt") and model.use_custom_prompt(dataset.dataset_name):
            struct = model.build_prompt(line, dataset=dataset.dataset_name)
        else:
            struct = dataset.build_prompt(line)
        answers[line["index"]] = model.generate(message=struct, dataset=dataset.dataset_name)
    return model, answers


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "scene.png"
    Image.fromarray((np.random.default_rng(0).random((90, 140, 3)) * 255).astype(np.uint8)).save(path)
    return path


def test_adapter_answers_a_fake_vlmevalkit_harness(pipe, fake_vlmeval, image_path):
    register("Cheers", model_path="unused", pipeline=pipe, max_new_tokens=5)
    rows = [
        {"index": 0, "image_path": str(image_path), "question": "What color is the circle?"},
        {"index": 1, "image_path": None, "question": "What is 2 plus 2?"},
    ]
    model, answers = infer_data("Cheers", fake_vlmeval, FakeDataset(rows))
    assert isinstance(model, CheersVLM) and model.INTERLEAVE is False and model.INSTALL_REQ is False
    assert model.use_custom_prompt("MMBench_DEV_EN") is False
    assert set(answers) == {0, 1} and all(isinstance(a, str) for a in answers.values())
    # the image goes through the pipeline's own preprocessing: same answer as asking the pipeline directly
    direct = pipe.chat(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": rows[0]["question"]}]}],
        images=[load_image(image_path)],
        max_new_tokens=5,
    )
    assert answers[0] == direct.texts[0]
    # text-only questions get the release's random dummy image, seeded: answers repeat
    assert model.generate(rows[1]["question"], dataset="FakeBench") == answers[1]
    assert model.dump_image({"image_path": "x.png"}, "FakeBench") == ["x.png"]


def test_message_forms_and_errors(pipe, image_path):
    model = CheersVLM(pipeline=pipe, max_new_tokens=3)
    as_dicts = model.generate(
        [{"type": "image", "value": str(image_path)}, {"type": "text", "value": "Describe."}]
    )
    assert model.generate([str(image_path), "Describe."]) == as_dicts  # a list of str: paths are images
    multi = [
        {
            "role": "user",
            "content": [{"type": "image", "value": str(image_path)}, {"type": "text", "value": "Hi"}],
        },
        {"role": "assistant", "content": [{"type": "text", "value": "Hello"}]},
        {"role": "user", "content": [{"type": "text", "value": "Which colour?"}]},
    ]
    assert isinstance(model.chat_inner(multi, dataset="MTBench"), str)
    with pytest.raises(ValueError, match="text"):
        model.generate([{"type": "image", "value": str(image_path)}])
    with pytest.raises(ValueError, match="'video'"):
        model.generate([{"type": "video", "value": "a.mp4"}, {"type": "text", "value": "?"}])


def test_launcher_registers_and_runs_run_py(pipe, fake_vlmeval, tmp_path, capsys):
    save_pretrained(pipe.model, tmp_path / "ckpt")
    pipe.processor.save_pretrained(tmp_path / "ckpt")
    run_py = tmp_path / "run.py"  # a stand-in for VLMEvalKit's run.py
    run_py.write_text(
        "import sys\n"
        "from vlmeval.config import supported_VLM\n"
        "name = sys.argv[sys.argv.index('--model') + 1]\n"
        "model = supported_VLM[name](max_new_tokens=3)\n"
        "print('ANSWER', repr(model.generate([{'type': 'text', 'value': 'What is 1 plus 1?'}], "
        "dataset='X')))\n"
    )
    assert (
        main(["--cheers-model", str(tmp_path / "ckpt"), str(run_py), "--data", "X", "--model", "Cheers"]) == 0
    )
    assert "ANSWER '" in capsys.readouterr().out
    assert main(["--data", "X"]) == 2
