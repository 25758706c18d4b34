"""Understanding benchmarks through VLMEvalKit (github.com/open-compass/VLMEvalKit): a model adapter.

VLMEvalKit builds a model from ``vlmeval.config.supported_VLM[name]()`` and calls
``model.generate(message, dataset=name)`` with ``message = [{"type": "image" | "text", "value": path | text},
...]``; :class:`CheersVLM` answers through :meth:`cheers.pipeline.CheersPipeline.chat` (greedy by default),
whose processor does the release's 512 px understanding preprocessing (scale to fit, pad black, centred).
The dataset builds the prompt (``use_custom_prompt`` is False), as the release evaluated.

Register it in either of two ways (see docs/evaluation.md):

* add two lines to VLMEvalKit's ``vlmeval/config.py``::

      from cheers.eval.vlmeval import CheersVLM
      supported_VLM["Cheers"] = partial(CheersVLM, model_path="ai9stars/Cheers")

* or, without editing VLMEvalKit,
  ``python -m cheers.eval.vlmeval run.py --data MMBench_DEV_EN --model Cheers`` registers ``Cheers``
  (:func:`register`) and then runs VLMEvalKit's ``run.py`` with the remaining arguments.

Under ``torchrun`` VLMEvalKit starts one model per process; each takes the GPU ``LOCAL_RANK``.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch

from .runner import rank_device

logger = logging.getLogger(__name__)

DEFAULT_MODEL_PATH = "ai9stars/Cheers"


class CheersVLM:
    """A VLMEvalKit model (the ``vlmeval.vlm.base.BaseModel`` interface, without importing VLMEvalKit).

    Args:
        model_path: checkpoint directory, hub id or ``"default"``.
        device: ``"auto"`` (under torchrun: ``cuda:LOCAL_RANK``), ``"cuda"``, ``"cpu"`` ...
        dtype: weights' dtype (default bfloat16 on GPUs, float32 on CPUs).
        max_new_tokens: answer length limit.
        pipeline: an already built CheersPipeline (tests, notebooks); then the arguments above are unused.
        seed: seeds the release's random dummy prefix image of text-only questions, so answers repeat.
        **generation: more :meth:`CheersPipeline.chat` options (``do_sample``, ``temperature``, ``top_p``,
            ``num_beams`` ...).
    """

    INSTALL_REQ = False  # nothing to install beyond the cheers package
    INTERLEAVE = False  # the release was trained with one image per question; several are passed in order
    allowed_types = ("text", "image")
    is_api = False

    def __init__(
        self,
        model_path: str = DEFAULT_MODEL_PATH,
        device: str = "auto",
        dtype: str | None = None,
        max_new_tokens: int = 512,
        pipeline=None,
        seed: int = 0,
        **generation: Any,
    ) -> None:
        if pipeline is None:
            from cheers.pipeline import CheersPipeline

            dev = rank_device(device)
            on_gpu = dev.startswith("cuda") or (dev == "auto" and torch.cuda.is_available())
            dtype = dtype or ("bfloat16" if on_gpu else "float32")
            pipeline = CheersPipeline.from_pretrained(model_path, device=dev, dtype=dtype, progress=False)
        self.pipe = pipeline
        self.model_path = model_path
        self.max_new_tokens = max_new_tokens
        self.seed = seed
        self.generation = generation
        self.dump_image_func: Callable | None = None

    # -- the VLMEvalKit interface ---------------------------------------------------------------------------
    def use_custom_prompt(self, dataset: str | None) -> bool:
        return False  # the dataset's own prompt (options, hints and answer format), as the release did

    def build_prompt(self, line, dataset: str | None = None):
        raise NotImplementedError("CheersVLM uses the datasets' prompts (use_custom_prompt is False)")

    def set_dump_image(self, dump_image_func: Callable) -> None:
        self.dump_image_func = dump_image_func

    def dump_image(self, line, dataset: str):
        return self.dump_image_func(line)

    def generate(self, message, dataset: str | None = None) -> str:
        """VLMEvalKit's entry: normalise ``message`` (a str, a dict, a list of those) and answer it."""
        return self.generate_inner(_normalise(message), dataset)

    def generate_inner(self, message: list[dict[str, str]], dataset: str | None = None) -> str:
        """Answer one single-turn message:
        ``[{"type": "image", "value": path}, {"type": "text", "value": q}]``."""
        content, images = self._content(message)
        return self._answer([{"role": "user", "content": content}], images)

    def chat_inner(self, message: list[dict[str, Any]], dataset: str | None = None) -> str:
        """Multi-turn datasets: ``[{"role": "user" | "assistant", "content": [items]}, ...]``."""
        conversation, images = [], []
        for turn in message:
            content, imgs = self._content(turn["content"])
            conversation.append({"role": turn["role"], "content": content})
            images += imgs
        return self._answer(conversation, images)

    def chat(self, messages: list[dict[str, Any]], dataset: str | None = None) -> str:
        return self.chat_inner(messages, dataset)

    # -- helpers ---------------------------------------------------------------------------------------------
    def _content(self, items: Sequence[dict[str, str]]) -> tuple[list[dict[str, str]], list[Any]]:
        from cheers.image_ops import load_image

        content, images = [], []
        for item in items:
            if item["type"] == "image":
                images.append(load_image(item["value"]))
                content.append({"type": "image"})
            elif item["type"] == "text":
                content.append({"type": "text", "text": item["value"]})
            else:
                raise ValueError(f"CheersVLM takes 'text' and 'image' items, got {item['type']!r}")
        if not any(c["type"] == "text" for c in content):
            raise ValueError("a VLMEvalKit message needs at least one text item")
        return content, images

    def _answer(self, conversation: list[dict[str, Any]], images: list[Any]) -> str:
        # The generator seeds the dummy image (drawn on the CPU); sampling on a GPU cannot use a CPU
        # generator, so sampled answers there fall back to torch's global generator.
        sampled_on_gpu = self.generation.get("do_sample") and self.pipe.device.type != "cpu"
        out = self.pipe.chat(
            conversation,
            images=images or None,
            max_new_tokens=self.max_new_tokens,
            generator=None if sampled_on_gpu else torch.Generator().manual_seed(self.seed),
            **self.generation,
        )
        return out.texts[0]


