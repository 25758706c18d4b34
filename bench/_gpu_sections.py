"""The measurements of bench/gpu_suite.py, one function per section; each runs in its own process.

A section reports rows through ``emit(measurement, value, note)``: a number, or a string ("skipped: ...",
"n/a") where a number cannot be had. Settings come from :class:`Settings` (the GPU run, or ``--cpu``'s
reduced run).
"""

from __future__ import annotations

import functools
import gc
import re
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from bench_memory import (
    ALL_BUT_VAE,
    TrainStep,
    add_lora,
    chat_messages,
    measured_peak,
    random_model,
    shapes_processor,
    training_batch,
)
from bench_sampling import build, prompt
from bench_understanding import prompts

from cheers.flops import count_flops
from cheers.generation import generate
from cheers.models.vae_fast import install_fast_vae
from cheers.sampling import ImageSampling

REPO = Path(__file__).resolve().parents[1]
Emit = Callable[..., None]
# the parts of a sampling step with fixed shapes at every step (CheersPipeline.optimize compiles the same);
# the LLM's step runs on a growing KV cache and stays eager
STEP_PARTS = ("vae_decoder_projector", "gen_projector", "hi_projector")
# dense bf16 peak TFLOP/s by a fragment of torch.cuda.get_device_name() (first match wins)
BF16_PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H200", 989.0),
    ("A100", 312.0),
)


@dataclass
class Settings:
    cpu: bool
    preset: str = "official"
    steps: int = 80  # text-to-image steps
    guidance: float = 3.0
    new_tokens: int = 48  # decode length
    batches: tuple[int, ...] = (1, 8)  # decode batches
    train_batch: int = 4
    train_steps: int = 3  # timed training steps
    memory_steps: int = 2  # text-to-image steps of the memory rows (memory does not grow with steps)
    chat_tokens: int = 16

    @classmethod
    def for_mode(cls, cpu: bool) -> Settings:
        if not cpu:
            return cls(cpu=False)
        return cls(cpu=True, preset="tiny", steps=4, new_tokens=16, train_batch=2, train_steps=2)

    @property
    def device(self) -> str:
        return "cpu" if self.cpu else "cuda"

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32 if self.cpu else torch.bfloat16

    def sync(self) -> None:
        if not self.cpu:
            torch.cuda.synchronize()


def bf16_peak_tflops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in BF16_PEAK_TFLOPS if key in name), None)


def median_seconds(fn: Callable[[], object], repeats: int, sync: Callable[[], None]) -> float:
    times = []
    for _ in range(repeats):
        sync()
        tic = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - tic)
    return statistics.median(times)


def gib(n: int | None) -> float:
    return (n or 0) / 2**30


def attempt(emit: Emit, rows: list[str], part: Callable[[Emit], None]) -> None:
    """Run one part of a section; if it raises, its rows not yet reported become error rows and the section
    goes on (a CUDA error that breaks the context fails the parts after it as well)."""
    done: set[str] = set()

    def tracked(measurement: str, value, note: str = "") -> None:
        done.add(measurement)
        emit(measurement, value, note)

    try:
        part(tracked)
    except Exception as err:  # reported in the table; the traceback goes to the log
        traceback.print_exc()
        for row in rows:
            if row not in done:
                emit(row, "error", f"{type(err).__name__}: {err}"[:200])


# -- text to image -------------------------------------------------------------------------------------------


