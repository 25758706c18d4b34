"""The pipeline calls the server batches onto: a batch with one generator per row gives each row what it
gives alone (chat and edit), and closing a streamed answer stops decoding and frees the model."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

import cheers.pipeline as pipeline_module

from model_helpers import tiny_pipeline


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline(seed=5)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def photo(seed: int) -> Image.Image:
    return Image.fromarray((np.random.default_rng(seed).random((96, 80, 3)) * 255).astype(np.uint8))


def conversation(text: str, image: Image.Image | None = None) -> list[dict]:
    content = ([{"type": "image", "image": image}] if image is not None else []) + [
        {"type": "text", "text": text}
    ]
    return [{"role": "user", "content": content}]


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
def test_batched_chat_with_one_generator_per_row_equals_single_runs(pipe, sampled):
    convs = [
        conversation("What is it?", photo(0)),
        conversation("hello there, how are you"),
        conversation("hi"),
    ]
    kw = dict(max_new_tokens=5, do_sample=sampled, temperature=0.9)
    batched = pipe.chat(convs, generator=[gen(10), gen(11), gen(12)], **kw)
    for i, conv in enumerate(convs):
        alone = pipe.chat([conv], generator=[gen(10 + i)], **kw)
        assert batched.token_ids[i] == alone.token_ids[0]
        assert batched.texts[i] == alone.texts[0]
    single = pipe.chat(
        convs[1], generator=gen(11), **kw
    )  # one generator (dummy image and sampling): the same
    assert single.token_ids[0] == batched.token_ids[1]


def test_chat_generator_list_checks(pipe):
    with pytest.raises(ValueError, match="2 generators for 1"):
        pipe.chat([conversation("hi")], generator=[gen(0), gen(1)], max_new_tokens=2)
    with pytest.raises(ValueError, match="inside the messages"):
        pipe.chat([conversation("hi")], images=[photo(0)], generator=[gen(0)], max_new_tokens=2)


def test_batched_edit_equals_single_runs(pipe):
    images, texts = [photo(1), photo(2)], ["make it blue", "add a red circle in the corner"]
    kw = dict(num_inference_steps=3, guidance_scale=2.0, output_type="pt")
    batched = pipe.edit(images, texts, generator=[gen(3), gen(4)], **kw)
    assert len(batched.images) == 2 and batched.prompts == texts
    for i in range(2):
        alone = pipe.edit(images[i], texts[i], generator=gen(3 + i), **kw).images[0]
        assert torch.allclose(batched.images[i], alone, atol=1e-5)
    same = pipe.edit([images[0], images[0]], "make it blue", generator=[gen(3), gen(5)], **kw).images
    assert torch.allclose(same[0], batched.images[0], atol=1e-5) and not torch.allclose(same[0], same[1])
    with pytest.raises(ValueError, match="2 instructions for 3 images"):
        pipe.edit([images[0]] * 3, texts, **kw)


def test_closing_a_stream_stops_decoding_and_waits_for_it(pipe, monkeypatch):
    tokens = []
    real = pipeline_module.generate

    def counting(*args, token_callback=None, **kwargs):
        def count(row, tok):
            tokens.append(tok)
            time.sleep(0.01)  # slower than the reader, so closing lands mid-answer
            token_callback(row, tok)

        return real(*args, token_callback=count if token_callback else None, **kwargs)

    monkeypatch.setattr(pipeline_module, "generate", counting)
    conv = conversation("tell me a long story")
    full = pipe.chat(conv, max_new_tokens=40, do_sample=True, generator=gen(0))
    if len(full.token_ids[0]) < 10:
        pytest.skip("this tiny model ends its answer too soon to see an early stop")
    before = threading.active_count()
    stream = pipe.chat(conv, max_new_tokens=40, do_sample=True, generator=gen(0), stream=True)
    tokens.clear()
    next(stream, None)
    stream.close()
    assert threading.active_count() == before  # the decoding thread has ended
    assert len(tokens) < len(full.token_ids[0])


def test_a_server_answer_ends_where_the_model_would_start_an_image():
    from cheers.serve.tasks import ChatTask, run_batch

    hungry = tiny_pipeline(seed=6)  # its LM head always wants an image next
    model = hungry.model
    head = torch.nn.Linear(model.config.text.hidden_size, model.config.text.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[model.special.im_start] = 1e4
    model.lm_head = head
    out = hungry.chat(conversation("hi"), max_new_tokens=50, stop_at_image=True)
    assert out.token_ids[0][0] == model.special.im_start and len(out.token_ids[0]) <= 2 and out.texts[0] == ""
    [[result]] = run_batch(hungry, [ChatTask(conversation("hi"), 1, 0, max_tokens=50)])
    assert (result.text, result.finish_reason, result.completion_tokens) == ("", "stop", 0)
