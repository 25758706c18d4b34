"""A stand-in pipeline for the server's fast tests: records each batched call, can hold the first one.

It has a real tiny processor and model (chat templates, token decoding, image geometry) but answers
``generate`` / ``edit`` / ``chat`` at once with plain images and fixed tokens.
"""

from __future__ import annotations

import threading
from types import SimpleNamespace

from PIL import Image


class FakePipe:
    """Args:
    base: a real (tiny) pipeline whose processor and model are used for templates and geometry.
    hold: block every call until :meth:`release` (to pile requests up behind a running one).
    """

    def __init__(self, base, hold: bool = False) -> None:
        self.processor, self.model = base.processor, base.model
        self.calls: list[tuple[str, dict]] = []
        self.entered = threading.Event()
        self.gate = threading.Event()
        if not hold:
            self.gate.set()

    def release(self) -> None:
        self.gate.set()

    def _enter(self, name: str, **info) -> None:
        self.calls.append((name, info))
        self.entered.set()
        if not self.gate.wait(30):
            raise TimeoutError("the test never released the fake pipeline")

    def generate(self, prompts, negative_prompt=None, *, height, width, generator, **kwargs):
        for p in prompts:
            if "boom" in p:
                raise RuntimeError("the fake pipeline exploded")
            if "invalid" in p:
                raise ValueError("the fake pipeline refuses this prompt")
        seeds = [g.initial_seed() for g in generator]
        self._enter("generate", prompts=list(prompts), negative=negative_prompt, seeds=seeds, **kwargs)
        images = [Image.new("RGB", (width, height), (s % 256, 0, 0)) for s in seeds]
        return SimpleNamespace(images=images)

    def edit(self, images, instructions, *, generator, **kwargs):
        seeds = [g.initial_seed() for g in generator]
        self._enter("edit", instructions=list(instructions), seeds=seeds, **kwargs)
        side = self.processor.image_size
        return SimpleNamespace(images=[Image.new("RGB", (side, side), (0, s % 256, 0)) for s in seeds])

    def chat(self, conversations, *, max_new_tokens, generator=None, stream=False, **kwargs):
        if stream:
            self._enter("stream", max_new_tokens=max_new_tokens, **kwargs)
            return (piece for piece in ["Hel", "lo", " EN", "D and more"])  # closable, like the pipeline's
        seeds = [g.initial_seed() for g in generator]
        self._enter("chat", n=len(conversations), seeds=seeds, max_new_tokens=max_new_tokens, **kwargs)
        words = self.processor.encode("one two three four five six seven eight")
        ids = [words[:max_new_tokens] for _ in conversations]
        return SimpleNamespace(token_ids=ids, texts=[self.processor.decode(i) for i in ids])
