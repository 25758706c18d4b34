"""Peak memory and time: float / int8 / model-offload inference and full / LoRA training steps, in one run.

Each configuration runs in a fresh process, so that its peak is its own: the resident set of the process
(``VmHWM`` of /proc, reset with ``clear_refs`` after loading, so the peak is that of the timed calls with the
model in memory; absolute, the Python and torch runtime included) and, on CUDA, the allocator's peak
(absolute: weights included). Inference is the pipeline's (``CheersPipeline``): a text-to-image call and a
short chat about an image; training is one optimizer step (forward, backward, AdamW) on a ShapesWorld batch,
every group but the VAE trained (full) or LoRA adapters on the LLM and flow-head projections with the rest
frozen. One table with each configuration's ratio to the float one of its kind.

    python bench/bench_memory.py                                    # the bundled model, CPU, ~2 minutes
    python bench/bench_memory.py --device cuda --preset official --steps 20

``--preset tiny-shapes`` (default) loads the bundled model; another preset gets random weights, written once
to a temporary checkpoint in the release layout (with the ShapesWorld tokenizer) that every configuration
loads from.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ALL_BUT_VAE = ["pixel_decoder", "vision_encoder", "und_projector", "llm", "flow_head", "hfi_gate"]
# LoRA targets when cheers.lora is absent: the LLM's and both flow heads' attention and MLP projections
LORA_TARGETS = (
    r"model\.(language_model|gen_projector|hi_projector)\..*\."
    r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
)
CONFIGS = {  # name: (mode, task)
    "float-t2i": ("float", "t2i"),
    "float-chat": ("float", "chat"),
    "int8-t2i": ("int8", "t2i"),
    "int8-chat": ("int8", "chat"),
    "offload-t2i": ("offload", "t2i"),
    "offload-chat": ("offload", "chat"),
    "train-full": ("full", "train"),
    "train-lora": ("lora", "train"),
}
RESULT = "RESULT "  # a worker's result line


# -- memory readings -----------------------------------------------------------------------------------------


def _status_kib(field: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
    return int(match.group(1)) if match else None


def resident_bytes() -> int:
    """The process's resident set now (0 where /proc is missing)."""
    return (_status_kib("VmRSS") or 0) * 1024


