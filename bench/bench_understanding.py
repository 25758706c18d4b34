r"""Understanding speed: prefill latency and greedy text-decode tokens/s, one stream and batched with padding.

Random weights at a preset's sizes (timing does not depend on the values). Each prompt is an understanding
turn (one image at the preset's resolution, then ``--prompt-len`` text tokens); batched prompts have
different text lengths, right-padded and masked, as ``CheersPipeline.chat`` sends them. Prints the prefill
latency (to the first token), decode tokens/s over all rows (median of ``--repeats`` runs after a warm-up),
the FLOPs of the prefill and of one decode step (``FlopCounterMode``), and with ``--static-cache`` the same
decode on a pre-allocated KV cache in the same run, with ``--cuda-graph`` (CUDA only) the static decode step
replayed from a CUDA graph. Decode tokens/s is timed after the first decode step, whose time (it includes a
graph's warm-up and capture) is printed on its own.

    python bench/bench_understanding.py --preset tiny
    python bench/bench_understanding.py --preset small --batches 1,4,16 --new-tokens 32
    python bench/bench_understanding.py --preset official --device cuda --dtype bfloat16 \
        --static-cache --cuda-graph
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sampling import build  # noqa: E402

from cheers.flops import count_flops  # noqa: E402
from cheers.generation import generate, prefill  # noqa: E402
from cheers.models.cheers import Cheers  # noqa: E402
from cheers.models.vae_fast import install_fast_vae  # noqa: E402


def prompts(model: Cheers, batch: int, length: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) right-padded understanding prompts with one image each; row i is ``i`` tokens shorter
    (mod 8)."""
    s = model.special
    gen = torch.Generator().manual_seed(0)
    rows = []
    for i in range(batch):
        body = torch.randint(
            0, model.config.text.vocab_size - 16, (max(1, length - i % 8),), generator=gen
        ).tolist()
        rows.append(
            [s.chat_start, s.im_start, s.image_marker, s.im_end, *body, s.chat_end, s.newline, s.chat_start]
        )
    width = max(map(len, rows))
    ids = torch.full((batch, width), s.pad)
    mask = torch.zeros(batch, width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
    return ids.to(device), mask.to(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--prompt-len", type=int, default=32, help="text tokens per prompt (plus the image's)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--static-cache", action="store_true", help="also decode with a pre-allocated KV cache")
    ap.add_argument(
        "--cuda-graph",
        action="store_true",
        help="also decode with the static step captured in a CUDA graph (CUDA only)",
    )
    ap.add_argument("--image-size", type=int, default=None, help="input image side (default: the preset's)")
    args = ap.parse_args()
    if args.preset == "official" and not args.device.startswith("cuda"):
        raise SystemExit("the official preset is measured on a GPU: pass --device cuda")
    dtype = getattr(torch, args.dtype)
    model = build(args.preset, args.device, dtype)
    install_fast_vae(model)  # the VAE decoders as CheersPipeline runs them (the prompt image's pixel decode)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    size = args.image_size or model.config.image_size
    grid = (size // model.config.patch_size,) * 2
    if args.cuda_graph and not args.device.startswith("cuda"):
        raise SystemExit("--cuda-graph needs --device cuda")
    caches = ["dynamic"] + (["static"] if args.static_cache else []) + (["graph"] if args.cuda_graph else [])
    print(
        f"preset={args.preset} device={args.device} dtype={args.dtype} image={size}px "
        f"image tokens={grid[0] * grid[1] // 4} prompt text={args.prompt_len} new tokens={args.new_tokens} "
        f"threads={torch.get_num_threads()}"
    )
    print(
        f"{'batch':>5s} {'cache':>7s} {'prefill ms':>10s} {'GFLOP prefill':>13s} {'decode tok/s':>12s} "
        f"{'ms/step':>8s} {'MFLOP/step':>10s} {'TFLOP/s dec':>11s} {'tokens':>6s} {'1st step ms':>11s}"
    )
    for batch in [int(b) for b in args.batches.split(",")]:
        ids, mask = prompts(model, batch, args.prompt_len, args.device)
        pixels = torch.rand(batch, 3, size, size, device=args.device, dtype=dtype)
        with torch.no_grad():
            flops_prefill, _ = count_flops(prefill, model, ids, mask, pixels)
            for cache in caches:
                kw = dict(
                    max_new_tokens=args.new_tokens,
                    latent_grid=grid,
                    max_total_ids=10**6,
                    static_cache=cache == "static",
                    cuda_graph=cache == "graph",
                )
                # the same arithmetic as the static cache's (FLOPs are counted eagerly, never inside a
                # capture)
                flop_kw = dict(kw, static_cache=cache != "dynamic", cuda_graph=False)
                flops_total, out = count_flops(generate, model, ids, mask, pixels, **flop_kw)
                steps = max(len(s) for s in out.sequences)  # the first token comes from the prefill
                tokens = sum(len(s) for s in out.sequences)
                flops_step = (flops_total - flops_prefill) / max(steps - 1, 1)
                runs = [timed_generate(model, ids, mask, pixels, kw, sync) for _ in range(args.repeats + 1)][
                    1:
                ]
                t_prefill = statistics.median(r[0] for r in runs)
                t_first = statistics.median(r[1] for r in runs)
                t_decode = statistics.median(r[2] for r in runs)
                per_step = t_decode / max(steps - 2, 1)
                print(
                    f"{batch:5d} {cache:>7s} {t_prefill * 1e3:10.1f} {flops_prefill / 1e9:13.3f} "
                    f"{batch / per_step:12.1f} {per_step * 1e3:8.2f} {flops_step / 1e6:10.2f} "
                    f"{flops_step / per_step / 1e12:11.4f} {tokens:6d} {t_first * 1e3:11.1f}"
                )
    if args.device.startswith("cuda"):
        print(f"peak memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


def timed_generate(model, ids, mask, pixels, kw, sync) -> tuple[float, float, float]:
    """Seconds of (prefill: to the first token, picked from the prefill; the first decode step, which includes
    a CUDA graph's warm-up and capture; the decode steps after it, to the last token)."""
    stamps: list[float] = []

    def on_token(row: int, token: int) -> None:
        if row == 0:
            sync()
            stamps.append(time.perf_counter())

    sync()
    start = time.perf_counter()
    generate(model, ids, mask, pixels, token_callback=on_token, **kw)
    if len(stamps) < 3:
        raise SystemExit("pass --new-tokens 3 or more (decode is timed after its first step)")
    return stamps[0] - start, stamps[1] - stamps[0], stamps[-1] - stamps[1]


if __name__ == "__main__":
    main()