def _normalise(message) -> list[dict[str, str]]:
    """VLMEvalKit's accepted message forms -> a list of {"type", "value"} dicts
    (``BaseModel.preproc_content``)."""
    if isinstance(message, str):
        return [{"type": "text", "value": message}]
    if isinstance(message, dict):
        message = [message]
    out = []
    for (
        item
    ) in message:  # a str that is an existing path is an image, anything else text (as VLMEvalKit guesses)
        if isinstance(item, str):
            out.append({"type": "image" if os.path.isfile(item) else "text", "value": item})
        elif isinstance(item, dict) and "type" in item and "value" in item:
            out.append({"type": item["type"], "value": item["value"]})
        else:
            raise ValueError(
                f"a VLMEvalKit message item is a str or a {{'type', 'value'}} dict, got {item!r:.80}"
            )
    return out


def register(name: str = "Cheers", model_path: str = DEFAULT_MODEL_PATH, **kwargs: Any) -> None:
    """Add ``name`` -> CheersVLM to VLMEvalKit's ``supported_VLM`` (VLMEvalKit must be importable)."""
    try:
        from vlmeval.config import supported_VLM
    except ImportError as err:
        raise ImportError("VLMEvalKit is not installed: pip install -e <VLMEvalKit checkout>") from err
    supported_VLM[name] = partial(CheersVLM, model_path=model_path, **kwargs)


def main(argv: list[str] | None = None) -> int:
    """``python -m cheers.eval.vlmeval [--cheers-model PATH] RUN_PY ARGS...``: register and run VLMEvalKit."""
    import runpy

    argv = list(sys.argv[1:] if argv is None else argv)
    model_path = DEFAULT_MODEL_PATH
    if argv[:1] == ["--cheers-model"]:
        model_path, argv = argv[1], argv[2:]
    if not argv or not argv[0].endswith(".py"):
        print(
            "usage: python -m cheers.eval.vlmeval [--cheers-model PATH] path/to/VLMEvalKit/run.py "
            "--data MMBench_DEV_EN --model Cheers",
            file=sys.stderr,
        )
        return 2
    register("Cheers", model_path)
    saved, sys.argv = sys.argv, argv  # run.py parses sys.argv
    try:
        runpy.run_path(argv[0], run_name="__main__")
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