def reset_peak_resident() -> bool:
    """Reset the kernel's record of the peak resident set (Linux ``clear_refs``); False where refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_resident_bytes() -> int:
    """The peak resident set since the last reset (else since the start: ``ru_maxrss``)."""
    hwm = _status_kib("VmHWM")
    if hwm is not None:
        return hwm * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@contextlib.contextmanager
def measured_peak(device: str):
    """Yields a dict that holds, on exit, ``rss`` (the process's peak resident set during the block, bytes,
    absolute) and ``cuda`` (the allocator's peak during the block, absolute; None off CUDA).

    Where the kernel's peak cannot be reset, the resident set is sampled every millisecond instead."""
    out: dict[str, int | None] = {"cuda": None}
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    exact = reset_peak_resident()
    sampled, done = [resident_bytes()], threading.Event()

    def sample() -> None:
        while not done.is_set():
            sampled[0] = max(sampled[0], resident_bytes())
            time.sleep(0.001)

    sampler = None if exact else threading.Thread(target=sample, daemon=True)
    if sampler is not None:
        sampler.start()
    try:
        yield out
    finally:
        done.set()
        if sampler is not None:
            sampler.join()
        if cuda:
            torch.cuda.synchronize()
            out["cuda"] = torch.cuda.max_memory_allocated()
        out["rss"] = peak_resident_bytes() if exact else max(sampled[0], resident_bytes())


# -- models and batches --------------------------------------------------------------------------------------


def random_model(name: str, device: str, dtype: torch.dtype, special):
    """A preset's model with random weights (as bench_sampling builds it, with the given special ids)."""
    from cheers.config import preset
    from cheers.models.cheers import Cheers

    torch.manual_seed(0)
    with torch.device(device):
        model = Cheers(preset(name), special=special)
    for name_, p in model.named_parameters():  # non-zero heads, so nothing is skipped by accident
        if "adaLN_modulation" in name_ or "hi_gate.gate.2" in name_:
            torch.nn.init.normal_(p, std=0.02)
    return model.to(dtype).eval()


def shapes_processor(name: str):
    """The ShapesWorld tokenizer at a preset's resolution and vocabulary."""
    from cheers.config import preset
    from cheers.data.shapes_source import build_shapes_processor

    cfg = preset(name)
    return build_shapes_processor(cfg.image_size, cfg.patch_size, cfg.text.vocab_size)


def random_checkpoint(name: str, directory: Path) -> Path:
    """Write a random-weight model of preset ``name`` and its processor in the release layout."""
    from cheers.models.pretrained import save_pretrained

    processor = shapes_processor(name)
    save_pretrained(random_model(name, "cpu", torch.float32, processor.special), directory)
    processor.save_pretrained(directory)
    return directory


def training_batch(processor, config, size: int, seed: int = 0):
    """A collated batch of ``size`` ShapesWorld samples (text-to-image and understanding, alternating)."""
    from cheers.data.collate import collate
    from cheers.data.samples import SampleBuilder
    from cheers.data.shapes_source import ShapesSource
    from cheers.data.sources import CorruptSample

    grid = config.image_size // config.patch_size
    builder = SampleBuilder(
        processor,
        (config.latent_channels, grid, grid),
        cfg_dropout=0.0,
        max_length=config.options.max_sequence_length,
        tokens_per_image=grid * grid // 4,
    )
    resolution = config.image_size if config.image_size % 64 == 0 else 128
    sources = [ShapesSource(task, 1000, seed, resolution) for task in ("generation", "understanding")]
    samples, i = [], 0
    while len(samples) < size:
        record, images = sources[i % 2].load(i // 2)
        with contextlib.suppress(CorruptSample):
            samples.append(builder(record, images, seed + i))
        i += 1
    return collate(samples, processor.special.pad)


def add_lora(model, r: int = 16, alpha: float = 32.0, dropout: float = 0.0) -> int:
    """Freeze ``model`` and add one trainable LoRA adapter (``cheers.lora``'s default targets: the LLM's and
    both flow heads' projections); returns the number of trainable parameters. Without ``cheers.lora``, peft
    directly on the same projections."""
    model.set_trainable([])
    try:
        from cheers.lora import LoraSpec, add_adapter
    except ImportError:
        from peft import LoraConfig, inject_adapter_in_model

        config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=LORA_TARGETS)
        inject_adapter_in_model(config, model)
        for name, p in model.named_parameters():
            p.requires_grad_("lora_" in name)
    else:
        add_adapter(model, LoraSpec(r=r, alpha=alpha, dropout=dropout), trainable=True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class TrainStep:
    """One optimizer step of the trainer's kind (autocast as the trainer's policy, clip, AdamW)."""

    def __init__(self, model, batch, device: str) -> None:
        from cheers.models.vae_fast import install_fast_vae
        from cheers.training.config import TrainSection
        from cheers.training.loop import autocast_context
        from cheers.training.optim import build_optimizer, trainable_parameters

        install_fast_vae(model)  # as the trainer runs the VAE decoders
        named = trainable_parameters(model)
        self.model, self.batch = model.train(), batch.to(device)
        self.params = [p for _, p in named]
        self.optimizer = build_optimizer(named, TrainSection(lr=1e-5))
        self.autocast = autocast_context("auto", torch.device(device))

    def __call__(self) -> float:
        with self.autocast():
            out = self.model(**self.batch.model_inputs())
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(out.loss.detach())


# -- one configuration (a worker process) --------------------------------------------------------------------


def chat_messages():
    return [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": "What shapes are in the image?"}],
        }
    ]


def load_pipeline(mode: str, checkpoint: str, device: str, dtype: str):
    from cheers.pipeline import CheersPipeline

    if mode == "float":
        return CheersPipeline.from_pretrained(checkpoint, device=device, dtype=dtype, progress=False)
    if mode == "int8":
        return CheersPipeline.from_pretrained(
            checkpoint, device=device, dtype=dtype, progress=False, quantization="int8"
        )
    pipe = CheersPipeline.from_pretrained(checkpoint, device="cpu", dtype=dtype, progress=False)
    pipe.enable_model_cpu_offload(device=device)
    return pipe


def worker(args) -> dict:
    """Load, warm up, then time ``--repeats`` calls of one configuration; the peaks are those of the timed
    calls (loading excluded)."""
    import numpy as np
    from PIL import Image

    import cheers.pipeline  # noqa: F401  (the runtime every configuration shares, before the baseline)

    mode, task = CONFIGS[args.worker]
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    imports = resident_bytes()
    start = time.perf_counter()
    if task == "train":
        from cheers.models.pretrained import from_pretrained
        from cheers.processor import CheersProcessor

        # float32 weights as the trainer keeps them (bf16 autocast on CUDA)
        model = from_pretrained(args.checkpoint, dtype=torch.float32, device=args.device)
        processor = CheersProcessor.from_pretrained(args.checkpoint)
        if mode == "full":
            model.set_trainable(ALL_BUT_VAE)
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        else:
            trainable = add_lora(model, args.lora_rank, 2 * args.lora_rank)
        call = TrainStep(model, training_batch(processor, model.config, args.train_batch), args.device)
        what = f"{trainable / 1e6:.2f} M trainable, batch {args.train_batch}"
    else:
        pipe = load_pipeline(mode, args.checkpoint, args.device, args.dtype)
        size = args.resolution or pipe.processor.image_size
        image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8))
        if task == "t2i":

            def call():
                return pipe.generate(
                    "a red circle above a blue square",
                    num_inference_steps=args.steps,
                    guidance_scale=3.0,
                    height=size,
                    width=size,
                    generator=torch.Generator().manual_seed(0),
                    output_type="pt",
                )

            what = f"{size} px, {args.steps} steps, guidance 3"
        else:

            def call():
                return pipe.chat(chat_messages(), images=[image], max_new_tokens=args.new_tokens)

            what = f"{args.new_tokens} new tokens"
        if mode == "offload" and args.device == "cpu":
            what += " (CPU: the hooks run, nothing moves)"
    sync()
    load_s = time.perf_counter() - start
    loaded = resident_bytes()
    call()  # warm-up
    sync()
    with measured_peak(args.device) as peak:
        times = []
        for _ in range(args.repeats):
            tic = time.perf_counter()
            call()
            sync()
            times.append(time.perf_counter() - tic)
    return {
        "config": args.worker,
        "what": what,
        "load_s": load_s,
        "seconds": sorted(times)[len(times) // 2],
        "rss_imports": imports,
        "rss_loaded": loaded,
        "rss_peak": peak["rss"],
        "cuda_peak": peak["cuda"],
    }


# -- the driver ----------------------------------------------------------------------------------------------


def run_config(name: str, args, checkpoint: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--checkpoint", checkpoint]
    for flag in ("device", "dtype", "steps", "repeats", "new_tokens", "train_batch", "lora_rank"):
        cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    if args.resolution:
        cmd += ["--resolution", str(args.resolution)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"config": name, "error": f"timed out after {args.timeout} s"}
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT):
            return json.loads(line[len(RESULT) :])
    lines = [x for x in (proc.stderr or proc.stdout).strip().splitlines() if x.strip()]
    return {"config": name, "error": lines[-1] if lines else f"exit status {proc.returncode}"}


def print_table(results: list[dict], device: str) -> None:
    mib = 2**20
    cuda = device.startswith("cuda")
    head = (
        "| configuration | what | load s | s/call | RSS after load MiB | peak RSS MiB | peak − imports MiB |"
    )
    head += " ratio |" + (" CUDA peak MiB | CUDA ratio |" if cuda else "")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    base: dict[str, dict] = {}
    for r in results:
        if "error" in r:
            print(f"| {r['config']} | error: {r['error'][:150]} |" + " |" * (head.count("|") - 3))
            continue
        mode, task = CONFIGS[r["config"]]
        ref = base.setdefault(task, r)  # the first configuration of a task (float / full) is the reference
        above = r["rss_peak"] - r["rss_imports"]
        ratio = above / max(ref["rss_peak"] - ref["rss_imports"], 1)
        row = (
            f"| {r['config']} | {r['what']} | {r['load_s']:.1f} | {r['seconds']:.3f} | "
            f"{r['rss_loaded'] / mib:.0f} | {r['rss_peak'] / mib:.0f} | {above / mib:.0f} | {ratio:.2f}x |"
        )
        if cuda:
            row += f" {r['cuda_peak'] / mib:.0f} | {r['cuda_peak'] / max(ref['cuda_peak'], 1):.2f}x |"
        print(row)
    print(
        "\nRSS: the process's resident set (absolute, the Python and torch runtime included); peak − imports:"
        " the peak above the resident set after importing torch and cheers (what the configuration adds);"
        " ratio: that, against the first configuration of the same task (float, full training)."
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (offload moves components to this device)")
    ap.add_argument("--preset", default="tiny-shapes", help="tiny-shapes: the bundled model; else random")
    ap.add_argument("--dtype", default=None, help="weights of inference (default float32 on CPU, else bf16)")
    ap.add_argument("--resolution", type=int, default=None, help="text-to-image side (default: model's)")
    ap.add_argument("--steps", type=int, default=10, help="text-to-image steps")
    ap.add_argument("--new-tokens", type=int, default=16, help="chat answer length")
    ap.add_argument("--repeats", type=int, default=2, help="timed calls after one warm-up (median)")
    ap.add_argument("--train-batch", type=int, default=4)
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of {list(CONFIGS)}")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per configuration")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--checkpoint", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    if args.worker:
        print(RESULT + json.dumps(worker(args)), flush=True)
        return
    names = [c for c in args.configs.split(",") if c]
    unknown = sorted(set(names) - set(CONFIGS))
    if unknown:
        ap.error(f"unknown configurations {unknown}; known: {list(CONFIGS)}")
    with tempfile.TemporaryDirectory(prefix="cheers-bench-memory-") as tmp:
        if args.preset == "tiny-shapes":
            from cheers.assets import default_model_dir

            checkpoint = str(default_model_dir())
        else:
            checkpoint = str(random_checkpoint(args.preset, Path(tmp) / "model"))
        print(
            f"preset={args.preset} device={args.device} dtype={args.dtype} steps={args.steps} "
            f"new tokens={args.new_tokens} train batch={args.train_batch} threads={torch.get_num_threads()} "
            f"cpus={os.cpu_count()}",
            flush=True,
        )
        results = []
        for name in names:
            tic = time.perf_counter()
            results.append(run_config(name, args, checkpoint))
            print(f"  {name}: {time.perf_counter() - tic:.1f} s", file=sys.stderr, flush=True)
    print_table(results, args.device)


if __name__ == "__main__":
    main()
