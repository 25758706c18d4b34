"""Text-to-image speed: our sampler against a straightforward implementation of the release's loop.

Random weights at a preset's sizes (timing does not depend on the values). Prints seconds per image and per
step, the FLOPs of one guided step of each, images/s at several batch sizes, each path's peak memory, and the
ratio measured in this run (the two paths timed alternately, ``--repeats`` times each, medians).

    python bench/bench_sampling.py --preset small --steps 8 --guidance 3
    python bench/bench_sampling.py --preset official --steps 80 --device cuda --dtype bfloat16
    python bench/bench_sampling.py --preset small --solvers euler,multistep,heun --guidance-interval 0.2 1

``--solvers`` / ``--guidance-interval`` add rows timing our sampler with those options (same steps).
``--breakdown`` prints, for one image of each path, where its time goes (ms per image and calls per image of
the tokenizer-side VAE decoder, the ViT, the LLM, the flow heads, the VAE encoder and the output decode).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from cheers.config import preset
from cheers.flops import count_flops
from cheers.generation import generate
from cheers.models.cheers import Cheers
from cheers.models.vae_fast import install_fast_vae
from cheers.reference_loop import release_style_sample
from cheers.sampling import ImageSampling, check_solver, num_evaluations
from cheers.tokens import SpecialTokens


def build(name: str, device: str, dtype: torch.dtype) -> Cheers:
    cfg = preset(name)
    v = cfg.text.vocab_size
    special = SpecialTokens(
        image=v - 5,
        image_gen=v - 4,
        im_start=v - 3,
        im_end=v - 2,
        no_mean=v - 1,
        eos=v - 8,
        pad=v - 9,
        chat_start=v - 7,
        chat_end=v - 8,
        newline=v - 10,
        vocab_size=v,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = Cheers(cfg, special=special)
    for name_, p in model.named_parameters():  # non-zero heads, so nothing is skipped by accident
        if "adaLN_modulation" in name_ or "hi_gate.gate.2" in name_:
            torch.nn.init.normal_(p, std=0.02)
    return model.to(dtype).eval()


def prompt(model: Cheers, length: int, device: str) -> torch.Tensor:
    s = model.special
    body = torch.randint(0, model.config.text.vocab_size - 16, (length,)).tolist()
    return torch.tensor([[s.chat_start, *body, s.chat_end, s.newline, s.im_start]], device=device)


# the parts of a text-to-image call, as (label, attribute path under model.model)
PARTS = (
    ("tokenizer VAE decoder", "vae_decoder_projector"),
    ("ViT", "vision_representation.encoder"),
    ("ViT patch embedding", "vision_representation.embeddings"),
    ("LLM", "language_model"),
    ("flow head stage 1", "gen_projector"),
    ("flow head stage 2", "hi_projector"),
    ("HFI gate", "hi_gate"),
    ("understanding projector", "und_projector"),
    ("VAE encoder (prompt image)", "vae_model.encoder"),
    ("VAE decoder (output image)", "vae_model.decoder"),
)


def breakdown(model: Cheers, fn, sync) -> tuple[float, list[tuple[str, float, int]]]:
    """Run ``fn`` once with timing hooks on the model's parts: (total s, [(part, s, calls)])."""
    spent: dict[str, list[float]] = {label: [] for label, _ in PARTS}
    handles, start = [], {}
    for label, path in PARTS:
        module = model.model.get_submodule(path)

        def pre(_m, _a, label=label):
            sync()
            start[label] = time.perf_counter()

        def post(_m, _a, _o, label=label):
            sync()
            spent[label].append(time.perf_counter() - start[label])

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    try:
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        total = time.perf_counter() - t0
    finally:
        for h in handles:
            h.remove()
    return total, [(label, sum(v), len(v)) for label, v in spent.items()]


def print_breakdown(label: str, total: float, parts: list[tuple[str, float, int]]) -> None:
    print(f"where the time of one image goes ({label}, {total:.3f} s with the timing hooks):")
    for name, seconds, calls in parts + [
        ("rest (sampler, cache, glue)", total - sum(p[1] for p in parts), 0)
    ]:
        if seconds > 0 or calls:
            print(
                f"  {name:28s} {seconds * 1e3:9.1f} ms  {100 * seconds / total:5.1f} %  "
                + (f"{calls:3d} calls" if calls else "")
            )


def timed(fn, repeats: int, sync) -> float:
    fn()  # warm-up
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - start) / repeats