class T2I:
    """The random-weight model and one prompt; ``run(steps)`` samples one image with guidance."""

    def __init__(self, s: Settings) -> None:
        self.s = s
        self.model = build(s.preset, s.device, s.dtype)
        self.fast_vae = install_fast_vae(self.model)
        size = self.model.config.image_size
        grid = (size // self.model.config.patch_size,) * 2
        self.size = size
        self.ids = prompt(self.model, 24, s.device)
        self.dummy = torch.rand(1, 3, size, size, device=s.device, dtype=s.dtype)
        self.noise = torch.randn(1, self.model.config.latent_channels, *grid, device=s.device, dtype=s.dtype)

    @torch.no_grad()
    def run(self, steps: int, callback=None):
        try:
            return generate(
                self.model,
                self.ids,
                None,
                self.dummy,
                image_sampling=ImageSampling(steps, guidance_scale=self.s.guidance, shift=0.5),
                latents=self.noise,
                stop_after_image=True,
                callback=callback,
            )
        finally:
            self.fast_vae.clear()

    def flops(self) -> tuple[float, float]:
        """(FLOPs per image at ``steps``, per guided step): counted at 2 and 4 steps, linear in between."""
        two, four = (count_flops(self.run, n)[0] for n in (2, 4))
        per_step = (four - two) / 2
        return two + (self.s.steps - 2) * per_step, per_step

    def emit_rows(self, emit: Emit, label: str, seconds: float, flops: float, note: str = "") -> None:
        s = self.s
        setting = f"{s.preset}, {self.size} px, {s.steps} steps, guidance {s.guidance:g}, {str(s.dtype)[6:]}"
        emit(f"{label} s/image", seconds, f"{setting}{note}")
        peak = bf16_peak_tflops()
        share = f"; {100 * flops / seconds / 1e12 / peak:.1f} % of the bf16 peak" if peak else ""
        emit(f"{label} TFLOP/s", flops / seconds / 1e12, f"{flops / 1e12:.2f} TFLOP per image{share}")


class CudaGraphed:
    """Replays a module's forward from a CUDA graph captured per input signature (tensors are copied into
    the graph's static inputs; the outputs are cloned out of its static outputs)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.forward = module.forward  # the class's or an installed instance forward (the fast VAE)
        self.graphs: dict[tuple, tuple] = {}
        module.forward = self

    def __call__(self, *args):
        key = tuple((a.shape, a.dtype, a.device) if torch.is_tensor(a) else a for a in args)
        if key not in self.graphs:
            static = [a.clone() if torch.is_tensor(a) else a for a in args]
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):  # warm-up outside the capture (lazy init, cuBLAS workspaces)
                    self.forward(*static)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = self.forward(*static)
            self.graphs[key] = (graph, static, out)
        graph, static, out = self.graphs[key]
        for dst, src in zip(static, args):
            if torch.is_tensor(src):
                dst.copy_(src)
        graph.replay()
        return torch.utils._pytree.tree_map(lambda t: t.clone() if torch.is_tensor(t) else t, out)


def section_t2i(s: Settings, emit: Emit) -> None:
    """Eager, then the same model with the step's fixed-shape parts replayed from CUDA graphs."""
    t2i = T2I(s)
    flops, per_step = t2i.flops()
    t2i.run(2)  # warm-up
    eager = median_seconds(lambda: t2i.run(s.steps), 1, s.sync)
    t2i.emit_rows(emit, "eager", eager, flops, f"; {per_step / 1e9:.0f} GFLOP per guided step")
    if s.cpu:
        for row in ("CUDA graphs s/image", "CUDA graphs TFLOP/s"):
            emit(row, "skipped", "--cpu: CUDA graphs need CUDA")
        return
    core = t2i.model.model
    for name in STEP_PARTS:
        CudaGraphed(getattr(core, name))
    tic = time.perf_counter()
    t2i.run(2)  # captures
    capture = time.perf_counter() - tic
    graphed = median_seconds(lambda: t2i.run(s.steps), 1, s.sync)
    t2i.emit_rows(
        emit,
        "CUDA graphs",
        graphed,
        flops,
        f"; {', '.join(STEP_PARTS)} graphed, LLM eager; capture {capture:.1f} s; "
        f"{eager / graphed:.2f}x eager",
    )


def section_t2i_compile(s: Settings, emit: Emit) -> None:
    """The step's fixed-shape parts compiled with torch.compile (default mode): the tokenizer-side VAE
    decoder as one graph, the flow heads block by block (regional compilation: the identical DiT blocks of a
    head share one compiled graph, which keeps the compile time inside the suite's budget)."""
    t2i = T2I(s)
    flops, _ = t2i.flops()
    core = t2i.model.model
    core.vae_decoder_projector.compile()
    for head in (core.gen_projector, core.hi_projector):
        for block in head.diffusion_head_a:
            block.compile()
    tic = time.perf_counter()
    t2i.run(2)  # compiles
    compile_s = time.perf_counter() - tic
    seconds = median_seconds(lambda: t2i.run(s.steps), 1, s.sync)
    note = f"; VAE decoder and DiT blocks compiled (LLM eager), compile {compile_s:.0f} s"
    t2i.emit_rows(emit, "compiled", seconds, flops, note)


# -- understanding decode ------------------------------------------------------------------------------------


def decode_tokens_per_s(model, ids, mask, pixels, kw, sync) -> float:
    """Tokens/s over all rows, timed from the second decode step (the first includes a graph's capture)."""
    stamps: list[float] = []

    def on_token(row: int, token: int) -> None:
        if row == 0:
            sync()
            stamps.append(time.perf_counter())

    generate(model, ids, mask, pixels, token_callback=on_token, **kw)
    if len(stamps) < 4:
        raise RuntimeError(f"row 0 stopped after {len(stamps)} tokens: too few to time")
    return ids.shape[0] * (len(stamps) - 2) / (stamps[-1] - stamps[1])


def section_decode(s: Settings, emit: Emit) -> None:
    model = build(s.preset, s.device, s.dtype)
    install_fast_vae(model)
    size = model.config.image_size
    grid = (size // model.config.patch_size,) * 2
    caches = {"dynamic": {}, "static": {"static_cache": True}, "static+graph": {"cuda_graph": True}}
    for batch in s.batches:
        ids, mask = prompts(model, batch, 32, s.device)
        pixels = torch.rand(batch, 3, size, size, device=s.device, dtype=s.dtype)
        rates: dict[str, float] = {}
        for label, options in caches.items():
            row = f"batch {batch} {label} tokens/s"
            if label == "static+graph" and s.cpu:
                emit(row, "skipped", "--cpu: CUDA graphs need CUDA")
                continue
            kw = dict(
                max_new_tokens=s.new_tokens,
                latent_grid=grid,
                max_total_ids=10**6,
                image_sampling=ImageSampling(num_inference_steps=1),  # a random <im_start> costs one step
                **options,
            )
            run = functools.partial(decode_tokens_per_s, model, ids, mask, pixels, kw, s.sync)
            note = f"{s.preset}, {size} px + 32 text tokens, {s.new_tokens} new"
            attempt(emit, [row], functools.partial(decode_row, run, row, label, rates, note))


def decode_row(
    run: Callable[[], float], row: str, label: str, rates: dict[str, float], note: str, emit
) -> None:
    with torch.no_grad():
        runs = [run() for _ in range(3)]  # the first one warms up
    rates[label] = statistics.median(runs[1:])
    base = rates.get("dynamic")
    ratio = f"; {rates[label] / base:.2f}x dynamic" if base and label != "dynamic" else ""
    emit(row, rates[label], note + ratio)


# -- training ------------------------------------------------------------------------------------------------


def timed_training(s: Settings, step: TrainStep, batch: int) -> tuple[float, dict]:
    step()  # warm-up
    with measured_peak(s.device) as peak:
        seconds = median_seconds(step, s.train_steps, s.sync)
    return batch / seconds, peak


def train_rows(s: Settings, emit: Emit, lora: bool, batch: int) -> None:
    processor = shapes_processor(s.preset)
    # float32 weights, bf16 autocast on CUDA: the trainer's precision policy
    model = random_model(s.preset, s.device, torch.float32, processor.special)
    if lora:
        trainable = add_lora(model, 16, 32.0)
    else:
        trainable = sum(n for n in model.set_trainable(ALL_BUT_VAE).values())
    step = TrainStep(model, training_batch(processor, model.config, batch), s.device)
    label = "LoRA" if lora else "full"
    setting = f"{s.preset}, batch {batch}, {trainable / 1e6:.1f} M trainable"
    flops = None
    if not lora:
        flops, _ = count_flops(step)  # also the first warm-up step
    rate, peak = timed_training(s, step, batch)
    memory = peak["rss"] if s.cpu else peak["cuda"]
    emit(f"{label} samples/s", rate, setting)
    if flops is not None:
        achieved = flops * rate / batch / 1e12
        emit(f"{label} TFLOP/s", achieved, f"{flops / batch / 1e9:.1f} GFLOP per sample (forward + backward)")
        peak_tflops = bf16_peak_tflops()
        if peak_tflops:
            emit(f"{label} MFU %", 100 * achieved / peak_tflops, f"of {peak_tflops:g} TFLOP/s dense bf16")
        else:
            name = "CPU" if s.cpu else torch.cuda.get_device_name()
            emit(f"{label} MFU %", "n/a", f"no bf16 peak known for {name}")
    where = "resident set of the process" if s.cpu else "CUDA allocator"
    emit(f"{label} peak GiB", gib(memory), f"{where}: weights, gradients, AdamW state, activations")


def section_train(s: Settings, emit: Emit) -> None:
    from gpu_suite import expected_rows

    for lora in (False, True):
        label = "LoRA" if lora else "full"
        rows = [r for r in expected_rows("train") if r.startswith(label)]
        attempt(emit, rows, lambda emit, lora=lora: train_with_fallback(s, emit, lora))


def train_with_fallback(s: Settings, emit: Emit, lora: bool) -> None:
    """The training rows at ``s.train_batch``, halving the batch while it runs out of memory."""
    batch = s.train_batch
    while True:
        try:
            train_rows(s, emit, lora, batch)
            break
        except torch.OutOfMemoryError:
            if batch == 1:
                raise
            batch //= 2
            print(f"out of memory: training {'LoRA' if lora else 'full'} again at batch {batch}", flush=True)
        finally:
            gc.collect()
            if not s.cpu:
                torch.cuda.empty_cache()


# -- inference memory ----------------------------------------------------------------------------------------


def section_memory(s: Settings, emit: Emit, mode: str) -> None:
    """Peak memory of a pipeline text-to-image call and a short chat: plain, int8 weights or model offload."""
    import numpy as np
    from PIL import Image

    from cheers.pipeline import CheersPipeline

    processor = shapes_processor(s.preset)
    model = random_model(s.preset, s.device, s.dtype, processor.special)
    if mode == "int8":
        from cheers.quantization import quantize_model

        model = quantize_model(model, "int8")
    pipe = CheersPipeline(model, processor, progress=False).enable_fast_vae()
    if mode == "offload":
        model.to("cpu")
        try:
            pipe.enable_model_cpu_offload(device=s.device)
        except (ValueError, RuntimeError) as err:
            for task in ("t2i", "chat"):
                emit(f"{mode} {task} peak GiB", "skipped", str(err)[:120])
            return
    size = processor.image_size
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8))
    calls = {
        "t2i": lambda: pipe.generate(
            "a red circle", num_inference_steps=s.memory_steps, guidance_scale=s.guidance, output_type="pt"
        ),
        "chat": lambda: pipe.chat(chat_messages(), images=[image], max_new_tokens=s.chat_tokens),
    }
    resident = torch.cuda.memory_allocated() if not s.cpu else None
    for task, call in calls.items():

        def measure(emit: Emit, task=task, call=call) -> None:
            call()  # warm-up
            with measured_peak(s.device) as peak:
                seconds = median_seconds(call, 1, s.sync)
            what = f"{s.memory_steps} steps" if task == "t2i" else f"{s.chat_tokens} new tokens"
            if s.cpu:
                value, note = gib(peak["rss"]), f"resident set (process); {what}, {seconds:.2f} s"
            else:
                value = gib(peak["cuda"])
                note = f"CUDA allocator, {gib(resident):.2f} GiB resident before; {what}, {seconds:.2f} s"
            emit(f"{mode} {task} peak GiB", value, f"{str(s.dtype)[6:]} activations; {note}")

        attempt(emit, [f"{mode} {task} peak GiB"], measure)


