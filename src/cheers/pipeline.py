"""CheersPipeline: text-to-image, editing and chat with one object, in the diffusers style.

Each public call reads as numbered steps: check inputs -> encode prompts -> prepare latents -> sample ->
decode. Defaults are the release's behaviour (dummy-image prefix, Euler with the release's last step);
settings that change it are named options.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from cheers.generation import GenerationOutput, generate
from cheers.models.cheers import Cheers
from cheers.models.pretrained import from_pretrained, resolve_dtype
from cheers.models.vae_fast import FastVAE, install_fast_vae
from cheers.processor import CheersProcessor
from cheers.sampling import ImageSampling, check_guidance_interval, check_solver, edit_steps
from cheers.text_sampling import TextSampling

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
SAMPLING_DEFAULTS_FILE = "sampling_defaults.json"
OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@dataclass
class SamplingDefaults:
    """Per-model default settings (a checkpoint may carry ``sampling_defaults.json``)."""

    num_inference_steps: int = 80
    guidance_scale: float = 5.0
    shift: float = 0.5  # the release's alpha: < 1 spends more steps near the noise end
    edit_num_inference_steps: int = 50
    edit_guidance_scale: float = 3.0
    # how a text-to-image prompt is put to the model: ``{prompt}`` as given, or ``{sentence}`` (capitalised,
    # with a full stop), e.g. "{sentence}\nBased on the above description, generate an image."
    prompt_template: str = "{prompt}"
    solver: str = "euler"  # the flow ODE solver (cheers.sampling.SOLVERS); "euler" is the release's
    # guide only for t in [t_lo, t_hi] (the unconditional branch is skipped elsewhere); None: at every step
    guidance_interval: tuple[float, float] | None = None
    # what a prompt without an image gets in front: "dummy" (the release: a random-noise image) or None (no
    # image: for a model trained without one, e.g. the retrained ShapesWorld lineage of docs/tiny-model.md)
    prefix_image: str | None = "dummy"

    def __post_init__(self) -> None:
        check_solver(self.solver)
        if self.prefix_image not in ("dummy", None):
            raise ValueError(f'prefix_image must be "dummy" or null, got {self.prefix_image!r}')
        self.guidance_interval = check_guidance_interval(
            self.guidance_interval
        )  # a JSON list becomes a tuple


class _ModelDefault:
    def __repr__(self) -> str:
        return "MODEL_DEFAULT"


MODEL_DEFAULT: Any = _ModelDefault()
"""Marks an argument whose value comes from the model's :class:`SamplingDefaults`."""


def format_prompt(template: str, prompt: str) -> str:
    """Apply a prompt template (``{prompt}``: the text as given; ``{sentence}``: capitalised, full stop)."""
    text = prompt.strip()
    sentence = text[:1].upper() + text[1:]
    sentence = sentence if sentence.endswith((".", "!", "?")) else sentence + "."
    return template.format(prompt=prompt, sentence=sentence)


@dataclass
class ImagePipelineOutput:
    images: list[Any]  # per image: PIL.Image / (H, W, 3) array / (3, H, W) tensor / (C, h, w) latent
    prompts: list[str]
    settings: dict[str, Any]
    hfi_maps: list[torch.Tensor] | None = None  # per image: (S, h, w) raw HFI gate per step


@dataclass
class ChatOutput:
    texts: list[str]
    token_ids: list[list[int]] = field(default_factory=list)


class _StreamClosed(Exception):
    """Raised inside the decoding loop when a streamed answer's reader has stopped reading."""


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) != "auto":
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' was requested but CUDA is not available on this machine")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise ValueError("device 'mps' was requested but MPS is not available on this machine")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _check_number(name: str, value: Any, low: float, high: float, integer: bool = False) -> None:
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or not (low <= value <= high) or value != value:
        kind = "an integer" if integer else "a number"
        raise ValueError(f"{name} must be {kind} in [{low}, {high}], got {value!r}")


