"""Int8 weight-only quantisation: its quality cost against the float path and what it saves, in one run.

1. Parity configuration (``tests/fixtures/reference/config_a``, or ``CHEERS_REFERENCE_DIR``): on the release's
   recorded inputs, the relative L2 error ``|int8 - float| / |float|`` of the understanding logits, the
   training text logits, the flow velocities (conditional and unconditional, each recorded t) and the
   training predicted velocity; and each path's max abs error against the release's recorded outputs.
2. Memory and time on a checkpoint (default: the bundled model), float32 against int8 on the CPU, each loaded
   in a subprocess of its own (so neither inherits the other's heap): the weights' bytes, the resident set
   the load adds, the peak resident set of one text-to-image call above the loaded model, seconds per image
   (the model's default steps and guidance) and greedy decode tokens/s (medians of ``--repeats``).
   With ``--official``, the official preset with random bfloat16 weights too: the resident set of its weights,
   bfloat16 against int8.
3. ShapesBench (``--shapes-n`` per task, 0 skips it) on the bundled model, float against int8 with the same
   seeds: GenEval, VQA and edit scores, and how often the two agree item by item.
4. The offload hooks' own cost: seconds per image on the CPU with model / sequential offload to the CPU
   (nothing moves) against none, and the loads per image a GPU would make.

    python bench/bench_quant.py
    python bench/bench_quant.py --shapes-n 0 --repeats 5 --official
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sampling import peak_memory  # noqa: E402

from cheers.generation import ImageSampler, prefill  # noqa: E402
from cheers.parity_fixtures import load_cases, reference_dir  # noqa: E402
from cheers.quantization import quantize_model, quantized_layers, weight_nbytes  # noqa: E402
from cheers.tokens import unconditional_ids  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
REFERENCE_DIR = reference_dir(ROOT / "tests/fixtures/reference/config_a")
QUANT = "int8"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


# -- 1. parity configuration ---------------------------------------------------------------------------------
@torch.no_grad()
def parity_outputs(model, meta: dict, tensors: dict) -> dict[str, torch.Tensor]:
    """The float-valued outputs of the understanding, velocity and training cases, keyed like the fixture."""
    out = {}
    for name, case in meta["cases"].items():

        def inp(key, name=name):
            return tensors[f"{name}/in/{key}"]

        call = case["call"]
        if "_drift_fn" in call:  # the velocity case: prefill, then the velocity at each recorded t
            ids, pixels = inp("input_ids"), inp("pixel_values")
            for prefix, prompt in (("", ids), ("uncond_", unconditional_ids(ids, model.special))):
                state = prefill(model, prompt, torch.ones_like(prompt), pixels)
                sampler = ImageSampler(model, state, None, torch.ones(1, dtype=torch.bool))
                for i, t in enumerate(case["settings"]["t_values"]):
                    v, _, _ = sampler.velocity(inp("x_t"), torch.tensor(t, dtype=torch.float32))
                    out[f"{name}/out/{prefix}velocity_t{i}"] = v
        elif "labels=labels" in call:
            res = model(
                inp("input_ids"),
                inp("attention_mask"),
                inp("pixel_values"),
                t=inp("t"),
                labels=inp("labels"),
                x0=inp("x0"),
            )
            out[f"{name}/out/text_logits"] = res.logits
            if res.pred_velocity is not None:
                out[f"{name}/out/pred_velocity"] = res.pred_velocity
        elif call.startswith("model(") and name == "understanding_forward":
            res = model(inp("input_ids"), inp("attention_mask"), inp("pixel_values"))
            out[f"{name}/out/logits"] = res.logits
    return out


def parity_errors() -> None:
    reference = load_cases(REFERENCE_DIR)
    meta, tensors = reference.meta, reference.tensors
    float_out = parity_outputs(reference.load_model(), meta, tensors)
    model = quantize_model(reference.load_model(), QUANT)
    int8_out = parity_outputs(model, meta, tensors)
    print(f"1. parity configuration {REFERENCE_DIR.name}: {len(quantized_layers(model))} int8 linear layers")
    print(f"   {'tensor':44s} {'int8 vs float':>14s} {'float vs rel.':>14s} {'int8 vs rel.':>14s}")
    print(f"   {'':44s} {'(rel. L2)':>14s} {'(max abs)':>14s} {'(max abs)':>14s}")
    worst: dict[str, float] = {}
    for key, f in float_out.items():
        q, ref = int8_out[key], tensors.get(key)
        err = rel(q, f)
        kind = "velocity" if "velocity" in key else "logits"
        worst[kind] = max(worst.get(kind, 0.0), err)
        ref_f = "-" if ref is None else f"{float((f - ref).abs().max()):.2e}"
        ref_q = "-" if ref is None else f"{float((q - ref).abs().max()):.2e}"
        print(f"   {key:44s} {err:14.2e} {ref_f:>14s} {ref_q:>14s}")
    print(f"   worst relative error: logits {worst['logits']:.2e}, velocities {worst['velocity']:.2e}")


# -- 2. memory and time --------------------------------------------------------------------------------------
def resident() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(model: str, quantization: str | None, repeats: int) -> dict:
    """Load ``model`` (float32 or int8) and time it; runs in a subprocess of its own."""
    import ctypes

    from cheers.pipeline import CheersPipeline

    def trim() -> None:
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass

    trim()
    before = resident()
    pipe = CheersPipeline.from_pretrained(model, device="cpu", progress=False, quantization=quantization)
    trim()
    loaded = resident()

    def image():
        pipe.generate("two red circles", generator=torch.Generator().manual_seed(0))

    messages = [{"role": "user", "content": "Describe a red circle and a blue square."}]
    tokens = 16

    def answer():
        pipe.chat(messages, max_new_tokens=tokens, generator=torch.Generator().manual_seed(0))

    image()  # warm-up
    answer()
    peak = peak_memory(image, "cpu")
    t_image, t_answer = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        image()
        t_image.append(time.perf_counter() - start)
        start = time.perf_counter()
        answer()
        t_answer.append(time.perf_counter() - start)
    return {
        "weights": weight_nbytes(pipe.model),
        "load_rss": loaded - before,
        "generate_peak": peak,
        "s_per_image": statistics.median(t_image),
        "s_per_answer": statistics.median(t_answer),
        "answer_tokens": tokens,
    }


def official_worker() -> dict:
    """The official preset with random bfloat16 weights: the resident set of its weights before and after int8
    (runs in a subprocess of its own)."""
    import ctypes

    from cheers.config import preset
    from cheers.models.cheers import Cheers

    def trim() -> int:
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        return resident()

    before = trim()
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    model = Cheers(preset("official")).eval()
    torch.set_default_dtype(torch.float32)
    built, weights = trim(), weight_nbytes(model)
    start = time.perf_counter()
    quantize_model(model, QUANT)
    seconds = time.perf_counter() - start
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "weights": weights,
        "weights_int8": weight_nbytes(model),
        "rss": built - before,
        "rss_int8": trim() - before,
        "quantize_s": seconds,
    }


def official_memory() -> None:
    cmd = [sys.executable, __file__, "--worker", "official"]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"official worker failed:\n{done.stderr[-3000:]}")
    r = json.loads(done.stdout.strip().splitlines()[-1])
    gib = 2**30
    print(f"2b. official preset ({r['params'] / 1e9:.2f} B parameters, random bfloat16 weights), CPU")
    print(f"   {'':34s} {'bfloat16':>10s} {QUANT:>10s} {'int8/bf16':>11s}")
    for label, key in (("weights (GiB)", "weights"), ("resident set of the model (GiB)", "rss")):
        f, q = r[key] / gib, r[f"{key}_int8"] / gib
        print(f"   {label:34s} {f:10.2f} {q:10.2f} {q / f:11.2f}")
    print(f"   quantize_model took {r['quantize_s']:.1f} s")


def memory_and_time(model: str, repeats: int, threads: int | None) -> None:
    results = {}
    for q in (None, QUANT):
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            q or "float",
            "--model",
            model,
            "--repeats",
            str(repeats),
        ]
        if threads:
            cmd += ["--threads", str(threads)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode:
            raise RuntimeError(f"worker {q or 'float'} failed:\n{done.stderr[-3000:]}")
        results[q or "float"] = json.loads(done.stdout.strip().splitlines()[-1])
    f, q = results["float"], results[QUANT]
    mib = 2**20
    print(f"2. memory and time, {model} on the CPU ({torch.get_num_threads()} threads), median of {repeats}")
    print(f"   {'':34s} {'float32':>10s} {QUANT:>10s} {'int8/float':>11s}")
    rows = [
        ("weights (MiB)", "weights", mib),
        ("resident set added by loading (MiB)", "load_rss", mib),
        ("peak resident set, t2i call (MiB)", "generate_peak", mib),
        ("seconds per image", "s_per_image", 1),
        ("seconds per answer (16 tokens)", "s_per_answer", 1),
    ]
    for label, key, scale in rows:
        print(f"   {label:34s} {f[key] / scale:10.2f} {q[key] / scale:10.2f} {q[key] / f[key]:11.2f}")
    print(
        f"   decode tokens/s (incl. prefill): float {f['answer_tokens'] / f['s_per_answer']:.1f}, "
        f"int8 {q['answer_tokens'] / q['s_per_answer']:.1f}"
    )


# -- 3. ShapesBench ------------------------------------------------------------------------------------------
def shapes(n: int) -> None:
    from cheers.eval.shapes_bench import ShapesBenchConfig, run_shapes_bench
    from cheers.pipeline import CheersPipeline

    cfg = ShapesBenchConfig(n=n, num_images=1)
    reports = {}
    with tempfile.TemporaryDirectory() as tmp:
        for q in (None, QUANT):
            pipe = CheersPipeline.from_pretrained("default", device="cpu", progress=False, quantization=q)
            start = time.perf_counter()
            reports[q or "float"] = run_shapes_bench(
                pipe, Path(tmp) / (q or "float"), cfg, model_name=q or "float", progress=False
            )
            reports[q or "float"]["wall"] = time.perf_counter() - start
    f, q = reports["float"], reports[QUANT]

    def agree(key: str, field: str, items: str) -> str:
        a, b = f[key][items], q[key][items]
        return f"{sum(x[field] == y[field] for x, y in zip(a, b))}/{len(a)}"

    print(f"3. ShapesBench on the bundled model, n={n} per task (split test, 1 image per prompt)")
    print(f"   {'':24s} {'float32':>8s} {QUANT:>8s} {'same item result':>17s}")
    scores = [
        (
            "ShapesGenEval overall",
            "geneval",
            lambda r: r["geneval"]["summary"]["overall"],
            "correct",
            "samples",
        ),
        ("ShapesVQA overall", "vqa", lambda r: r["vqa"]["report"]["overall"], "prediction", "items"),
        ("ShapesEdit correct", "edit", lambda r: r["edit"]["summary"]["correct"], "correct", "items"),
    ]
    for label, key, score, field, items in scores:
        print(f"   {label:24s} {score(f):8.3f} {score(q):8.3f} {agree(key, field, items):>17s}")
    print(f"   wall seconds: float {f['wall']:.0f}, int8 {q['wall']:.0f}")


# -- 4. offload hooks ---------------------------------------------------------------------------------------
def offload_overhead(model: str, repeats: int) -> None:
    """Seconds per image with the offload hooks on and the CPU as the execution device: nothing moves, so this
    is the cost of the hooks alone (on a GPU the transfers come on top)."""
    from cheers.pipeline import CheersPipeline

    pipe = CheersPipeline.from_pretrained(model, device="cpu", progress=False)
    moves = []

    def image():
        pipe.generate("two red circles", generator=torch.Generator().manual_seed(0))

    def seconds() -> float:
        image()  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            image()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    plain = seconds()
    rows = [("no offload", plain, 0)]
    for label, enable in (
        ("model offload", pipe.enable_model_cpu_offload),
        ("sequential offload", pipe.enable_sequential_cpu_offload),
    ):
        enable(device="cpu")
        pipe.offload.on_move = lambda direction, name: moves.append(name)
        t = seconds()
        rows.append((label, t, len(moves) // (2 * (repeats + 1))))  # moves on and off per image
        moves.clear()
    pipe.disable_cpu_offload()
    print(
        f"4. offload hooks on the CPU ({model}; execution device = CPU, nothing moves), median of {repeats}"
    )
    for label, t, n in rows:
        print(f"   {label:20s} {t:7.3f} s/image  x{t / plain:5.2f}  {n:5d} loads onto the device per image")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default", help="checkpoint for part 2 (default: the bundled model)")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per variant (median)")
    ap.add_argument("--shapes-n", type=int, default=4, help="ShapesBench items per task (0: skip part 3)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--skip-parity", action="store_true", help="skip part 1")
    ap.add_argument(
        "--official",
        action="store_true",
        help="also build the official preset (random bf16 weights, ~6 GB of RAM) and measure its memory, "
        "bf16 vs int8",
    )
    ap.add_argument("--worker", choices=("float", QUANT, "official"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker == "official":
        print(json.dumps(official_worker()))
        return
    if args.worker:
        quantization = None if args.worker == "float" else args.worker
        print(json.dumps(worker(args.model, quantization, args.repeats)))
        return
    start = time.perf_counter()
    if not args.skip_parity:
        parity_errors()
    memory_and_time(args.model, args.repeats, args.threads)
    if args.official:
        official_memory()
    if args.shapes_n:
        shapes(args.shapes_n)
    offload_overhead(args.model, args.repeats)
    print(f"(bench_quant: {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
