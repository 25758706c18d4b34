"""CheersProcessor: chat template, markers, image geometry, batching, labels, CFG ids, fuzzing."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from cheers import processor as processor_module
from cheers.parity_fixtures import load_cases, reference_dir
from cheers.processor import CheersProcessor

from tiny_tokenizer import RELEASE_CHAT_TEMPLATE, make_tiny_tokenizer

RELEASE_DIR = Path(
    os.environ.get(
        "CHEERS_RELEASE_TOKENIZER_DIR", str(Path(__file__).resolve().parents[2] / "shared/reference/official")
    )
)
SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
IMG = "<im_start><image><im_end>"
GEN = "<im_start><image_gen><im_end>"


def make_processor(image_size: int = 32, **kwargs) -> CheersProcessor:
    return CheersProcessor(make_tiny_tokenizer(**kwargs), image_size=image_size, patch_size=16)


@pytest.fixture(scope="module")
def proc() -> CheersProcessor:
    return make_processor()


def solid(width: int, height: int, colour=(255, 128, 0)) -> Image.Image:
    return Image.new("RGB", (width, height), colour)


def rgb(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).view(3, 1, 1) / 255.0


# --------------------------------------------------------------------------------------------------
# chat template


def test_chat_template_matches_the_release_layout(proc):
    text = proc.apply_chat_template([{"role": "user", "content": "An apple."}])
    assert text == SYSTEM + "<|im_start|>user\nAn apple.<|im_end|>\n<|im_start|>assistant\n"
    no_prompt = proc.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=False)
    assert no_prompt == SYSTEM + "<|im_start|>user\nx<|im_end|>\n"
    own_system = [{"role": "system", "content": "S"}, {"from": "human", "value": "hi"}]
    assert proc.apply_chat_template(own_system) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_structured_content_becomes_placeholders(proc):
    content = [{"type": "image"}, {"type": "text", "text": "What is it?"}]
    text = proc.apply_chat_template([{"role": "user", "content": content}])
    assert text == SYSTEM + f"<|im_start|>user\n{IMG}\nWhat is it?<|im_end|>\n<|im_start|>assistant\n"
    gen = proc.apply_chat_template([{"role": "assistant", "content": [{"type": "image_gen"}]}], False)
    assert gen.endswith(f"<|im_start|>assistant\n{GEN}<|im_end|>\n")


def test_release_template_is_the_fallback_and_matches_the_release_file():
    assert processor_module.RELEASE_CHAT_TEMPLATE == RELEASE_CHAT_TEMPLATE
    bare = make_processor(chat_template=None)
    assert bare.tokenizer.chat_template == RELEASE_CHAT_TEMPLATE
    config = RELEASE_DIR / "tokenizer_config.json"
    if config.is_file():
        assert json.loads(config.read_text())["chat_template"] == RELEASE_CHAT_TEMPLATE


# --------------------------------------------------------------------------------------------------
# markers and images in __call__


def test_placeholders_become_markers(proc):
    s = proc.special
    text = f"a {IMG} b {GEN} c"
    out = proc(text=text, images=[solid(8, 8), solid(8, 8)])
    ids = out["input_ids"][0].tolist()
    assert ids.count(-200) == 1 and ids.count(-300) == 1
    assert s.image not in ids and s.image_gen not in ids
    i = ids.index(-200)
    assert ids[i - 1 : i + 2] == [s.im_start, -200, s.im_end]
    assert ids == proc.encode(text)
    assert out["input_ids"].dtype == torch.int64
    assert out["pixel_values"].shape == (2, 3, 32, 32)
    assert out["grid_hws"].tolist() == [[2, 2], [2, 2]]


def test_count_mismatch_names_both_counts(proc):
    with pytest.raises(ValueError, match=r"2 <image> and 0 <image_gen>.*but 1 images"):
        proc(text=f"{IMG}{IMG}", images=[solid(4, 4)])
    with pytest.raises(ValueError, match="but 1 images"):
        proc(text="no placeholder", images=solid(4, 4))
    with pytest.raises(ValueError, match="0 <image>.*but 0 images"):
        proc(text=GEN)


def test_text_only_rows_get_a_seeded_dummy_prefix(proc):
    def run(seed):
        return proc(
            text=["plain text", f"{IMG} hi"],
            images=[solid(4, 4)],
            generator=torch.Generator().manual_seed(seed),
        )

    a, b, c = run(0), run(0), run(1)
    assert a["pixel_values"].shape == (2, 3, 32, 32)
    assert torch.equal(a["pixel_values"], b["pixel_values"])
    assert not torch.equal(a["pixel_values"][0], c["pixel_values"][0])
    assert torch.equal(a["pixel_values"][0], proc.dummy_image(torch.Generator().manual_seed(0)))
    assert torch.equal(a["pixel_values"][1], proc.preprocess_understanding(solid(4, 4)))
    assert proc(text="plain", prefix_image=None)["pixel_values"] is None
    explicit = torch.rand(3, 32, 32)
    assert torch.equal(proc(text="plain", prefix_image=explicit)["pixel_values"][0], explicit)
    # The release's images=[None] means "no image".
    assert proc(text="plain", images=[None], prefix_image=None)["grid_hws"] is None


def test_dummy_image_is_deterministic_and_in_range(proc):
    a = proc.dummy_image(torch.Generator().manual_seed(3))
    assert a.shape == (3, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, proc.dummy_image(torch.Generator().manual_seed(3)))
    assert 0.0 <= a.min() and a.max() <= 1.0 and a.std() > 0.01


def test_batched_generate_puts_im_start_at_each_rows_end(proc):
    s = proc.special
    texts = [
        proc.apply_chat_template([{"role": "user", "content": p}]) for p in ("A cat.", "A very long prompt.")
    ]
    out = proc(text=texts, mode="generate", prefix_image=None)
    ids, mask = out["input_ids"], out["attention_mask"]
    lengths = [len(proc.encode(t)) + 1 for t in texts]
    assert lengths[0] < lengths[1] == ids.shape[1]
    for row, n in enumerate(lengths):
        assert ids[row, n - 1] == s.im_start
        assert mask[row].tolist() == [1] * n + [0] * (ids.shape[1] - n)
        assert (ids[row, n:] == s.pad).all()
    left = proc(text=texts, mode="generate", prefix_image=None, padding_side="left")
    assert (left["input_ids"][:, -1] == s.im_start).all()
    assert left["attention_mask"][0].tolist() == [0] * (lengths[1] - lengths[0]) + [1] * lengths[0]
    # Not doubled when the text already ends with <im_start>, and not added in "understand" mode.
    assert (
        proc(text=texts[0] + "<im_start>", mode="generate", prefix_image=None)["input_ids"].shape[1]
        == lengths[0]
    )
    assert proc(text=texts[0], prefix_image=None)["input_ids"][0, -1] != s.im_start


def test_edit_mode_needs_one_image_per_row(proc):
    out = proc(text=f"{IMG}\nMake it blue.", images=solid(8, 4), mode="edit")
    assert out["input_ids"][0, -1] == proc.special.im_start
    with pytest.raises(ValueError, match="exactly one <image>"):
        proc(text="no image", mode="edit")


def test_messages_batch_and_inline_images(proc):
    conv = [
        {"role": "user", "content": [{"type": "image", "image": solid(8, 8)}, {"type": "text", "text": "Hi"}]}
    ]
    out = proc(
        messages=[conv, [{"role": "user", "content": "Text"}]], generator=torch.Generator().manual_seed(0)
    )
    assert out["input_ids"].shape[0] == 2 and out["pixel_values"].shape[0] == 2
    with pytest.raises(ValueError, match="both inside messages and as images="):
        proc(messages=conv, images=solid(8, 8))
    with pytest.raises(ValueError, match="exactly one of text= and messages="):
        proc()


# --------------------------------------------------------------------------------------------------
# image geometry and normalisation


def test_understanding_resize_and_pad_geometry():
    out = make_processor(512).preprocess_understanding(solid(100, 50))
    assert out.shape == (3, 512, 512) and out.dtype == torch.float32
    assert (out[:, :128] == 0).all() and (out[:, 384:] == 0).all()  # black bars: 512x256 content centred
    assert torch.allclose(out[:, 128:384], rgb([255, 128, 0]).expand(3, 256, 512))
    tall = make_processor(64).preprocess_understanding(solid(30, 70))  # 27 wide: pad 37 = 18 left + 19 right
    assert (tall[:, :, :18] == 0).all() and (tall[:, :, 45:] == 0).all()
    assert torch.allclose(tall[:, :, 18:45], rgb([255, 128, 0]).expand(3, 64, 27))


def test_understanding_matches_pil_reference():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 24, 3), dtype=np.uint8))
    expected = np.zeros((64, 64, 3), np.uint8)
    expected[:, 13 : 13 + 38] = np.asarray(img.resize((38, 64), Image.Resampling.BICUBIC))
    got = make_processor(64).preprocess_understanding(img)
    assert torch.equal(got, torch.from_numpy(expected).permute(2, 0, 1).float() / 255)


def test_generation_scales_short_side_and_centre_crops():
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (50, 100, 3), dtype=np.uint8))
    expected = np.asarray(img.resize((64, 32), Image.Resampling.BICUBIC).crop((16, 0, 48, 32)))
    got = make_processor(32).preprocess_generation(img)
    assert got.shape == (3, 32, 32)
    assert torch.equal(got, torch.from_numpy(expected.copy()).permute(2, 0, 1).float() / 255)
    assert make_processor(32).preprocess_generation(solid(10, 90)).shape == (3, 32, 32)


def test_modes_are_normalised_to_rgb(proc):
    rng = np.random.default_rng(2)
    colours = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    base = proc.preprocess_understanding(Image.fromarray(colours))
    alpha = np.concatenate([colours, rng.integers(0, 256, (32, 32, 1), dtype=np.uint8)], axis=-1)
    assert torch.equal(proc.preprocess_understanding(Image.fromarray(alpha)), base)  # alpha dropped
    assert torch.equal(proc.preprocess_understanding(colours), base)  # numpy HWC uint8
    assert torch.equal(proc.preprocess_understanding(torch.from_numpy(colours).permute(2, 0, 1)), base)
    grey = proc.preprocess_understanding(Image.fromarray(colours[..., 0]))
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[0], base[0])
    palette = Image.fromarray(colours).convert("P")
    palette.info["transparency"] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(
            proc.preprocess_understanding(palette), proc.preprocess_understanding(palette.convert("RGBA"))
        )
    sixteen = Image.fromarray(np.array([[0, 32768], [65535, 65535]], dtype=np.uint16))
    assert sixteen.mode == "I;16"
    out = make_processor(16).preprocess_understanding(sixteen.resize((16, 16), Image.Resampling.NEAREST))
    assert out.min() == 0 and out.max() == 1 and 0.45 < out[0, 0, 15] < 0.55  # scaled, not saturated
    floats = torch.rand(3, 32, 32)
    assert torch.equal(proc.preprocess_understanding(floats), floats)  # same size: exact, no 8-bit rounding


@pytest.mark.parametrize(
    "bad, message",
    [
        (Image.new("RGB", (0, 5)), "zero size"),
        (np.zeros((0, 5, 3), np.uint8), "zero size"),
        (np.zeros((4, 4, 5), np.uint8), "1-4 channels"),
        (torch.zeros(1, 3, 4, 4), "1-4 channels"),
        (torch.zeros(3, 4, 4, dtype=torch.int64), "uint8 or floating"),
        (torch.full((3, 4, 4), 2.0), r"\[0, 1\]"),
        (torch.full((3, 4, 4), float("nan")), "NaN"),
        ("image.png", "PIL image, numpy array or torch tensor"),
        ({"image": 1}, "PIL image, numpy array or torch tensor"),
    ],
)
def test_bad_images_raise_value_errors(proc, bad, message):
    with pytest.raises(ValueError, match=message):
        proc.preprocess_understanding(bad)
    with pytest.raises(ValueError, match=message):
        proc(text=IMG, images=[bad])


# --------------------------------------------------------------------------------------------------
# training labels and CFG ids


def test_labels_follow_the_release_rule(proc):
    s, enc = proc.special, proc.tokenizer.encode
    record = {
        "id": "u1",
        "image": "a.png",
        "conversations": [{"from": "human", "value": f"{IMG}\nWhat?"}, {"from": "gpt", "value": "Red."}],
    }
    ids, labels = proc.encode_conversation(record)
    ign = [-100]
    sys_ids = [
        s.chat_start,
        *enc("system"),
        s.newline,
        *enc("You are a helpful assistant."),
        s.chat_end,
        s.newline,
    ]
    sys_lab = [
        s.chat_start,
        *ign * len(enc("system")),
        s.newline,
        *ign * len(enc("You are a helpful assistant.")),
        s.chat_end,
        s.newline,
    ]
    user_ids = [
        s.chat_start,
        *enc("user"),
        s.newline,
        s.im_start,
        -200,
        s.im_end,
        s.newline,
        *enc("What?"),
        s.chat_end,
        s.newline,
    ]
    user_lab = [
        s.chat_start,
        *ign * len(enc("user")),
        s.newline,
        s.im_start,
        -100,
        s.im_end,
        s.newline,
        *ign * len(enc("What?")),
        s.chat_end,
        s.newline,
    ]
    bot_ids = [s.chat_start, *enc("assistant"), s.newline, *enc("Red."), s.chat_end, s.newline]
    assert ids.tolist() == sys_ids + user_ids + bot_ids
    assert labels.tolist() == sys_lab + user_lab + bot_ids
    whole = proc.apply_chat_template(record["conversations"], add_generation_prompt=False)
    assert ids.tolist() == proc.encode(whole)  # turn-by-turn tokenisation equals whole-text tokenisation


def test_generation_record_keeps_the_gen_marker_in_labels(proc):
    s = proc.special
    record = {
        "id": "g",
        "image": "t.png",
        "conversations": [
            {"from": "human", "value": "An apple.\nBased on the above description, generate an image."},
            {"from": "gpt", "value": GEN},
        ],
    }
    ids, labels = proc.encode_conversation(record)
    tail = [s.im_start, -300, s.im_end, s.chat_end, s.newline]
    assert ids.tolist()[-5:] == tail and labels.tolist()[-5:] == tail
    dropped = proc.cfg_dropout_ids(ids)
    assert set(dropped.tolist()) == {s.no_mean, s.im_start, -300, s.im_end}
    assert set(proc.unconditional_ids(ids).tolist()) == {s.no_mean, s.im_start, s.im_end}
    with pytest.raises(ValueError, match="names 2 image paths"):
        proc.encode_conversation({**record, "image": "a.png, b.png"})


REFERENCE_CASES = reference_dir(Path(__file__).parent / "fixtures/reference/config_a")


@pytest.mark.skipif(not (REFERENCE_CASES / "cases.json").is_file(), reason="reference vectors not present")
@pytest.mark.parametrize("case", ["train_gen", "train_und", "train_text_only"])
def test_label_rule_reproduces_the_reference_labels(case):
    reference = load_cases(REFERENCE_CASES)
    s, tensors = reference.special, reference.tensors
    ids = tensors[f"{case}/in/input_ids"][0].tolist()
    labels = tensors[f"{case}/in/labels"][0].tolist()
    start = len(ids) - 1 - ids[::-1].index(s.chat_start)  # the assistant turn is the last one
    prompt = [t if t in s.prompt_label_ids else -100 for t in ids[:start]]  # so -200 there is -100
    assert labels == prompt + ids[start:]


def test_unconditional_prompt_of_a_processor_batch(proc):
    s = proc.special
    out = proc(text=[f"{IMG} edit", "short"], images=[solid(4, 4)], mode="generate", prefix_image=None)
    uncond = proc.unconditional_ids(out["input_ids"])
    keep = torch.isin(out["input_ids"], torch.tensor([s.im_start, s.im_end, -200]))
    assert torch.equal(uncond[keep], out["input_ids"][keep])
    assert (uncond[~keep] == s.no_mean).all()


# --------------------------------------------------------------------------------------------------
# persistence


def test_save_and_load_round_trip(proc, tmp_path):
    proc.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert config["scale_resolution"] == 32 and config["patch_size"] == 16
    loaded = CheersProcessor.from_pretrained(tmp_path)
    assert loaded.special == proc.special and loaded.image_size == 32
    text = proc.apply_chat_template([{"role": "user", "content": f"{IMG} hello"}])
    assert loaded.encode(text) == proc.encode(text)
    used = set(proc.special.to_dict().values())
    config["cheers_special_tokens"]["no_mean"] = next(i for i in range(100) if i not in used)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="records special tokens"):
        CheersProcessor.from_pretrained(tmp_path)


def test_constructor_validates_sizes():
    with pytest.raises(ValueError, match="not a multiple of patch_size=16"):
        CheersProcessor(make_tiny_tokenizer(), image_size=100)


# --------------------------------------------------------------------------------------------------
# fuzzing: a valid output or a ValueError, never another exception

FRAGMENTS = [
    "a",
    " ",
    "\n",
    "word",
    "é",
    "🍎",
    IMG,
    GEN,
    "<image>",
    "<im_start>",
    "<im_end>",
    "<no_mean>",
    "<|im_end|>",
    "<|endoftext|>",
]
texts = st.lists(st.sampled_from(FRAGMENTS), max_size=8).map("".join) | st.text(max_size=20)


@st.composite
def image_likes(draw):
    h, w = draw(st.integers(0, 40)), draw(st.integers(0, 40))
    kind = draw(
        st.sampled_from(
            ["pil", "pil_l", "pil_rgba", "pil_i16", "np_u8", "np_f", "torch_f", "torch_u8", "junk"]
        )
    )
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    data = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    if kind == "pil":
        return Image.fromarray(data) if h and w else Image.new("RGB", (w, h))
    if kind == "pil_l":
        return Image.fromarray(data[..., 0]) if h and w else Image.new("L", (w, h))
    if kind == "pil_rgba":
        return Image.new("RGBA", (w, h), (1, 2, 3, 4))
    if kind == "pil_i16":
        return Image.fromarray(data[..., 0].astype(np.uint16) * 257) if h and w else Image.new("I;16", (w, h))
    if kind == "np_u8":
        return data[..., : draw(st.integers(1, 5))]
    if kind == "np_f":
        return data.astype(np.float32) / draw(st.sampled_from([255.0, 100.0]))
    if kind == "torch_f":
        return torch.from_numpy(data).permute(2, 0, 1).float() / 255
    if kind == "torch_u8":
        return torch.from_numpy(data).permute(2, 0, 1)
    return draw(st.sampled_from([None, 3, "x", [1, 2], {"a": 1}]))


FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(
    text=st.lists(texts, min_size=1, max_size=3),
    images=st.lists(image_likes(), max_size=3),
    mode=st.sampled_from(["understand", "generate", "edit"]),
)
def test_fuzz_call_with_text(proc, text, images, mode):
    try:
        out = proc(text=text, images=images, mode=mode, generator=torch.Generator().manual_seed(0))
    except ValueError:
        return
    ids, mask, pixels = out["input_ids"], out["attention_mask"], out["pixel_values"]
    assert ids.shape == mask.shape and ids.shape[0] == len(text)
    n_markers = int(((ids == -200) | (ids == -300)).sum())
    n_prefix = sum(1 for row in ids if not ((row == -200) | (row == -300)).any())
    assert (0 if pixels is None else pixels.shape[0]) == n_markers + n_prefix
    if pixels is not None:
        assert pixels.shape[1:] == (3, 32, 32) and 0 <= pixels.min() and pixels.max() <= 1


json_like = st.recursive(
    st.none()
    | st.integers()
    | st.text(max_size=8)
    | st.sampled_from(["user", "assistant", "system", "image", "text"]),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(
            st.sampled_from(["role", "content", "from", "value", "type", "text"]), children, max_size=3
        )
    ),
    max_leaves=10,
)
roles = st.sampled_from(["user", "assistant", "human", "gpt", "system"])
items = st.sampled_from([{"type": "text", "text": "hi"}, "s", {"type": "image_gen"}])
valid_messages = st.lists(
    st.fixed_dictionaries({"role": roles, "content": texts | st.lists(items, max_size=3)}),
    min_size=1,
    max_size=3,
)
messages = valid_messages | st.lists(
    st.fixed_dictionaries(
        {"role": roles | json_like},
        optional={"content": texts | st.lists(items | st.just({"type": "image"}) | json_like, max_size=3)},
    )
    | json_like,
    max_size=3,
)


@FUZZ
@given(conversation=messages | json_like)
def test_fuzz_messages(proc, conversation):
    try:
        out = proc(messages=conversation, prefix_image=None)
    except ValueError:
        return
    assert out["input_ids"].ndim == 2


@FUZZ
@given(image=image_likes(), generation=st.booleans())
def test_fuzz_image_preprocessing(proc, image, generation):
    try:
        out = (proc.preprocess_generation if generation else proc.preprocess_understanding)(image)
    except ValueError:
        return
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    assert 0 <= out.min() and out.max() <= 1
