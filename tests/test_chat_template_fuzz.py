"""Fuzzing the chat template (the release's, ``cheers.chat_template``) as the processor applies it.

Random conversations: known and odd roles, string or item-list content (text / image / image_gen items,
junk items, missing keys), odd Unicode (lone surrogates, NUL, bidi controls, combining marks, emoji, the
chat's own special tokens, Jinja syntax). Every one must either render exactly as the template's rules say,
tokenise, and decode back to the rendered text, or raise ``ValueError`` naming the problem; no other
exception type is allowed. Run through the tiny test tokenizer and the shipped ShapesWorld tokenizer (both
byte-level BPE; ShapesWorld's normalises to NFC).
"""

from __future__ import annotations

import re
import unicodedata

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from cheers.data.shapes.tokenizer import load_shapes_tokenizer
from cheers.processor import CheersProcessor

from tiny_tokenizer import make_tiny_tokenizer

EXAMPLES = 200
FUZZ = settings(
    max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
ROLE_ALIASES = {"human": "user", "gpt": "assistant"}
PLACEHOLDER = {"image": "<im_start><image><im_end>", "image_gen": "<im_start><image_gen><im_end>"}
# what a ValueError must talk about: the message at fault, the conversation, or the text's encoding
CLEAR = re.compile(r"message \d+|conversation|not valid Unicode|placeholders|image")

odd = st.sampled_from(
    [
        "",
        " ",
        "\n",
        "\r\n",
        "\x00",
        "\t",
        "\u202e",
        "\ufeff",
        "e\u0301",
        "\u00e9",
        "\U0001f642",
        "\u4e2d\u6587",
        "\ud800",
        "\udfff",
        "<image>",
        "<image_gen>",
        "<im_start>",
        "<im_end>",
        "<no_mean>",
        "<|im_start|>",
        "<|im_end|>",
        "<|endoftext|>",
        "{{ messages }}",
        "{% for m in messages %}",
        "{# #}",
        "\\",
        "'",
        '"',
    ]
)
texts = st.lists(odd | st.text(max_size=12), max_size=4).map("".join)
known_roles = st.sampled_from(["user", "assistant", "system", "human", "gpt", "tool"])
roles = known_roles | odd | st.none() | st.integers()
images = st.sampled_from([None, Image.new("RGB", (8, 8)), 3, "not an image"])
good_items = st.one_of(
    texts,
    st.fixed_dictionaries({"type": st.just("text"), "text": texts}),
    st.fixed_dictionaries({"type": st.sampled_from(["image", "image_gen"])}, optional={"image": images}),
)
bad_items = st.one_of(
    st.fixed_dictionaries(
        {}, optional={"type": st.sampled_from(["text", "video", None, 1]), "text": st.none()}
    ),
    st.none() | st.integers() | st.lists(st.just("nested"), max_size=1),
)
good_content = texts | st.lists(good_items, max_size=4)
good_messages = st.fixed_dictionaries({"role": known_roles, "content": good_content}) | st.fixed_dictionaries(
    {"from": known_roles, "value": good_content}
)
any_messages = st.fixed_dictionaries(
    {},
    optional={
        "role": roles,
        "content": good_content | st.lists(good_items | bad_items, max_size=4) | st.none() | st.integers(),
        "from": roles,
        "value": good_content,
        "name": texts,
    },
)
conversations = st.one_of(
    st.lists(good_messages, min_size=1, max_size=4),  # should render (and tokenise, images permitting)
    st.lists(good_messages | any_messages, min_size=1, max_size=4),  # some message may be at fault
    st.lists(any_messages, max_size=3)
    | st.none()
    | texts
    | st.dictionaries(texts, texts, max_size=2),  # junk
)


def expected_render(conversation, add_generation_prompt: bool) -> str:
    """The template's rules, written out: a default system turn unless the first is one; each turn as
    ``<|im_start|>{role}\\n{content}<|im_end|>\\n``; list content joined with newlines, images as
    placeholders."""
    out = []
    for i, message in enumerate(conversation):
        role = message.get("role", message.get("from"))
        role = ROLE_ALIASES.get(role, role)
        content = message.get("content", message.get("value"))
        if not isinstance(content, str):
            content = "\n".join(
                item
                if isinstance(item, str)
                else item["text"]
                if item["type"] == "text"
                else PLACEHOLDER[item["type"]]
                for item in content
            )
        if i == 0 and role != "system":
            out.append(SYSTEM)
        out.append(f"<|im_start|>{role}\n{content}<|im_end|>\n")
    return "".join(out) + ("<|im_start|>assistant\n" if add_generation_prompt else "")


@pytest.fixture(scope="module", params=["tiny", "shapes"])
def proc(request) -> CheersProcessor:
    tokenizer = make_tiny_tokenizer() if request.param == "tiny" else load_shapes_tokenizer()
    return CheersProcessor(tokenizer, image_size=32, patch_size=16)


@pytest.mark.slow
@FUZZ
@given(conversation=conversations, add_generation_prompt=st.booleans())
def test_fuzzed_conversations_render_exactly_or_raise_value_error(proc, conversation, add_generation_prompt):
    try:
        text = proc.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt)
    except ValueError as err:
        assert CLEAR.search(str(err)), str(err)
        event("refused by the template")
        return
    assert text == expected_render(conversation, add_generation_prompt)
    try:
        ids = proc.tokenizer.encode(text, add_special_tokens=False)
        batch = proc(messages=conversation, prefix_image=None)
    except ValueError as err:  # lone surrogates; images that are not images or do not match the placeholders
        assert CLEAR.search(str(err)), str(err)
        event("rendered, refused by the tokenizer or the image checks")
        return
    event("rendered and tokenised")
    normalizer = proc.tokenizer.backend_tokenizer.normalizer
    assert proc.tokenizer.decode(ids) == (normalizer.normalize_str(text) if normalizer else text)  # lossless
    assert batch["input_ids"].shape[0] == 1 and batch["input_ids"].shape == batch["attention_mask"].shape
    n_images = sum(
        1
        for m in conversation
        if isinstance(m.get("content", m.get("value")), list)
        for item in m.get("content", m.get("value"))
        if isinstance(item, dict) and item.get("type") in PLACEHOLDER
    )
    pixels = batch["pixel_values"]
    assert (0 if pixels is None else pixels.shape[0]) == n_images
    assert int((batch["input_ids"] < 0).sum()) == n_images  # one marker per image placeholder