def peak_memory(fn, device: str) -> float:
    """Bytes of memory one call of ``fn`` needs at its peak beyond what was in use before it.

    CUDA: the allocator's peak. CPU: the process's resident set, sampled every millisecond by a thread, above
    its size at the start (freed heap memory is first handed back to the system with glibc's ``malloc_trim``,
    so the start is the live set); a sampled peak can miss a spike shorter than a millisecond."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    import ctypes
    import threading

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    page = os.sysconf("SC_PAGE_SIZE")

    def resident() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page

    base, peak, done = resident(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], resident())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        fn()
    finally:
        done.set()
        sampler.join()
    return max(peak[0], resident()) - base


def timed_pair(first, second, repeats: int, sync) -> tuple[float, float]:
    """Median seconds per call of two functions timed alternately (first, second, first, ...) after one
    warm-up call each, so that a drift in the machine's speed (a shared host) affects both alike."""
    first()
    second()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for fn, spent in zip((first, second), times):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            spent.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batches", default="1,4")
    ap.add_argument(
        "--optimize",
        default="",
        help="comma-separated opt-in speed settings for our path: "
        "channels_last, compile (CheersPipeline.optimize); the release-style loop stays plain",
    )
    ap.add_argument(
        "--solvers", default="", help="comma-separated solvers to time as well (e.g. multistep,heun)"
    )
    ap.add_argument(
        "--guidance-interval",
        type=float,
        nargs=2,
        default=None,
        metavar=("T_LO", "T_HI"),
        help="also time our sampler guiding only over [T_LO, T_HI] (per solver in --solvers)",
    )
    ap.add_argument(
        "--breakdown", action="store_true", help="print where the time of one image goes, per path"
    )
    args = ap.parse_args()
    solvers = [check_solver(x) for x in args.solvers.split(",") if x]
    dtype = getattr(torch, args.dtype)
    model = build(args.preset, args.device, dtype)
    fast = model
    opts = {x for x in args.optimize.split(",") if x}
    unknown = opts - {"channels_last", "compile"}
    if unknown:
        ap.error(f"unknown --optimize settings {sorted(unknown)}")
    if opts:  # an optimised copy with the same weights, so the baseline keeps the plain layout
        import copy

        fast = copy.deepcopy(model)
        core = fast.model
        if "channels_last" in opts:
            for part in (core.vae_model, core.vae_decoder_projector):
                part.to(memory_format=torch.channels_last)
        if "compile" in opts:
            for name in ("vae_decoder_projector", "gen_projector", "hi_projector"):
                setattr(core, name, torch.compile(getattr(core, name)))
    fast_vae = install_fast_vae(
        fast
    )  # our VAE path, as CheersPipeline runs it; the release-style loop sets it aside
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    size = model.config.image_size
    grid = (size // model.config.patch_size,) * 2
    ids = prompt(model, 24, args.device)
    dummy = torch.rand(1, 3, size, size, device=args.device, dtype=dtype)
    noise = torch.randn(1, model.config.latent_channels, *grid, device=args.device, dtype=dtype)
    kw = dict(num_inference_steps=args.steps, guidance_scale=args.guidance, shift=0.5)

    def ours(batch: int = 1, **options):
        try:
            return generate(
                fast,
                ids.expand(batch, -1),
                None,
                dummy.expand(batch, -1, -1, -1),
                image_sampling=ImageSampling(**kw, **options),
                latents=noise.expand(batch, -1, -1, -1),
                stop_after_image=True,
            )
        finally:
            fast_vae.clear()  # the decoders' buffers are freed after each call, as the pipeline does

    def release():
        return release_style_sample(model, ids, dummy, noise, **kw)

    with torch.no_grad():
        diff = (ours().images[0][0].float() - release()[0].float()).abs().max().item()
        flops = {}
        for label, fn in (("release-style", release), ("ours", ours)):
            flops[label] = count_flops(fn)[0] / args.steps
        t_rel, t_ours = timed_pair(release, ours, args.repeats, sync)
        print(
            f"preset={args.preset} device={args.device} dtype={args.dtype} steps={args.steps} "
            f"guidance={args.guidance} image={size}px threads={torch.get_num_threads()} "
            f"optimize={','.join(sorted(opts)) or 'none'}"
        )
        print(f"max |ours - release-style| on the image: {diff:.2e}")
        for label, t in (("release-style", t_rel), ("ours", t_ours)):
            f = flops[label]
            print(
                f"{label:14s} {t:8.3f} s/image  {t / args.steps * 1e3:8.1f} ms/step  "
                f"{f / 1e9:9.2f} GFLOP/step  {f * args.steps / t / 1e12:7.3f} TFLOP/s"
            )
        print(f"speed-up (release-style / ours, same run): {t_rel / t_ours:.2f}x")
        if args.breakdown:
            print_breakdown("release-style", *breakdown(model, release, sync))
            print_breakdown("ours", *breakdown(fast, ours, sync))
        intervals = [None] + ([tuple(args.guidance_interval)] if args.guidance_interval else [])
        for solver in solvers or (["euler"] if args.guidance_interval else []):
            for interval in intervals:
                t = timed(
                    lambda s=solver, i=interval: ours(solver=s, guidance_interval=i), args.repeats, sync
                )
                print(
                    f"ours solver={solver:9s} interval={interval!s:12s} {t:8.3f} s/image  "
                    f"{num_evaluations(solver, args.steps):3d} evaluations  {t_ours / t:5.2f}x euler's speed"
                )
        for batch in [int(b) for b in args.batches.split(",")]:
            t = timed(lambda b=batch: ours(b), 1, sync)
            print(
                f"batch {batch:3d}: {batch / t:7.3f} images/s  "
                f"({batch / t * t_rel:4.2f}x the release-style loop's "
                f"images/s, which runs one prompt at a time)"
            )
        if args.device.startswith("cuda") or os.path.exists("/proc/self/statm"):
            kind = "allocated" if args.device.startswith("cuda") else "resident, sampled"
            print(
                f"peak memory of one image beyond the model ({kind}): release-style "
                f"{peak_memory(release, args.device) / 2**20:.0f} MiB, "
                f"ours {peak_memory(ours, args.device) / 2**20:.0f} "
                f"MiB"
            )


if __name__ == "__main__":
    main()
