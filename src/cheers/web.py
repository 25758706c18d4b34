"""The web demo: a Gradio app over :class:`cheers.pipeline.CheersPipeline`.

Tabs: Generate (text-to-image), Edit (image + instruction), Chat (multi-turn, optional images, streamed
answers) and HFI heatmaps (the high-frequency-injection gate of every sampling step).

Safety defaults: the server binds 127.0.0.1 unless told otherwise; uploads are capped by ``max_file_size``
and read only from Gradio's temporary upload folder (a path from anywhere else is refused); the demo never
writes a user file itself; bad input shows the pipeline's ``ValueError`` text as a ``gr.Error`` message,
never a stack trace; every model call goes through one shared queue (``max_concurrency`` at a time, at most
``max_queue`` waiting; later visitors are turned away with "Queue is full").

Gradio and the pipeline are imported lazily, so ``cheers --help`` stays fast and works without the ``[demo]``
extra.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

if TYPE_CHECKING:
    from cheers.pipeline import CheersPipeline

logger = logging.getLogger(__name__)

DEFAULT_MODEL = (
    "default"  # the bundled model, as in cheers.pipeline (not imported here: `cheers --help` stays light)
)
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
DEFAULT_MAX_FILE_SIZE = "10mb"
EMPTY_ANSWER = "(the model gave an empty answer)"
MAX_SEED = 2**32 - 1
_LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def _gradio():
    try:
        import gradio
    except ImportError as err:
        raise ImportError("the web demo needs gradio: pip install 'cheers[demo]'") from err
    return gradio


@contextmanager
def _user_errors() -> Iterator[None]:
    """Bad input (a ``ValueError`` / missing file) becomes a ``gr.Error``: the UI shows its text, no
    traceback."""
    try:
        yield
    except (ValueError, FileNotFoundError) as err:
        raise _gradio().Error(str(err)) from None


def _as_int(name: str, value: Any, low: int, high: int) -> int:
    """Gradio numbers may arrive as floats (``2.0``); accept integral values in [low, high]."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
    return value


def _upload_folder() -> Path:
    try:
        from gradio.utils import get_upload_folder

        return Path(get_upload_folder()).resolve()
    except ImportError:
        return (Path(tempfile.gettempdir()) / "gradio").resolve()


