"""The ``cheers`` command: a thin shell over :class:`cheers.pipeline.CheersPipeline` and the tools."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

DEFAULT_OUT = "cheers-output.png"


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default="default", help="checkpoint directory or hub id (default: the bundled model)"
    )
    p.add_argument("--device", default="auto", help="cpu | cuda | mps | auto")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: the checkpoint's)")
    _quantization_arg(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_lora_argument(p)


def add_lora_argument(p: argparse.ArgumentParser) -> None:
    """``--lora PATH[:SCALE]`` (repeatable), shared with ``cheers serve``."""
    from cheers.lora import parse_lora_arg

    p.add_argument(
        "--lora",
        action="append",
        type=parse_lora_arg,
        default=[],
        metavar="PATH[:SCALE]",
        help="load a LoRA adapter (peft layout, e.g. <run>/adapter) at SCALE (default 1); repeat to combine "
        "several (needs peft: pip install 'cheers[lora]')",
    )


def load_loras(pipe, loras: list[tuple[str, float]]):
    """Load ``--lora`` adapters into a pipeline; a missing peft becomes a one-line error."""
    for path, scale in loras:
        try:
            pipe.load_lora_weights(path, scale=scale)
        except ImportError as err:
            raise ValueError(str(err)) from None
    return pipe


def _quantization_arg(p: argparse.ArgumentParser) -> None:
    from cheers.choices import QUANTIZATIONS

    p.add_argument(
        "--quantization",
        choices=QUANTIZATIONS,
        default=None,
        help="store the LLM's and flow heads' weights in fewer bits (torchao; default: float): int8 on any "
        "device, float8 on CUDA >= 8.9, int4 on CUDA >= 8.0 with bfloat16",
    )


def _pipeline(args: argparse.Namespace):
    from cheers.pipeline import CheersPipeline

    pipe = CheersPipeline.from_pretrained(
        args.model,
        device=args.device,
        dtype=args.dtype,
        progress=not args.quiet,
        quantization=args.quantization,
    )
    return load_loras(pipe, args.lora)


def save_image(image, path: Path, metadata: dict[str, Any]) -> None:
    """PNG with the prompt, seed and settings in a text chunk, plus a sidecar JSON."""
    from PIL.PngImagePlugin import PngInfo

    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngInfo()
    info.add_text("cheers", json.dumps(metadata, default=str))
    image.save(path, pnginfo=info)
    path.with_suffix(".json").write_text(json.dumps(metadata, indent=2, default=str) + "\n")


def _generator(seed: int):
    import torch

    return torch.Generator().manual_seed(seed)


def cmd_generate(args: argparse.Namespace) -> int:
    pipe = _pipeline(args)
    out = pipe.generate(
        args.prompt,
        negative_prompt=args.negative_prompt,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        shift=args.shift,
        height=args.height,
        width=args.width,
        num_images_per_prompt=args.num_images,
        generator=_generator(args.seed),
        solver=args.solver,
        guidance_interval=args.guidance_interval,
    )
    path = Path(args.out)
    for i, image in enumerate(out.images):
        target = path if len(out.images) == 1 else path.with_name(f"{path.stem}-{i}{path.suffix}")
        save_image(
            image,
            target,
            {"prompt": args.prompt, "seed": args.seed, "index": i, "model": args.model, **out.settings},
        )
        print(target)
    return 0


def cmd_edit(args: argparse.Namespace) -> int:
    from cheers.image_ops import load_image

    pipe = _pipeline(args)
    out = pipe.edit(
        load_image(args.image),
        args.instruction,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        generator=_generator(args.seed),
        solver=args.solver,
        guidance_interval=args.guidance_interval,
    )
    save_image(
        out.images[0],
        Path(args.out),
        {
            "instruction": args.instruction,
            "image": args.image,
            "seed": args.seed,
            "model": args.model,
            **out.settings,
        },
    )
    print(args.out)
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    from cheers.image_ops import load_image

    pipe = _pipeline(args)
    _check_cuda_graph(args, pipe)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": args.question}]}]
    said = False
    for piece in pipe.chat(
        messages,
        images=[load_image(args.image)],
        max_new_tokens=args.max_new_tokens,
        stream=True,
        cuda_graph=args.cuda_graph,
    ):
        print(piece, end="", flush=True)
        said = said or bool(piece.strip())
    print("" if said else "(the model gave an empty answer)")
    return 0


def _check_cuda_graph(args: argparse.Namespace, pipe) -> None:
    if args.cuda_graph and pipe.device.type != "cuda":
        raise ValueError(
            f"--cuda-graph needs a CUDA device; the model is on {pipe.device.type!r} (--device cuda)"
        )


def cmd_chat(args: argparse.Namespace) -> int:
    from cheers.image_ops import load_image

    pipe = _pipeline(args)
    _check_cuda_graph(args, pipe)
    history: list[dict] = []
    images: list = []
    print("cheers chat: type a message; '/image PATH' attaches an image to your next message; '/quit' ends.")
    pending: list = []
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            return 0
        if line in ("/quit", "/exit"):
            return 0
        if line.startswith("/image "):
            try:
                pending.append(load_image(line[len("/image ") :].strip()))
                print(f"(image attached: {len(pending)} pending)")
            except ValueError as err:
                print(f"error: {err}")
            continue
        if not line:
            continue
        content = [{"type": "image"} for _ in pending] + [{"type": "text", "text": line}]
        images += pending
        pending = []
        history.append({"role": "user", "content": content})
        answer = pipe.chat(
            history, images=images or None, max_new_tokens=args.max_new_tokens, cuda_graph=args.cuda_graph
        ).texts[0]
        print(f"cheers> {answer}")
        history.append({"role": "assistant", "content": answer})


def cmd_info(args: argparse.Namespace) -> int:
    from cheers.quantization import weight_nbytes

    pipe = _pipeline(args)
    model = pipe.model
    groups = {g: sum(p.numel() for _, p in ps) for g, ps in model.parameter_groups().items()}
    dtype = next(model.parameters()).dtype
    nbytes = weight_nbytes(model)  # tied weights once; quantised ones by their stored bytes
    cfg = model.config
    print(f"model: {args.model}")
    print(
        f"image size: {pipe.processor.image_size} px, latent {cfg.latent_channels} channels, "
        f"patch {cfg.patch_size}"
    )
    print(f"text: {cfg.text.num_hidden_layers} layers x {cfg.text.hidden_size}, vocab {cfg.text.vocab_size}")
    print(f"vision: {cfg.vision.num_hidden_layers} layers x {cfg.vision.hidden_size}")
    print(f"dtype: {dtype}, device: {pipe.device}, weights in memory: {nbytes / 2**20:.1f} MiB")
    print(f"parameters: {sum(groups.values()):,}")
    for g, n in groups.items():
        print(f"  {g:16s} {n:>14,}")
    return 0


def bench_dir() -> Path:
    """The source checkout's ``bench/`` folder (benchmarks are scripts, not part of the installed package)."""
    return Path(__file__).resolve().parents[2] / "bench"