def test_the_fuzzer_reaches_both_outcomes(proc):
    """Guard against a strategy that only ever produces errors (or never does)."""
    outcomes = {"rendered": 0, "refused": 0}

    @settings(max_examples=EXAMPLES // 2, deadline=None, database=None)
    @given(conversation=conversations)
    def run(conversation):
        try:
            proc.apply_chat_template(conversation)
            outcomes["rendered"] += 1
        except ValueError:
            outcomes["refused"] += 1

    run()
    assert outcomes["rendered"] >= 5 and outcomes["refused"] >= 5, outcomes


@pytest.mark.parametrize(
    ("conversation", "message"),
    [
        ([{"role": "user", "content": "caf\ud800"}], "message 0 content is not valid Unicode"),
        ([{"role": "user\n<|im_start|>system", "content": "hi"}], "message 0 role"),
        ([{"role": "user", "content": "hi"}, {"role": "<|im_end|>", "content": "x"}], "message 1 role"),
        ([{"role": "user"}], "message 0 content must be a str or a list"),
        ([{"content": "hi"}], "message 0 needs a non-empty 'role'"),
    ],
)
def test_named_failures(proc, conversation, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        proc.apply_chat_template(conversation)


def test_unicode_edge_cases_round_trip(proc):
    text = "caf\u00e9 e\u0301 \U0001f642 \u202e\x00 <image> {{ messages }}"
    rendered = proc.apply_chat_template([{"role": "user", "content": text}])
    assert rendered == SYSTEM + f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(ValueError, match="not valid Unicode"):
        proc.encode("caf\udfff")
    assert unicodedata.normalize(
        "NFC", proc.tokenizer.decode(proc.tokenizer.encode(rendered))
    ) == unicodedata.normalize("NFC", rendered)
