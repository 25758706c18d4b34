"""Tiny random Cheers models for behaviour tests (seconds on a CPU)."""

from __future__ import annotations

import torch

from cheers.config import preset
from cheers.models.cheers import Cheers
from cheers.tokens import SpecialTokens

# Stand-ins for the release's special ids inside a 512-token vocabulary (any distinct ids would do).
TINY_SPECIAL = SpecialTokens(
    image=505,
    image_gen=506,
    im_start=507,
    im_end=508,
    no_mean=509,
    eos=502,
    pad=500,
    chat_start=501,
    chat_end=502,
    newline=198,
    vocab_size=512,
)


def randomize_heads(model: Cheers, seed: int = 0, scale: float = 0.05) -> Cheers:
    """Give the zero-initialised layers (AdaLN, outputs, HFI gate) random values so every path counts."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adaLN_modulation" in name or "diffusion_head_b.linear" in name or "hi_gate.gate.2" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return model


def tiny_model(seed: int = 0, **overrides) -> Cheers:
    torch.manual_seed(seed)
    cfg = preset("tiny").replace(**overrides) if overrides else preset("tiny")
    return randomize_heads(Cheers(cfg, special=TINY_SPECIAL), seed).eval()


def image_hungry_model(seed: int) -> Cheers:
    """A tiny model whose LM head always wants another image (a huge bias on <im_start>): drives interleaved
    image/text generation deterministically."""
    model = tiny_model(seed=seed)
    head = torch.nn.Linear(model.config.text.hidden_size, model.config.text.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[TINY_SPECIAL.im_start] = 1e4
    model.lm_head = head
    return model


def t2i_prompt(words: list[int], special: SpecialTokens = TINY_SPECIAL) -> torch.Tensor:
    """A chat-shaped text-to-image prompt ending in <im_start>: (1, L)."""
    s = special
    ids = [
        s.chat_start,
        101,
        s.newline,
        7,
        8,
        s.chat_end,
        s.newline,
        s.chat_start,
        102,
        s.newline,
        *words,
        s.chat_end,
        s.newline,
        s.chat_start,
        103,
        s.newline,
        s.im_start,
    ]
    return torch.tensor([ids])


def tiny_pipeline(seed: int = 5):
    """A CheersPipeline over a tiny random model and the tiny test tokenizer (128 px)."""
    from cheers.pipeline import CheersPipeline
    from cheers.processor import CheersProcessor

    from tiny_tokenizer import make_tiny_tokenizer

    processor = CheersProcessor(make_tiny_tokenizer(), image_size=128, patch_size=16)
    model = tiny_model(seed=seed)
    model.special = processor.special
    return CheersPipeline(model, processor, progress=False)


def save_pipeline(pipe, directory):
    """Write a pipeline's model and processor as a loadable release-layout directory."""
    from cheers.models.pretrained import save_pretrained

    save_pretrained(pipe.model, directory)
    pipe.processor.save_pretrained(directory)
    return directory