def bench_scripts() -> dict[str, Path]:
    """Benchmark name -> script: ``bench/bench_X.py`` is ``X``, any other ``bench/Y.py`` is ``Y`` (``-`` for
    ``_``)."""
    folder = bench_dir()
    scripts = sorted(folder.glob("*.py")) if folder.is_dir() else []
    return {f.stem.removeprefix("bench_").replace("_", "-"): f for f in scripts if not f.stem.startswith("_")}


def cmd_bench(args: argparse.Namespace) -> int:
    import runpy

    scripts = bench_scripts()
    if not scripts:
        raise ValueError(
            f"no benchmark scripts in {bench_dir()}: they ship with the source checkout, not the wheel"
        )
    if args.name in (None, "list"):
        for name, path in scripts.items():
            print(f"{name:16s} {path}")
        return 0
    if args.name not in scripts:
        raise ValueError(f"unknown benchmark {args.name!r}; choose one of {sorted(scripts)}")
    path = scripts[args.name]
    argv, sys.argv = sys.argv, [str(path), *args.args]
    sys.path.insert(0, str(path.parent))
    try:
        runpy.run_path(str(path), run_name="__main__")
    except SystemExit as stop:  # the script's own exit (argparse --help, bad flags)
        return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    finally:
        sys.argv = argv
        sys.path.remove(str(path.parent))
    return 0