class DemoHandlers:
    """The demo's event handlers as plain methods (the UI calls them; tests can too).

    Args:
        pipeline: the loaded pipeline.
        max_steps: upper bound on sampling steps a visitor may ask for.
        max_new_tokens: upper bound on the length of a chat answer.
        upload_roots: folders an uploaded file's path may lie in (default: Gradio's upload folder).
    """

    def __init__(
        self,
        pipeline: CheersPipeline,
        *,
        max_steps: int = 200,
        max_new_tokens: int = 1024,
        upload_roots: list[str | Path] | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.max_steps, self.max_new_tokens = max_steps, max_new_tokens
        roots = upload_roots if upload_roots is not None else [_upload_folder()]
        self.upload_roots = [Path(r).resolve() for r in roots]

    # -- inputs ----------------------------------------------------------------------------------------------
    def load_upload(self, image: Any, name: str = "image") -> Image.Image:
        """An uploaded image (a path inside an upload root, or a PIL image) as RGB, checked by
        ``load_image``."""
        if isinstance(image, Image.Image):
            return image.convert("RGB")
        if not isinstance(image, (str, Path)) or not str(image):
            raise ValueError(f"please upload an {name}")
        path = Path(image).resolve()  # resolves "..", so a traversal ends up outside the roots
        if not any(path.is_relative_to(root) for root in self.upload_roots):
            raise ValueError(f"{name} must be an uploaded file")
        from cheers.image_ops import load_image

        return load_image(path)

    def _generator(self, seed: Any):
        import torch

        return torch.Generator().manual_seed(_as_int("seed", seed, 0, MAX_SEED))

    # -- tabs ------------------------------------------------------------------------------------------------
    def generate(
        self,
        prompt: str,
        negative_prompt: str | None,
        steps: Any,
        guidance: float,
        shift: float,
        seed: Any,
        width: Any,
        height: Any,
        progress=None,
    ) -> tuple[Image.Image, dict]:
        """Text-to-image -> (image, settings incl. prompt and seed)."""
        with _user_errors():
            steps = _as_int("steps", steps, 1, self.max_steps)
            size = {k: _as_int(k, v, 1, 8192) for k, v in (("width", width), ("height", height))}
            generator = self._generator(seed)

            def on_step(step: int, t: float, latent) -> None:
                if progress is not None:
                    progress((min(step + 1, steps), steps), desc="sampling")

            out = self.pipeline.generate(
                prompt,
                negative_prompt=(negative_prompt or "").strip() or None,
                num_inference_steps=steps,
                guidance_scale=guidance,
                shift=shift,
                generator=generator,
                callback_on_step_end=on_step,
                **size,
            )
        return out.images[0], {"prompt": prompt, "seed": int(seed), **out.settings}

    def edit(self, image: Any, instruction: str, steps: Any, guidance: float, seed: Any) -> Image.Image:
        """Edit an uploaded image following ``instruction``."""
        with _user_errors():
            source = self.load_upload(image)
            steps = _as_int("steps", steps, 2, self.max_steps)
            out = self.pipeline.edit(
                source,
                instruction,
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=self._generator(seed),
            )
        return out.images[0]

    def hfi(self, prompt: str, steps: Any, guidance: float, shift: float, seed: Any):
        """Generate and picture the HFI gate -> (image, heatmap strip over the steps, mean-per-step
        figure)."""
        from cheers.web_plots import gate_means_figure, gate_strip

        with _user_errors():
            steps = _as_int("steps", steps, 1, self.max_steps)
            out = self.pipeline.generate(
                prompt,
                num_inference_steps=steps,
                guidance_scale=guidance,
                shift=shift,
                generator=self._generator(seed),
                return_hfi_maps=True,
            )
        maps = out.hfi_maps[0]  # (S, h, w)
        return out.images[0], gate_strip(maps), gate_means_figure(maps)

    @staticmethod
    def new_chat() -> dict:
        """A fresh conversation: the model's messages, their images, and what the chatbot shows."""
        return {"messages": [], "images": [], "display": []}

    def chat(
        self, message: str, image: Any, state: dict | None, max_new_tokens: Any, temperature: float, seed: Any
    ) -> Iterator[tuple[list, dict, str, Any]]:
        """One chat turn, streamed: yields (chatbot messages, conversation state, textbox value, image value).

        The question and its optional image join the conversation; the answer grows piece by piece. The new
        state is yielded only once the answer is complete, so a failed turn leaves the conversation as it was.
        """
        state = state or self.new_chat()
        with _user_errors():
            text = (message or "").strip()
            if not text:
                raise ValueError("please type a question")
            tokens = _as_int("max new tokens", max_new_tokens, 1, self.max_new_tokens)
            temperature = float(temperature or 0.0)  # 0 (or a cleared box): greedy decoding
            images = list(state["images"])
            content: list[dict] = []
            display = list(state["display"])
            if image is not None and image != "":
                images.append(self.load_upload(image))
                content.append({"type": "image"})
                if isinstance(image, (str, Path)):
                    display.append({"role": "user", "content": {"path": str(image)}})
            content.append({"type": "text", "text": text})
            messages = [*state["messages"], {"role": "user", "content": content}]
            display += [{"role": "user", "content": text}, {"role": "assistant", "content": "…"}]
            yield display, state, "", image
            pieces = self.pipeline.chat(
                messages,
                images=images or None,
                max_new_tokens=tokens,
                do_sample=temperature > 0,
                temperature=temperature or 1.0,
                generator=self._generator(seed),
                stream=True,
            )
            answer = ""
            for piece in pieces:
                answer += piece
                display[-1] = {"role": "assistant", "content": answer}
                yield display, state, "", image
        display[-1] = {"role": "assistant", "content": answer or EMPTY_ANSWER}
        messages.append({"role": "assistant", "content": answer})
        yield display, {"messages": messages, "images": images, "display": display}, "", None


def _chatbot(gr, **kwargs):
    # Gradio 5 needs type="messages" for role/content dicts; Gradio 6 only has that format (no parameter).
    if "type" in inspect.signature(gr.Chatbot.__init__).parameters:
        kwargs["type"] = "messages"
    return gr.Chatbot(**kwargs)


def build_demo(
    pipeline: CheersPipeline,
    *,
    max_steps: int = 200,
    max_new_tokens: int = 1024,
    upload_roots: list[str | Path] | None = None,
):
    """The Gradio app (not yet queued or launched). Every model event shares one concurrency group."""
    gr = _gradio()
    h = DemoHandlers(pipeline, max_steps=max_steps, max_new_tokens=max_new_tokens, upload_roots=upload_roots)
    d = pipeline.defaults
    size, step = pipeline.processor.image_size, 2 * pipeline.model.config.patch_size
    model_events = dict(concurrency_id="model")

    def on_generate(*args, progress=gr.Progress()):  # noqa: B008 - Gradio injects progress via the default
        return h.generate(*args, progress=progress)

    with gr.Blocks(title="Cheers", analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
        gr.Markdown("# Cheers\nUnified image understanding and generation with one language model.")
        with gr.Tab("Generate", id="generate"):
            with gr.Row():
                with gr.Column():
                    prompt = gr.Textbox(label="Prompt", lines=3, elem_id="gen-prompt")
                    negative = gr.Textbox(label="Negative prompt (optional)", elem_id="gen-negative")
                    with gr.Row():
                        steps = gr.Slider(
                            1,
                            max_steps,
                            value=min(d.num_inference_steps, max_steps),
                            step=1,
                            label="Steps",
                            elem_id="gen-steps",
                        )
                        guidance = gr.Slider(0, 20, value=d.guidance_scale, step=0.1, label="Guidance")
                    with gr.Row():
                        shift = gr.Slider(0.1, 4, value=d.shift, step=0.05, label="Shift (alpha)")
                        seed = gr.Number(value=0, precision=0, minimum=0, maximum=MAX_SEED, label="Seed")
                    with gr.Row():
                        width = gr.Slider(step, 2 * size, value=size, step=step, label="Width")
                        height = gr.Slider(step, 2 * size, value=size, step=step, label="Height")
                    go = gr.Button("Generate", variant="primary", elem_id="gen-button")
                with gr.Column():
                    image = gr.Image(
                        label="Image", type="pil", format="png", interactive=False, elem_id="gen-image"
                    )
                    settings = gr.JSON(label="Settings", elem_id="gen-settings")
            inputs = [prompt, negative, steps, guidance, shift, seed, width, height]
            go.click(on_generate, inputs, [image, settings], **model_events)
            prompt.submit(on_generate, inputs, [image, settings], **model_events)

        with gr.Tab("Edit", id="edit"):
            with gr.Row():
                with gr.Column():
                    source = gr.Image(
                        label="Image to edit",
                        type="filepath",
                        image_mode=None,
                        height=320,
                        sources=["upload", "clipboard"],
                        elem_id="edit-source",
                    )
                    instruction = gr.Textbox(label="Instruction", elem_id="edit-instruction")
                    with gr.Row():
                        e_steps = gr.Slider(
                            2,
                            max_steps,
                            value=min(d.edit_num_inference_steps, max_steps),
                            step=1,
                            label="Steps",
                        )
                        e_guidance = gr.Slider(0, 20, value=d.edit_guidance_scale, step=0.1, label="Guidance")
                        e_seed = gr.Number(value=0, precision=0, minimum=0, maximum=MAX_SEED, label="Seed")
                    e_go = gr.Button("Edit", variant="primary", elem_id="edit-button")
                edited = gr.Image(
                    label="Edited", type="pil", format="png", interactive=False, elem_id="edit-image"
                )
            e_go.click(h.edit, [source, instruction, e_steps, e_guidance, e_seed], edited, **model_events)

        with gr.Tab("Chat", id="chat"):
            state = gr.State(h.new_chat())
            with gr.Row():
                with gr.Column(scale=1):
                    c_image = gr.Image(
                        label="Image for the next message (optional)",
                        type="filepath",
                        image_mode=None,
                        height=280,
                        sources=["upload", "clipboard"],
                        elem_id="chat-image",
                    )
                    c_tokens = gr.Slider(
                        1, max_new_tokens, value=min(256, max_new_tokens), step=1, label="Max new tokens"
                    )
                    c_temp = gr.Slider(
                        0, 2, value=0, step=0.05, label="Temperature (0 = greedy)", elem_id="chat-temperature"
                    )
                    c_seed = gr.Number(value=0, precision=0, minimum=0, maximum=MAX_SEED, label="Seed")
                with gr.Column(scale=2):
                    chatbot = _chatbot(gr, label="Cheers", elem_id="chatbot", height=420)
                    question = gr.Textbox(
                        label="Message", placeholder="Ask about the image…", elem_id="chat-input"
                    )
                    with gr.Row():
                        send = gr.Button("Send", variant="primary", elem_id="chat-send")
                        clear = gr.Button("New conversation", elem_id="chat-clear")
            c_inputs = [question, c_image, state, c_tokens, c_temp, c_seed]
            c_outputs = [chatbot, state, question, c_image]
            send.click(h.chat, c_inputs, c_outputs, **model_events)
            question.submit(h.chat, c_inputs, c_outputs, **model_events)
            clear.click(lambda: ([], h.new_chat(), "", None), None, c_outputs, queue=False)

        with gr.Tab("HFI heatmaps", id="hfi"):
            gr.Markdown(
                "The high-frequency-injection gate `g` per latent token at every sampling step "
                "(one colour scale for all steps), and its mean per step."
            )
            with gr.Row():
                with gr.Column():
                    m_prompt = gr.Textbox(label="Prompt", lines=2, elem_id="hfi-prompt")
                    with gr.Row():
                        m_steps = gr.Slider(
                            1,
                            max_steps,
                            value=min(d.num_inference_steps, max_steps, 30),
                            step=1,
                            label="Steps",
                        )
                        m_guidance = gr.Slider(0, 20, value=d.guidance_scale, step=0.1, label="Guidance")
                        m_shift = gr.Slider(0.1, 4, value=d.shift, step=0.05, label="Shift (alpha)")
                        m_seed = gr.Number(value=0, precision=0, minimum=0, maximum=MAX_SEED, label="Seed")
                    m_go = gr.Button("Generate and show the gate", variant="primary", elem_id="hfi-button")
                m_image = gr.Image(
                    label="Image", type="pil", format="png", interactive=False, elem_id="hfi-image"
                )
            strip = gr.Image(
                label="HFI gate per step", type="pil", format="png", interactive=False, elem_id="hfi-strip"
            )
            plot = gr.Plot(label="Mean gate per step", elem_id="hfi-plot")
            m_go.click(
                h.hfi,
                [m_prompt, m_steps, m_guidance, m_shift, m_seed],
                [m_image, strip, plot],
                **model_events,
            )
    return demo


def launch(
    model: CheersPipeline | str | Path = DEFAULT_MODEL,
    host: str = DEFAULT_HOST,
    port: int | None = None,
    share: bool = False,
    max_concurrency: int = 1,
    max_queue: int = 32,
    max_file_size: str | int = DEFAULT_MAX_FILE_SIZE,
    *,
    device: str = "auto",
    dtype: str | None = None,
    max_steps: int = 200,
    max_new_tokens: int = 1024,
    prevent_thread_lock: bool = False,
    quiet: bool = False,
):
    """Serve the demo. Returns the launched ``gradio.Blocks`` (``.local_url``; ``.close()`` stops it).

    Args:
        model: a loaded pipeline, or what :meth:`CheersPipeline.from_pretrained` takes.
        host: the address to bind; anything but localhost makes the demo reachable from other machines.
        port: the port (None: Gradio's default, 7860 or the next free one).
        share: also open a public Gradio share link (needs the internet).
        max_concurrency: model calls running at once (all tabs share the limit).
        max_queue: visitors allowed to wait; more are turned away.
        max_file_size: upload cap, e.g. "10mb" or a byte count.
        prevent_thread_lock: return at once and serve from a background thread (tests, notebooks).
    """
    _gradio()
    from cheers.pipeline import CheersPipeline

    for name, value in (("max_concurrency", max_concurrency), ("max_queue", max_queue)):
        _as_int(name, value, 1, 10_000)
    pipe = (
        model
        if isinstance(model, CheersPipeline)
        else CheersPipeline.from_pretrained(model, device=device, dtype=dtype, progress=False)
    )
    demo = build_demo(pipe, max_steps=max_steps, max_new_tokens=max_new_tokens)
    demo.queue(default_concurrency_limit=max_concurrency, max_size=max_queue)
    if share or host not in _LOCAL_HOSTS:
        logger.warning("the demo is reachable beyond this machine (host=%s, share=%s)", host, share)
    demo.launch(
        server_name=host,
        server_port=port,
        share=share,
        max_file_size=max_file_size,
        prevent_thread_lock=prevent_thread_lock,
        show_error=False,
        quiet=quiet,
        inbrowser=False,
        ssr_mode=False,
    )
    return demo


# -- the `cheers web` command --------------------------------------------------------------------------------
def _port(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be in [1, 65535], got {value}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def cmd_web(args: argparse.Namespace) -> int:
    demo = launch(
        args.model,
        host=args.host,
        port=args.port,
        share=args.share,
        max_concurrency=args.max_concurrency,
        max_queue=args.max_queue,
        max_file_size=args.max_file_size,
        device=args.device,
        dtype=args.dtype,
        max_steps=args.max_steps,
    )
    demo.close()
    return 0


def add_web_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``cheers web`` on an ``add_subparsers()`` object; returns the new parser."""
    p = subparsers.add_parser(
        "web",
        help="serve the web demo (Gradio) on 127.0.0.1",
        description="Serve the Cheers web demo: generate, edit, chat, HFI heatmaps.",
    )
    p.add_argument(
        "--model", default=DEFAULT_MODEL, help="checkpoint directory or hub id (default: the bundled model)"
    )
    p.add_argument("--device", default="auto", help="cpu | cuda | mps | auto")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: the checkpoint's)")
    p.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help=f"address to bind (default {DEFAULT_HOST}; 0.0.0.0 exposes the demo to the network)",
    )
    p.add_argument("--port", type=_port, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    p.add_argument("--share", action="store_true", help="also create a public Gradio share link")
    p.add_argument("--max-concurrency", type=_positive, default=1, help="model calls at once (default 1)")
    p.add_argument("--max-queue", type=_positive, default=32, help="waiting requests allowed (default 32)")
    p.add_argument("--max-file-size", default=DEFAULT_MAX_FILE_SIZE, help="upload cap (default 10mb)")
    p.add_argument(
        "--max-steps", type=_positive, default=200, help="most sampling steps a visitor may ask for"
    )
    p.set_defaults(func=cmd_web)
    return p
