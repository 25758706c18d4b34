"""The web demo: its handlers called directly, the `cheers web` parser, and the app driven in headless
Chromium.

The browser test needs gradio, selenium, and Chromium with its driver (Debian: ``apt-get install chromium
chromium-driver``); without them it is skipped. Set ``CHEERS_WEB_SCREENSHOT=path.png`` to also keep a
screenshot of the Generate tab there (docs/images/web-demo.png was made that way).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cheers.pipeline import CheersPipeline, SamplingDefaults
from cheers.processor import CheersProcessor
from cheers.web import DEFAULT_HOST, EMPTY_ANSWER, add_web_parser, cmd_web

from model_helpers import tiny_model
from tiny_tokenizer import make_tiny_tokenizer


@pytest.fixture(scope="module")
def pipe():
    processor = CheersProcessor(make_tiny_tokenizer(), image_size=128, patch_size=16)
    model = tiny_model(seed=5)
    model.special = processor.special
    defaults = SamplingDefaults(num_inference_steps=2, edit_num_inference_steps=2)
    return CheersPipeline(model, processor, defaults, progress=False)


@pytest.fixture()
def handlers(pipe, tmp_path):
    pytest.importorskip("gradio")
    from cheers.web import DemoHandlers

    return DemoHandlers(pipe, max_steps=8, max_new_tokens=16, upload_roots=[tmp_path / "uploads"])


def photo(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.random.default_rng(0).random((40, 56, 3)) * 255).astype(np.uint8)).save(path)
    return path


# -- the command-line parser ---------------------------------------------------------------------------------
def parse(argv):
    parser = argparse.ArgumentParser(prog="cheers")
    add_web_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_web_parser_binds_localhost_by_default():
    args = parse(["web"])
    assert (args.host, args.port, args.model, args.share) == (DEFAULT_HOST, 7860, "default", False)
    assert args.func is cmd_web and args.max_concurrency == 1
    args = parse(
        [
            "web",
            "--model",
            "ckpt",
            "--port",
            "8001",
            "--host",
            "0.0.0.0",
            "--device",
            "cpu",
            "--dtype",
            "bfloat16",
        ]
    )
    assert (args.model, args.port, args.host, args.device, args.dtype) == (
        "ckpt",
        8001,
        "0.0.0.0",
        "cpu",
        "bfloat16",
    )
    for bad in (["web", "--port", "0"], ["web", "--port", "70000"], ["web", "--max-concurrency", "0"]):
        with pytest.raises(SystemExit):
            parse(bad)


# -- handlers, called directly -------------------------------------------------------------------------------
def test_generate_handler_returns_image_and_settings(handlers):
    image, settings = handlers.generate("two red circles", "", 2, 2.0, 0.5, 7, 128, 64)
    assert isinstance(image, Image.Image) and image.size == (128, 64)
    assert settings["prompt"] == "two red circles" and settings["seed"] == 7
    assert settings["num_inference_steps"] == 2 and settings["negative_prompt"] is None
    again, _ = handlers.generate(
        "two red circles", "", 2.0, 2.0, 0.5, 7.0, 128, 64
    )  # Gradio numbers as floats
    assert np.array_equal(np.asarray(image), np.asarray(again))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("red", "", 0, 2.0, 0.5, 0, 128, 128), "steps must be an integer in [1, 8]"),
        (("red", "", 9, 2.0, 0.5, 0, 128, 128), "steps must be an integer in [1, 8]"),
        (("red", "", 1.5, 2.0, 0.5, 0, 128, 128), "steps must be an integer"),
        (("red", "", 2, 2.0, 0.5, -1, 128, 128), "seed must be an integer"),
        (("  ", "", 2, 2.0, 0.5, 0, 128, 128), "prompt must not be empty"),
        (("red", "", 2, 2.0, 0.5, 0, 100, 128), "width must be a multiple of 32"),
        (("red", "", 2, -1.0, 0.5, 0, 128, 128), "guidance_scale must be a number"),
    ],
)
def test_bad_generate_input_raises_gr_error_with_the_message(handlers, args, message):
    import gradio as gr

    with pytest.raises(gr.Error) as info:
        handlers.generate(*args)
    assert message in str(info.value.message)


def test_uploads_are_read_only_from_the_upload_folder(handlers, tmp_path):
    import gradio as gr

    inside = photo(tmp_path / "uploads" / "cat.png")
    assert handlers.edit(str(inside), "make it blue", 2, 2.0, 0).size == (128, 128)
    outside = photo(tmp_path / "elsewhere.png")
    traversal = tmp_path / "uploads" / ".." / "elsewhere.png"
    for path in (outside, traversal, "/etc/passwd"):
        with pytest.raises(gr.Error, match="must be an uploaded file"):
            handlers.edit(str(path), "make it blue", 2, 2.0, 0)
    corrupt = tmp_path / "uploads" / "bad.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(gr.Error, match="not a readable image"):
        handlers.edit(str(corrupt), "make it blue", 2, 2.0, 0)
    with pytest.raises(gr.Error, match="please upload an image"):
        handlers.edit(None, "make it blue", 2, 2.0, 0)


def test_chat_handler_streams_and_keeps_the_conversation(handlers, pipe, tmp_path):
    import gradio as gr

    image = photo(tmp_path / "uploads" / "q.png")
    turns = list(handlers.chat("What is in the picture?", str(image), None, 6, 1.0, 3))
    display, state, textbox, image_after = turns[-1]
    assert textbox == "" and image_after is None  # the box and the image are cleared for the next message
    assert [m["role"] for m in display] == [
        "user",
        "user",
        "assistant",
    ]  # the image, the question, the answer
    expected = pipe.chat(
        [
            {
                "role": "user",
                "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}],
            }
        ],
        images=[Image.open(image)],
        max_new_tokens=6,
        do_sample=True,
        temperature=1.0,
        generator=torch.Generator().manual_seed(3),
    ).texts[0]
    assert display[-1]["content"] == (expected or EMPTY_ANSWER)
    assert len(state["messages"]) == 2 and len(state["images"]) == 1
    # a second turn sees the first; a failed turn leaves the conversation unchanged
    *_, (display2, state2, _, _) = handlers.chat("And the colour?", None, state, 4, 0.0, 0)
    assert len(state2["messages"]) == 4 and len(display2) == 5 and len(state["messages"]) == 2
    with pytest.raises(gr.Error, match="please type a question"):
        list(handlers.chat("   ", None, state2, 4, 0.0, 0))
    with pytest.raises(gr.Error, match="max new tokens must be an integer in"):
        list(handlers.chat("hi", None, state2, 1000, 0.0, 0))


def test_hfi_handler_draws_one_tile_per_step_and_a_plot(handlers):
    from matplotlib.figure import Figure

    image, strip, figure = handlers.hfi("a blue square", 3, 2.0, 0.5, 0)
    assert image.size == (128, 128) and isinstance(figure, Figure)
    assert strip.size[0] == 3 * 96 + 2 * 4 and strip.mode == "RGB"  # three 96-pixel tiles, 4-pixel gaps


def test_gate_strip_and_means():
    pytest.importorskip("matplotlib")
    from cheers.web_plots import gate_means, gate_strip

    maps = torch.zeros(40, 4, 8)
    maps[-1] = 1.0
    strip = gate_strip(maps, tile=32, max_tiles=5)  # a constant first map must not divide by zero
    assert strip.size[0] == 5 * 32 + 4 * 4
    first, last = np.asarray(strip)[4, 4], np.asarray(strip)[4, strip.size[0] - 5]
    assert not np.array_equal(first, last)  # step 1 (all 0) and step 40 (all 1) get different colours
    mean, mean_abs = gate_means(torch.tensor([[[-1.0, 1.0]], [[2.0, 2.0]]]))
    assert mean.tolist() == [0.0, 2.0] and mean_abs.tolist() == [1.0, 2.0]
    with pytest.raises(ValueError, match="must be"):
        gate_strip(torch.zeros(4, 4))


# -- the app in a real browser -------------------------------------------------------------------------------
def _browser_paths() -> tuple[str, str]:
    browser = next(
        (p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None
    )
    driver = shutil.which("chromedriver") or (
        "/usr/bin/chromedriver" if os.path.exists("/usr/bin/chromedriver") else None
    )
    if browser is None or driver is None:
        pytest.skip(
            "Chromium and chromedriver are not installed (Debian: apt-get install chromium chromium-driver)"
        )
    return browser, driver


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def browser():
    pytest.importorskip("selenium", reason="the browser test needs selenium (pip install selenium)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = _browser_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1280,1000",
        "--disable-extensions",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def served(pipe):
    pytest.importorskip("gradio")
    from cheers.web import launch

    demo = launch(
        pipe, port=_free_port(), prevent_thread_lock=True, quiet=True, max_new_tokens=12, max_file_size="1mb"
    )
    yield demo
    demo.close()


def test_served_demo_is_local_and_caps_uploads(served, tmp_path):
    httpx = pytest.importorskip("httpx")
    from gradio.route_utils import API_PREFIX

    from cheers.web import _upload_folder

    url = served.local_url.rstrip("/")
    assert url.startswith("http://127.0.0.1:")
    png = photo(tmp_path / "p.png").read_bytes()
    ok = httpx.post(
        f"{url}{API_PREFIX}/upload", files={"files": ("../../../../tmp/evil.png", png)}, timeout=30
    )
    assert ok.status_code == 200, ok.text
    stored = Path(ok.json()[0]).resolve()
    assert stored.is_relative_to(_upload_folder()) and stored.name == "evil.png"  # the name's path is dropped
    big = httpx.post(f"{url}{API_PREFIX}/upload", files={"files": ("big.png", b"0" * (2 << 20))}, timeout=30)
    assert big.status_code == 413


def _shown_image(driver, elem_id: str):
    """The (width, height) of a loaded <img> inside the component, or None while there is none."""
    return driver.execute_script(
        "const img = document.querySelector(arguments[0] + ' img');"
        "return img && img.getAttribute('src') && img.complete && img.naturalWidth > 0"
        "  ? [img.naturalWidth, img.naturalHeight] : null;",
        f"#{elem_id}",
    )


@pytest.mark.slow
def test_demo_in_headless_chromium(browser, served, pipe, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    assert served.local_url.startswith("http://127.0.0.1:")
    wait = WebDriverWait(browser, 45, poll_frequency=0.2)
    browser.get(served.local_url)

    # Generate: type a prompt, click, wait for a real image and the settings JSON
    prompt = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#gen-prompt textarea"))
    prompt.send_keys("two red circles on a blue square")
    browser.find_element(By.CSS_SELECTOR, "#gen-button").click()
    size = wait.until(lambda d: _shown_image(d, "gen-image"))
    assert tuple(size) == (128, 128)
    wait.until(lambda d: "two red circles" in d.find_element(By.ID, "gen-settings").text)
    browser.save_screenshot(str(tmp_path / "generate.png"))
    if os.environ.get("CHEERS_WEB_SCREENSHOT"):
        Path(os.environ["CHEERS_WEB_SCREENSHOT"]).parent.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(os.environ["CHEERS_WEB_SCREENSHOT"])

    # Chat: attach an image, sample (temperature 1, so the tiny model says more than newlines), ask, read
    browser.find_element(By.XPATH, "//button[@role='tab' and normalize-space()='Chat']").click()
    upload = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#chat-image input[type=file]"))
    upload.send_keys(str(photo(tmp_path / "photo.png")))
    wait.until(lambda d: _shown_image(d, "chat-image"))  # uploaded and previewed
    temperature = browser.find_element(By.CSS_SELECTOR, "#chat-temperature input[type=number]")
    temperature.send_keys(Keys.CONTROL, "a")
    temperature.send_keys("1", Keys.TAB)
    question = browser.find_element(By.CSS_SELECTOR, "#chat-input textarea")
    question.send_keys("What is in the picture?")
    browser.find_element(By.CSS_SELECTOR, "#chat-send").click()
    wait.until(lambda d: "What is in the picture?" in d.find_element(By.ID, "chatbot").text)

    def answer(d):
        bots = d.find_elements(By.CSS_SELECTOR, "#chatbot [data-testid='bot']")
        text = bots[-1].text.strip() if bots else ""
        return text if text and text != "…" else None

    expected = pipe.chat(
        [
            {
                "role": "user",
                "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}],
            }
        ],
        images=[Image.open(tmp_path / "photo.png")],
        max_new_tokens=12,
        do_sample=True,
        temperature=1.0,
        generator=torch.Generator().manual_seed(0),
    ).texts[0]
    wait.until(answer)
    time.sleep(0.5)  # let the last streamed piece render
    shown = answer(browser)
    assert shown != EMPTY_ANSWER and expected.strip(), (
        "sampling should give the tiny model a non-empty answer"
    )
    assert "".join(shown.split()) == "".join(expected.split())  # the streamed answer, whitespace aside
    browser.save_screenshot(str(tmp_path / "chat.png"))

    # HFI heatmaps: the image, the strip of gate maps (one tile per step) and the mean-per-step plot
    browser.find_element(By.XPATH, "//button[@role='tab' and normalize-space()='HFI heatmaps']").click()
    hfi_prompt = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#hfi-prompt textarea"))
    hfi_prompt.send_keys("a blue square")
    browser.find_element(By.CSS_SELECTOR, "#hfi-button").click()
    strip = wait.until(lambda d: _shown_image(d, "hfi-strip"))
    assert strip[0] == 2 * 96 + 4  # two steps (the pipeline's default here): two tiles
    assert wait.until(lambda d: _shown_image(d, "hfi-image")) == [128, 128]
    wait.until(lambda d: _shown_image(d, "hfi-plot"))
    browser.save_screenshot(str(tmp_path / "hfi.png"))

    # Edit: bad input shows the ValueError text as an error message (no traceback), then a real edit
    browser.find_element(By.XPATH, "//button[@role='tab' and normalize-space()='Edit']").click()
    wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#edit-button")).click()
    wait.until(lambda d: "please upload an image" in d.find_element(By.TAG_NAME, "body").text)
    assert "Traceback" not in browser.find_element(By.TAG_NAME, "body").text
    browser.find_element(By.CSS_SELECTOR, "#edit-source input[type=file]").send_keys(
        str(tmp_path / "photo.png")
    )
    wait.until(lambda d: _shown_image(d, "edit-source"))
    browser.find_element(By.CSS_SELECTOR, "#edit-instruction textarea").send_keys("make it blue")
    browser.find_element(By.CSS_SELECTOR, "#edit-button").click()
    assert wait.until(lambda d: _shown_image(d, "edit-image")) == [128, 128]
    browser.save_screenshot(str(tmp_path / "edit.png"))