def _solver_args(p: argparse.ArgumentParser) -> None:
    from cheers.choices import SOLVERS

    p.add_argument(
        "--solver",
        choices=SOLVERS,
        default=None,
        help="flow ODE solver (default: the model's, normally the release's euler); multistep is "
        "2nd order at Euler's cost, heun/midpoint 2nd order at 2 evaluations per step",
    )
    p.add_argument(
        "--guidance-interval",
        type=float,
        nargs=2,
        metavar=("T_LO", "T_HI"),
        default=None,
        help="apply guidance only for t in [T_LO, T_HI] (t = 0 noise, 1 image); elsewhere the "
        "unconditional branch is skipped",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cheers", description="Cheers: unified image understanding and generation"
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="text-to-image")
    p.add_argument("prompt")
    p.add_argument("--out", "-o", default=DEFAULT_OUT)
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument(
        "--shift", type=float, default=None, help="the release's time-shift alpha (<1: more steps near noise)"
    )
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    _solver_args(p)
    _model_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("edit", help="edit an image following an instruction")
    p.add_argument("image")
    p.add_argument("instruction")
    p.add_argument("--out", "-o", default="cheers-edit.png")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    _solver_args(p)
    _model_args(p)
    p.set_defaults(func=cmd_edit)

    p = sub.add_parser("ask", help="answer a question about an image")
    p.add_argument("image")
    p.add_argument("question")
    p.add_argument("--max-new-tokens", type=int, default=64)
    _cuda_graph_arg(p)
    _model_args(p)
    p.set_defaults(func=cmd_ask)

    p = sub.add_parser("chat", help="interactive multi-turn chat (images by path)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    _cuda_graph_arg(p)
    _model_args(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("info", help="model summary: sizes, parameter counts, dtype, memory")
    _model_args(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser(
        "bench",
        help="run a benchmark script of bench/ (source checkout): cheers bench NAME [ARGS]",
        description="Runs bench/bench_NAME.py (or bench/NAME.py) with ARGS; 'cheers bench list' "
        "lists them, 'cheers bench NAME --help' shows a script's options.",
    )
    p.add_argument(
        "name", nargs="?", default=None, help="sampling, understanding, train, solver-curve, ... or list"
    )
    p.add_argument("args", nargs=argparse.REMAINDER, help="passed to the script")
    p.set_defaults(func=cmd_bench)

    for name, module, adder, extra in OPTIONAL_COMMANDS:
        try:
            mod = __import__(module, fromlist=[adder])
        except ModuleNotFoundError as err:
            if (err.name or "").split(".")[0] == "cheers":  # our own code is broken: say so, do not hide it
                raise
            _unavailable_command(sub, name, err.name or "a package", extra)
            continue
        getattr(mod, adder)(sub)
    return parser


OPTIONAL_COMMANDS = (
    ("shapes", "cheers.data.shapes.cli", "add_shapes_parser", None),
    ("train", "cheers.training.cli", "add_train_parser", "train"),
    ("web", "cheers.web", "add_web_parser", "demo"),
    ("eval", "cheers.eval.cli", "add_eval_parser", "eval"),
    ("plot", "cheers.eval.cli", "add_plot_parser", "eval"),
    ("ablate", "cheers.eval.cli", "add_ablate_parser", "eval"),
    ("serve", "cheers.serve.cli", "add_serve_parser", "serve"),
)
"""(command, module, the function that registers it, the extra that installs what it needs)."""


def _unavailable_command(sub, name: str, missing: str, extra: str | None) -> None:
    """A command whose optional dependency is missing: listed, and an error naming the fix when run."""
    fix = f"pip install 'cheers[{extra}]'" if extra else f"pip install {missing}"
    message = f"'cheers {name}' needs {missing}, which is not installed: {fix}"
    # no options of its own: whatever follows (--help included) is taken as is and answered with the message
    p = sub.add_parser(name, help=f"(unavailable: needs {missing})", add_help=False, prefix_chars="\x01")
    p.add_argument("rest", nargs="*")

    def fail(args: argparse.Namespace) -> int:
        print(f"cheers: error: {message}", file=sys.stderr)
        return 2

    p.set_defaults(func=fail)


def _cuda_graph_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--cuda-graph",
        action="store_true",
        help="replay each text-decoding step from a CUDA graph (CUDA only; fastest single stream)",
    )


QUIET_IMPORT_LOGGERS = ("torchao", "torch.utils._pytree")
"""Loggers whose import-time warnings say nothing about the command: transformers imports torchao whenever it
is installed (the ``quant`` extra), torchao then reports its CUDA-only kernels as unloadable and registers two
enums in a way torch's pytree calls deprecated. Shown with ``cheers -v``."""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if not args.verbose:
        for name in QUIET_IMPORT_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as err:  # bad input: one clear line, no traceback
        print(f"cheers: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