# -- the CUDA-only tests -------------------------------------------------------------------------------------


def section_cuda_tests(s: Settings, emit: Emit) -> None:
    cmd = [sys.executable, "-m", "pytest", "-o", "addopts=", "-q", "-rs", "-p", "no:cacheprovider"]
    proc = subprocess.run([*cmd, "tests/test_cuda.py"], cwd=REPO, capture_output=True, text=True)
    print(proc.stdout[-4000:], proc.stderr[-2000:], flush=True)
    found = re.findall(r"^=*\s*(\d+ (?:passed|failed|skipped|errors?).*?)\s*=*$", proc.stdout, re.M)
    summary = found[-1] if found else f"pytest exit status {proc.returncode}"
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?)", summary)}
    failed = counts.get("failed", 0) + counts.get("error", 0) + counts.get("errors", 0)
    if failed or proc.returncode not in (0, 5) or not counts:
        emit("tests/test_cuda.py passed", "error", summary)
    else:
        note = summary + (" (no CUDA device)" if s.cpu else "")
        emit("tests/test_cuda.py passed", counts.get("passed", 0), note)


SECTIONS = {
    "t2i": section_t2i,
    "decode": section_decode,
    "train": section_train,
    "memory-plain": lambda s, emit: section_memory(s, emit, "plain"),
    "memory-int8": lambda s, emit: section_memory(s, emit, "int8"),
    "memory-offload": lambda s, emit: section_memory(s, emit, "offload"),
    "cuda-tests": section_cuda_tests,
    "t2i-compile": section_t2i_compile,
}