class CheersPipeline:
    """Understanding, generation and editing with a Cheers model and its processor."""

    def __init__(
        self,
        model: Cheers,
        processor: CheersProcessor,
        defaults: SamplingDefaults | None = None,
        progress: bool = True,
    ) -> None:
        if model.special is None:
            model.special = processor.special
        self.model, self.processor = model.eval(), processor
        self.defaults = defaults or SamplingDefaults()
        self.progress = progress
        self.fast_vae: FastVAE | None = None  # see enable_fast_vae(); from_pretrained turns it on
        self.offload = None  # see enable_model_cpu_offload(), enable_sequential_cpu_offload()

    @property
    def device(self) -> torch.device:
        """Where the model runs (with CPU offload: the execution device, not where the weights rest)."""
        if self.offload is not None:
            return self.offload.device
        return next(self.model.parameters()).device

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path = DEFAULT_MODEL,
        *,
        device: str | torch.device = "auto",
        dtype: str | torch.dtype | None = None,
        progress: bool = True,
        quantization: str | None = None,
    ) -> CheersPipeline:
        """Load a release-layout directory, a hub id (``ai9stars/Cheers``) or ``"default"`` (the bundled
        model).

        ``dtype`` defaults to the checkpoint's (bf16 for the release) on GPUs and to float32 on the CPU. The
        VAE decoders' faster forms are on (:meth:`enable_fast_vae`). ``quantization`` ("int8", "float8",
        "int4"; None: float) stores the LLM's and the flow heads' linear weights in fewer bits
        (:func:`cheers.quantization.quantize_model`; needs torchao).
        """
        from cheers.quantization import check_quantization, quantize_model

        check_quantization(quantization)
        dev = resolve_device(device)
        if str(name_or_path) == DEFAULT_MODEL:
            from cheers.assets import default_model_dir

            name_or_path = default_model_dir()
        from cheers.checkpoint import resolve_checkpoint_dir

        directory = resolve_checkpoint_dir(str(name_or_path))
        if dtype is None and dev.type == "cpu":
            # the exact path; bf16 was 1.3-2.4x faster on a CPU with avx512_bf16 (docs/performance.md), but
            # CPUs without bf16 instructions emulate it; GPUs keep the checkpoint's dtype
            dtype = "float32"
        model = from_pretrained(directory, dtype=resolve_dtype(dtype) if dtype else None, device=dev)
        if quantization is not None:
            quantize_model(model, quantization)
        processor = CheersProcessor.from_pretrained(directory)
        defaults = SamplingDefaults()
        if (directory / SAMPLING_DEFAULTS_FILE).exists():
            defaults = SamplingDefaults(**json.loads((directory / SAMPLING_DEFAULTS_FILE).read_text()))
        return cls(model, processor, defaults, progress).enable_fast_vae()

    # -- text-to-image ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        *,
        num_images_per_prompt: int = 1,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        shift: float | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        callback_on_step_end: Callable[[int, float, torch.Tensor], None] | None = None,
        return_hfi_maps: bool = False,
        final_step: str = "release",
        prefix_image: str | None = MODEL_DEFAULT,
        solver: str | None = None,
        guidance_interval: tuple[float, float] | None = None,
    ) -> ImagePipelineOutput:
        """Text-to-image.

        Args:
            prompt: one prompt or a list (batched; mixed lengths are padded and masked).
            negative_prompt: replaces the release's unconditional prompt (all ``<no_mean>``) for guidance.
            height, width: pixels, multiples of 2 x patch size (default: the model's resolution).
            num_inference_steps: grid points of the ODE solver (Euler: steps).
            guidance_scale: classifier-free guidance (1 or 0 disables it).
            shift: the release's time-shift alpha; < 1 spends more steps near the noise end. Diffusers'
                ``shift`` s corresponds to alpha = 1/s.
            generator: one generator, or one per image (then each image equals its own single run).
            latents: (n_images, C, h, w) start noise.
            output_type: "pil", "np", "pt" or "latent".
            callback_on_step_end: ``f(step, t, latent)`` after each step.
            return_hfi_maps: also return the HFI gate maps of every step.
            final_step: "release" (overshoot by 1/S as released) or "exact" (stop at t = 1).
            prefix_image: "dummy" (the release's random-noise prefix image) or None (no image); default: the
                model's ``SamplingDefaults`` ("dummy" unless its ``sampling_defaults.json`` says otherwise).
            solver: "euler" (the release's), "multistep" (2nd order, same cost), "heun" or "midpoint" (2nd
                order, 2S − 1 evaluations); default: the model's ``SamplingDefaults``.
            guidance_interval: ``(t_lo, t_hi)``: guide only there (the unconditional branch is skipped
                elsewhere); default: the model's (None: every step). ``(0, 1)`` guides everywhere.
        """
        # 1. check inputs
        settings = self._image_sampling(
            num_inference_steps, guidance_scale, shift, solver, final_step, guidance_interval, edit=False
        )
        prompts = self._prompt_list(prompt, "prompt")
        _check_number("num_images_per_prompt", num_images_per_prompt, 1, 64, integer=True)
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        grid = self._grid(height, width)
        expanded = [p for p in prompts for _ in range(num_images_per_prompt)]
        n = len(expanded)
        if isinstance(generator, list) and len(generator) != n:
            raise ValueError(f"got {len(generator)} generators for {n} images")
        prefix_image = self._prefix_image(prefix_image)
        # 2. encode prompts (the release's chat template, then <im_start>)
        template = self.defaults.prompt_template
        inputs = self._encode(
            [[{"role": "user", "content": format_prompt(template, p)}] for p in expanded],
            "generate",
            prefix_image,
            generator,
        )
        uncond = None
        if negative_prompt is not None:
            negs = self._prompt_list(negative_prompt, "negative_prompt")
            negs = negs * len(prompts) if len(negs) == 1 else negs
            if len(negs) != len(prompts):
                raise ValueError(f"{len(negs)} negative prompts for {len(prompts)} prompts")
            uncond = self._encode(
                [
                    [{"role": "user", "content": format_prompt(template, p)}]
                    for p in negs
                    for _ in range(num_images_per_prompt)
                ],
                "generate",
                prefix_image,
                generator,
            )
        # 3. prepare latents
        if latents is not None:
            expect = (n, self.model.config.latent_channels, *grid)
            if tuple(latents.shape) != expect:
                raise ValueError(f"latents must have shape {expect}, got {tuple(latents.shape)}")
        # 4. sample
        out = self._run(
            inputs,
            uncond,
            settings,
            grid=grid,
            generator=generator,
            latents=latents,
            callback=callback_on_step_end,
            return_gates=return_hfi_maps,
            edit=False,
        )
        # 5. decode
        images = [self._postprocess(out.images[i][0], out.latents[i][0], output_type) for i in range(n)]
        used = dict(
            self._settings_dict(settings),
            height=grid[0] * self._patch,
            width=grid[1] * self._patch,
            negative_prompt=negative_prompt,
            prefix_image=prefix_image,
        )
        maps = [out.gates[i][0] for i in range(n)] if return_hfi_maps else None
        return ImagePipelineOutput(images, expanded, used, maps)

    # -- editing --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def edit(
        self,
        image: Any,
        instruction: str | list[str],
        *,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        shift: float | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_hfi_maps: bool = False,
        final_step: str = "release",
        solver: str | None = None,
        guidance_interval: tuple[float, float] | None = None,
    ) -> ImagePipelineOutput:
        """Edit ``image`` following ``instruction`` (the release's start: z = 0.1·encode(image) + 0.9·noise).

        A list of images edits them as one batch: with one instruction for all or one each, and one
        generator per image (then each result equals its own single run). ``solver`` and
        ``guidance_interval`` as in :meth:`generate`.
        """
        settings = self._image_sampling(
            num_inference_steps, guidance_scale, shift, solver, final_step, guidance_interval, edit=True
        )
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        sources = image if isinstance(image, list) else [image]
        instructions = self._prompt_list(instruction, "instruction")
        instructions = instructions * len(sources) if len(instructions) == 1 else instructions
        if len(instructions) != len(sources):
            raise ValueError(f"{len(instructions)} instructions for {len(sources)} images")
        if isinstance(generator, list) and len(generator) != len(sources):
            raise ValueError(f"got {len(generator)} generators for {len(sources)} images")
        messages = [
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
            for text in instructions
        ]
        inputs = self.processor(messages=messages, images=sources, mode="edit")
        grid = self._grid(None, None)
        out = self._run(
            inputs,
            None,
            settings,
            grid=grid,
            generator=generator,
            latents=None,
            callback=None,
            return_gates=return_hfi_maps,
            edit=True,
        )
        n = len(sources)
        images = [self._postprocess(out.images[i][0], out.latents[i][0], output_type) for i in range(n)]
        used = dict(self._settings_dict(settings), instruction=instruction)
        maps = [out.gates[i][0] for i in range(n)] if return_hfi_maps else None
        return ImagePipelineOutput(images, instructions, used, maps)

    # -- understanding / chat --------------------------------------------------------------------------------
    @torch.no_grad()
    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        images: Any = None,
        *,
        max_new_tokens: int = 256,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        repetition_penalty: float = 1.0,
        num_beams: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        stream: bool = False,
        prefix_image: str | None = MODEL_DEFAULT,
        static_cache: bool = False,
        cuda_graph: bool = False,
        stop_at_image: bool = False,
    ) -> ChatOutput | Iterator[str]:
        """Answer a conversation (or a batch of them) with text.

        Args:
            messages: ``[{"role": "user", "content": "..." | [{"type": "image"}, {"type": "text", ...}]}]``,
                or the release's ``<im_start><image><im_end>`` placeholders in the text.
            images: the images of the ``{"type": "image"}`` items / placeholders, in order.
            generator: one generator, or one per conversation (then each answer, and the dummy image of a
                conversation without one, equals its own single run; the images must then be given inside
                the messages, as ``{"type": "image", "image": ...}`` items).
            stream: yield text pieces of the (single) answer as they are decoded.
            prefix_image: for conversations without an image, "dummy" prepends the release's random image,
                None nothing; default: the model's ``SamplingDefaults``.
            static_cache: decode into a pre-allocated KV cache (same answers; for compiled / CUDA-graph
                decoding).
            cuda_graph: replay the static decode step from a CUDA graph (CUDA only; captured at the first
                token of each call): removes the per-kernel launch cost that bounds one stream on a large
                model.
            stop_at_image: end an answer where the model starts an image (``<im_start>``) instead of
                sampling it (80 steps by default): the image is drawn in one step and dropped; for text-only
                answers (a server's chat).
        """
        _check_number("max_new_tokens", max_new_tokens, 1, 100_000, integer=True)
        _check_number("num_beams", num_beams, 1, 64, integer=True)
        prefix_image = self._prefix_image(prefix_image)
        sampling = TextSampling(
            temperature=temperature if do_sample else 0.0,
            top_k=top_k,
            top_p=top_p,
            repetition_penalty=repetition_penalty,
        )
        if isinstance(generator, list):  # one per conversation, each encoded as it would be alone
            if images is not None:
                raise ValueError("with a list of generators, give the images inside the messages")
            batch = messages if all(isinstance(m, (list, tuple)) for m in messages) else [messages]
            if len(generator) != len(batch):
                raise ValueError(f"got {len(generator)} generators for {len(batch)} conversations")
            inputs = self._encode(batch, "understand", prefix_image, generator)
        else:
            inputs = self.processor(
                messages=messages,
                images=images,
                mode="understand",
                prefix_image=prefix_image,
                generator=generator,
            )
        ids, mask = inputs["input_ids"].to(self.device), inputs["attention_mask"].to(self.device)
        pixels = self._pixels(inputs)
        if num_beams > 1:
            if stream:
                raise ValueError("stream=True is not available with beam search (num_beams > 1)")
            from cheers.beam_search import beam_search

            seqs = self._call(
                beam_search, ids, mask, pixels, num_beams=num_beams, max_new_tokens=max_new_tokens
            )
            return ChatOutput([self._decode_answer(s) for s in seqs], seqs)
        kwargs = dict(
            max_new_tokens=max_new_tokens,
            text_sampling=sampling,
            generator=generator,
            latent_grid=self._grid(None, None),
            static_cache=static_cache,
            cuda_graph=cuda_graph,
        )
        if stop_at_image:
            kwargs.update(stop_after_image=True, image_sampling=ImageSampling(num_inference_steps=1))
        if not stream:
            out = self._call(generate, ids, mask, pixels, **kwargs)
            return ChatOutput([self._decode_answer(s) for s in out.sequences], out.sequences)
        if ids.shape[0] != 1:
            raise ValueError("stream=True answers one conversation at a time")
        return self._stream(ids, mask, pixels, kwargs)

    def _stream(self, ids, mask, pixels, kwargs) -> Iterator[str]:
        pieces: queue.Queue = queue.Queue()
        done = object()
        errors: list[BaseException] = []
        closed = threading.Event()

        def on_token(row: int, tok: int) -> None:
            if closed.is_set():  # the consumer stopped reading: end decoding at this token
                raise _StreamClosed
            pieces.put(tok)

        def work() -> None:
            try:
                with torch.no_grad():
                    self._call(generate, ids, mask, pixels, token_callback=on_token, **kwargs)
            except _StreamClosed:
                pass
            except BaseException as err:  # surfaced in the consumer below
                errors.append(err)
            finally:
                pieces.put(done)

        worker = threading.Thread(target=work, daemon=True)
        worker.start()
        tokens: list[int] = []
        shown = ""
        try:
            while (item := pieces.get()) is not done:
                tokens.append(item)
                text = self._decode_answer(tokens)
                if len(text) > len(shown):
                    yield text[len(shown) :]
                    shown = text
        finally:
            # closing the iterator early (a server's client went away) stops decoding at the next token and
            # waits for it, so the model is free again when close() returns
            closed.set()
            worker.join()
        if errors:
            raise errors[0]

    # -- speed options --------------------------------------------------------------------------------------
    def optimize(self, *, channels_last: bool = True, compile_step: bool = False) -> CheersPipeline:
        """Opt-in speed settings that keep the outputs within the parity tolerance.

        Args:
            channels_last: keep the VAE decoders' and the ViT's convolutions in NHWC memory format (faster
                with oneDNN / cuDNN; the encoder stays NCHW, see ``Cheers.to_channels_last``; on 2 CPU cores,
                20 steps of the bundled model: one image 1.29 -> 1.11 s, a batch of 8 5.81 -> 4.58 s).
            compile_step: ``torch.compile`` the tokenizer-side decoder, the ViT and the flow heads (first call
                slow).
        """
        core = self.model.model
        if channels_last:
            self.model.to_channels_last()
        if compile_step:
            for name in ("vae_decoder_projector", "gen_projector", "hi_projector"):
                setattr(core, name, torch.compile(getattr(core, name)))
        return self

    def enable_fast_vae(self) -> CheersPipeline:
        """Install the VAE decoders' faster forms (:func:`cheers.models.vae_fast.install_fast_vae`):
        polyphase upsampling on every device; on a CPU in float32, activations in buffers reused across a
        call's decoder runs (freed after each call). Outputs within 1e-5 (relative) of the reference
        layers."""
        if self.fast_vae is None:
            self.fast_vae = install_fast_vae(self.model)
        return self

    def disable_fast_vae(self) -> CheersPipeline:
        """Back to the reference VAE layers (as the release computes them)."""
        if self.fast_vae is not None:
            self.fast_vae.remove()
            self.fast_vae = None
        return self

    # -- LoRA adapters --------------------------------------------------------------------------------------
    def load_lora_weights(
        self, path: str | Path, adapter_name: str | None = None, scale: float = 1.0
    ) -> CheersPipeline:
        """Load a LoRA adapter saved in peft's layout (``adapter_config.json`` and
        ``adapter_model.safetensors``, e.g. ``<run>/adapter`` of a ``lora:`` recipe) and add it to the active
        adapters at ``scale``.

        ``adapter_name`` defaults to the directory's name. Targets and shapes are checked against this model
        (a ValueError names what does not fit). Needs peft (``pip install 'cheers[lora]'``).
        """
        from cheers import lora

        lora.load_adapter(self.model, path, adapter_name, weight=scale)
        return self

    def set_adapters(
        self, names: str | list[str], weights: float | list[float] | None = None
    ) -> CheersPipeline:
        """Make exactly ``names`` the active adapters, each at its weight (default 1); ``[]``: none."""
        from cheers import lora

        lora.set_adapters(self.model, names, weights)
        return self

    def get_active_adapters(self) -> list[str]:
        """The names of the active LoRA adapters, in order."""
        from cheers import lora

        return lora.get_active_adapters(self.model)

    def unload_lora_weights(self) -> CheersPipeline:
        """Remove every adapter (a fused one stays in the weights, as in diffusers)."""
        from cheers import lora

        lora.unload(self.model)
        return self

    def fuse_lora(self, lora_scale: float = 1.0) -> CheersPipeline:
        """Add the active adapters (times ``lora_scale``) into the base weights: no per-call cost after."""
        from cheers import lora

        lora.fuse(self.model, lora_scale)
        return self

    def unfuse_lora(self) -> CheersPipeline:
        """Subtract the fused adapters from the base weights again."""
        from cheers import lora

        lora.unfuse(self.model)
        return self

    # -- memory ---------------------------------------------------------------------------------------------
    def enable_model_cpu_offload(self, device: str | torch.device | None = None) -> CheersPipeline:
        """Keep the weights in CPU memory and move each component (the VAE, the ViT, the LLM with its head,
        each flow head, ...) to ``device`` only while it runs, the one before it back (:mod:`cheers.offload`).

        For accelerators smaller than the model: peak memory is the largest component (the LLM) plus
        activations. ``device`` defaults to the accelerator (CUDA, else MPS); :attr:`device` reports it.
        Load on the CPU first (``from_pretrained(..., device="cpu", dtype="bfloat16")``) so that the whole
        model never has to fit; ``quantization`` combines with it. Not with ``optimize(compile_step=True)``.
        """
        from cheers.offload import ModelOffload, offload_device_of

        execution = offload_device_of(device)
        self.disable_cpu_offload()
        self.offload = ModelOffload(self.model, execution)
        return self

    def enable_sequential_cpu_offload(self, device: str | torch.device | None = None) -> CheersPipeline:
        """Like :meth:`enable_model_cpu_offload`, one module at a time: every layer's weights are moved to
        ``device`` for its own call and back after it. Smallest memory (the largest layer), slowest; not with
        ``cuda_graph=True`` (a captured step cannot move weights)."""
        from cheers.offload import SequentialOffload, offload_device_of

        execution = offload_device_of(device)
        self.disable_cpu_offload()
        self.offload = SequentialOffload(self.model, execution)
        return self

    def disable_cpu_offload(self, device: str | torch.device | None = None) -> CheersPipeline:
        """Remove the offload hooks; the weights stay in CPU memory, or move to ``device`` when given."""
        if self.offload is not None:
            self.offload.remove()
            self.offload = None
        if device is not None:
            self.model.to(resolve_device(device))
        return self

    # -- helpers --------------------------------------------------------------------------------------------
    def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(self.model, ...)`` (:func:`cheers.generation.generate`, beam search); the VAE decoders'
        buffers are freed after the call, as its activations would be, and an offloaded component goes back
        to the CPU."""
        try:
            return fn(self.model, *args, **kwargs)
        finally:
            if self.fast_vae is not None:
                self.fast_vae.clear()
            if self.offload is not None:
                self.offload.release()

    @property
    def _patch(self) -> int:
        return self.model.config.patch_size

    def _grid(self, height: int | None, width: int | None) -> tuple[int, int]:
        size = self.processor.image_size
        height, width = height or size, width or size
        step = 2 * self._patch
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, int) or value < step or value % step or value > 8192:
                raise ValueError(
                    f"{name} must be a multiple of {step} between {step} and 8192, got {value!r}"
                )
        return height // self._patch, width // self._patch

    @staticmethod
    def _prompt_list(prompt: Any, name: str) -> list[str]:
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"{name} must be a string or a non-empty list of strings, got {prompt!r:.80}")
        if any(not p.strip() for p in prompts):
            raise ValueError(f"{name} must not be empty")
        return prompts

    def _prefix_image(self, prefix_image: Any) -> Any:
        """The prefix image asked for, or the model's default (``SamplingDefaults.prefix_image``)."""
        return self.defaults.prefix_image if prefix_image is MODEL_DEFAULT else prefix_image

    def _encode(self, messages, mode, prefix_image, generator) -> dict:
        if not isinstance(generator, list):
            return self.processor(
                messages=messages, mode=mode, prefix_image=prefix_image, generator=generator
            )
        # one generator per row: row i's dummy image comes from generator i, exactly as when run alone
        rows = [
            self.processor(messages=[m], mode=mode, prefix_image=prefix_image, generator=g)
            for m, g in zip(messages, generator)
        ]
        width = max(r["input_ids"].shape[1] for r in rows)
        pad = self.model.special.pad

        def padded(key, value):
            return torch.cat(
                [torch.nn.functional.pad(r[key], (0, width - r[key].shape[1]), value=value) for r in rows]
            )

        pixels = [r["pixel_values"] for r in rows if r["pixel_values"] is not None]
        return {
            "input_ids": padded("input_ids", pad),
            "attention_mask": padded("attention_mask", 0),
            "pixel_values": torch.cat(pixels) if pixels else None,
        }

    def _pixels(self, inputs: dict) -> torch.Tensor | None:
        px = inputs["pixel_values"]
        return None if px is None else px.to(self.device, next(self.model.parameters()).dtype)

    def _image_sampling(
        self, num_inference_steps, guidance_scale, shift, solver, final_step, guidance_interval, edit: bool
    ) -> ImageSampling:
        """The call's image settings: its arguments, else the model's :class:`SamplingDefaults`; checked."""
        d = self.defaults
        steps = num_inference_steps
        if steps is None:
            steps = d.edit_num_inference_steps if edit else d.num_inference_steps
        scale = guidance_scale
        if scale is None:
            scale = d.edit_guidance_scale if edit else d.guidance_scale
        shift = d.shift if shift is None else shift
        _check_number("num_inference_steps", steps, 2 if edit else 1, 10_000, integer=True)
        _check_number("guidance_scale", scale, 0.0, 100.0)
        _check_number("shift", shift, 1e-3, 1e3)
        return ImageSampling(
            num_inference_steps=steps,
            guidance_scale=scale,
            shift=shift,
            solver=check_solver(d.solver if solver is None else solver),
            final_step=final_step,
            guidance_interval=d.guidance_interval if guidance_interval is None else guidance_interval,
        )

    @staticmethod
    def _settings_dict(settings: ImageSampling) -> dict[str, Any]:
        return dict(
            num_inference_steps=settings.num_inference_steps,
            guidance_scale=settings.guidance_scale,
            shift=settings.shift,
            final_step=settings.final_step,
            solver=settings.solver,
            guidance_interval=settings.guidance_interval,
        )

    def _run(
        self,
        inputs,
        uncond,
        settings: ImageSampling,
        *,
        grid,
        generator,
        latents,
        callback,
        return_gates,
        edit,
    ) -> GenerationOutput:
        from tqdm.auto import tqdm

        steps = settings.num_inference_steps
        bar = tqdm(
            total=edit_steps(steps) if edit else steps,
            desc="sampling",
            disable=not self.progress,
            leave=False,
        )

        def on_step(n, t, x, v):
            bar.update(1)
            if callback is not None:
                callback(n, float(t), x)

        device = self.device
        try:
            return self._call(
                generate,
                inputs["input_ids"].to(device),
                inputs["attention_mask"].to(device),
                self._pixels(inputs),
                image_sampling=settings,
                edit_image=edit,
                stop_after_image=True,
                generator=generator,
                latents=None if latents is None else latents.to(device),
                latent_grid=grid,
                callback=on_step,
                return_gates=return_gates,
                uncond_input_ids=None if uncond is None else uncond["input_ids"].to(device),
                uncond_attention_mask=None if uncond is None else uncond["attention_mask"].to(device),
            )
        finally:
            bar.close()

    def _decode_answer(self, ids: list[int]) -> str:
        s = self.model.special
        ids = [i for i in ids if i not in (s.eos, s.pad)]
        return self.processor.decode(ids, skip_special_tokens=True).strip()

    @staticmethod
    def _postprocess(pixels: torch.Tensor, latent: torch.Tensor, output_type: str) -> Any:
        if output_type == "latent":
            return latent.float().cpu()
        img = pixels.float().clamp(0, 1).cpu()  # the release clamps only when saving
        if output_type == "pt":
            return img
        arr = img.permute(1, 2, 0).numpy()
        if output_type == "np":
            return arr
        return Image.fromarray((arr * 255).round().astype(np.uint8))
