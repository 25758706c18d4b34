"""The training loop of stages I-IV: one process or many, resumable bit for bit.

``Trainer(recipe).run()`` reads as numbered steps: engine -> processor and model -> trainable groups ->
wrap -> optimizer and schedule -> resume -> data -> loop (accumulate, clip, step, log, hooks, checkpoint)
-> export. Precision is chosen once, at the top of the loop (bf16 autocast on CUDA by default); the model's
forward never casts. With a ``lora:`` section the trainable part is a LoRA adapter over the frozen model
(:mod:`cheers.lora`): checkpoints hold the adapter, the export is the adapter in peft's layout.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cheers.data.collate import collate
from cheers.data.loader import (
    CorruptTracker,
    Layout,
    MicroBatches,
    build_sources,
    make_loader,
    seed_everything,
)
from cheers.data.samples import SampleBuilder
from cheers.data.sources import Source
from cheers.models.cheers import Cheers
from cheers.models.vae_fast import install_fast_vae
from cheers.processor import CheersProcessor
from cheers.training import checkpointing as ckpts
from cheers.training import distributed as d
from cheers.training.config import CHANNELS_LAST_FSDP, Recipe, RecipeError, dump_recipe
from cheers.training.ema import FILE as EMA_FILE
from cheers.training.ema import WeightEMA
from cheers.training.hooks import Hook, run_hooks
from cheers.training.monitor import Monitor
from cheers.training.optim import (
    StepBudget,
    build_optimizer,
    build_scheduler,
    follow_recipe_schedule,
    trainable_parameters,
)
from cheers.training.parts import build_model, build_processor, model_config
from cheers.training.stages import log_deviations

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_dir: Path
    step: int  # optimizer steps done
    history: list[dict[str, Any]] = field(default_factory=list)  # the logged metrics (rank 0)
    export_dir: Path | None = None


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 / AMX); elsewhere oneDNN emulates it."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN: no fast bf16 path either
        return False


def autocast_context(precision: str, device: torch.device):
    """The run's precision policy: bf16 autocast (default on CUDA) or plain fp32."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if use_bf16 and device.type == "cpu" and not cpu_has_native_bf16():
        logger.warning(
            "engine.precision=bf16 on a CPU without native bfloat16 (no AVX512-BF16 / AMX): autocast "
            "emulates it and trains several times slower than float32 here; engine.precision=auto picks "
            "float32 on CPUs"
        )
    if use_bf16:
        return functools.partial(torch.autocast, device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


class Trainer:
    """Runs one recipe.

    Args:
        recipe: the validated recipe.
        run_dir: output directory (default ``recipe.out``).
        resume: continue from ``<run_dir>/checkpoints/latest`` when it exists.
        processor, model, sources: ready-made parts instead of the recipe's (tests, notebooks); ``sources`` is
            a list of (source, ratio).
        hooks: callbacks (see :mod:`cheers.training.hooks`). The ShapesWorld hooks of the recipe's
            ``log.sample_every`` / ``log.score_every`` come from :func:`cheers.eval.train_hooks.recipe_hooks`;
            ``cheers train`` passes them, other callers pass them (or their own) here.
        stop_after: leave after this many steps of this invocation (a checkpoint is written), e.g. to fit a
            job time limit; the schedule still spans ``train.steps``.
    """

    def __init__(
        self,
        recipe: Recipe,
        run_dir: str | Path | None = None,
        *,
        resume: bool = False,
        processor: CheersProcessor | None = None,
        model: Cheers | None = None,
        sources: Sequence[tuple[Source, int]] | None = None,
        hooks: Sequence[Hook] = (),
        stop_after: int | None = None,
    ) -> None:
        recipe.validate()
        if recipe.stage == "0":
            raise RecipeError("stage 0 trains the VAE: use cheers.training.vae_stage0.train_vae")
        self.recipe = recipe
        self.run_dir = Path(run_dir or recipe.out)
        self.resume = resume
        self.processor, self.model, self.sources = processor, model, sources
        self.hooks = list(hooks)
        self.stop_after = stop_after

    # -- setup -----------------------------------------------------------------------------------------------
    def _build_model(self, info: d.DistInfo, resume_from: Path | None) -> Cheers:
        r = self.recipe
        config = self.model.config if self.model is not None else model_config(r)
        saved = self.run_dir / "processor"  # the run's tokenizer, so that a resumed run reads the same ids
        if self.processor is None and resume_from is not None and saved.is_dir():
            processor = CheersProcessor.from_pretrained(
                saved, image_size=config.image_size, patch_size=config.patch_size
            )
        else:
            processor = self.processor or build_processor(r, config)
        if info.is_main and not saved.exists():
            tmp = self.run_dir / ".tmp-processor"
            processor.save_pretrained(tmp)
            tmp.rename(saved)
        self.processor = processor
        lora = r.lora is not None  # a LoRA checkpoint holds the adapters only: the base is the recipe's
        if resume_from is not None:
            ckpts.check_model_tensors(resume_from, trainable_only=lora)
        full_resume = resume_from is not None and info.strategy != "fsdp" and not lora
        if self.model is not None:
            model = self.model
            if full_resume:
                ckpts.load_model_weights(resume_from, model)
        elif full_resume:  # every tensor comes from the checkpoint
            model = ckpts.model_from_state(config, processor.special, ckpts.load_state(resume_from))
        else:
            model = build_model(r, processor.special, config)
        if model.special is None:
            model.special = processor.special
        install_fast_vae(model)  # the frozen VAE decoders' faster forms (same numbers up to rounding)
        if r.engine.channels_last:
            if info.strategy == "fsdp":
                raise RecipeError(CHANNELS_LAST_FSDP)
            model.to_channels_last()
        model.train()
        if lora:
            counts = self._add_lora(model, resume_from if info.strategy != "fsdp" else None)
        else:
            counts = model.set_trainable(r.train.trainable)
        frozen = d.freeze_unused(model)
        for group, count in counts.items():
            logger.info("trainable %-15s %12d parameters", group, count)
        logger.info(
            "trainable total %d of %d parameters (%d in the never-run SigLIP head frozen)",
            sum(p.numel() for p in model.parameters() if p.requires_grad),
            sum(p.numel() for p in model.parameters()),
            frozen,
        )
        if r.engine.gradient_checkpointing:
            d.enable_gradient_checkpointing(model)
        return model

    def _add_lora(self, model: Cheers, resume_from: Path | None) -> dict[str, int]:
        """Freeze the model, inject the recipe's adapter (trainable), start it from ``lora.init`` or the
        checkpoint being resumed; returns the trainable parameter count per group."""
        from cheers import lora

        section = self.recipe.lora
        model.set_trainable([])
        lora.add_adapter(model, section.spec(), lora.DEFAULT_ADAPTER, trainable=True, upcast=True)
        if resume_from is not None:
            ckpts.load_trainable_weights(resume_from, model)
        elif section.init:
            lora.load_adapter_weights(model, section.init, lora.DEFAULT_ADAPTER)
            logger.info("LoRA adapter starts from %s", section.init)
        counts = {group: 0 for group in Cheers.PARAMETER_GROUPS}
        for name, p in model.named_parameters():
            if p.requires_grad:
                group = Cheers.group_of(name)
                counts[group] = counts.get(group, 0) + p.numel()
        return counts

    def _data(self, info: d.DistInfo, model: Cheers, start_step: int) -> tuple[Any, int]:
        r, t = self.recipe, self.recipe.train
        per_step = t.micro_batch * info.world_size
        if t.global_batch % per_step:
            raise RecipeError(
                f"train.global_batch {t.global_batch} is not a multiple of micro_batch x processes "
                f"= {t.micro_batch} x {info.world_size}"
            )
        accumulation = t.global_batch // per_step
        if self.sources is not None:
            sources, ratios = [s for s, _ in self.sources], [int(w) for _, w in self.sources]
        else:
            sources, ratios = build_sources(r.data.sources, model.config.image_size)
        cfg = model.config
        grid = cfg.image_size // cfg.patch_size
        builder = SampleBuilder(
            self.processor,
            (cfg.latent_channels, grid, grid),
            r.data.cfg_dropout,
            max_length=cfg.options.max_sequence_length,
            tokens_per_image=grid * grid // 4,
            time_sampling=r.data.time_sampling,
        )
        layout = Layout(t.micro_batch, accumulation, info.world_size, info.rank)
        dataset = MicroBatches(
            sources,
            ratios,
            builder,
            functools.partial(collate, pad_id=self.processor.special.pad),
            layout,
            r.data.seed,
            r.data.max_retries,
        )
        loader = make_loader(
            dataset,
            start_step * accumulation,
            t.steps * accumulation,
            r.data.num_workers,
            r.data.prefetch_factor,
            pin_memory=info.device.type == "cuda",
        )
        # iter() draws the loader's base seed from the global generator: put that stream back where it was (a
        # resumed run has just restored it from the checkpoint, and a LoRA's dropout reads it)
        state = torch.get_rng_state()
        batches = iter(loader)
        torch.set_rng_state(state)
        return batches, accumulation

    # -- the run ---------------------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        # 1. engine
        info = d.setup(self.recipe.engine)
        try:
            return self._run(info)
        finally:
            d.teardown(info)

    def _run(self, info: d.DistInfo) -> TrainResult:
        r, t = self.recipe, self.recipe.train
        seed_everything(t.seed)
        log_deviations(r)
        resume_from = ckpts.latest_checkpoint(self.run_dir) if self.resume else None
        if info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "recipe.yaml").write_text(dump_recipe(r))
        # 2. processor and model, 3. trainable groups
        model = self._build_model(info, resume_from)
        # 4. wrap for the strategy
        module = d.wrap(model, info, r.engine)
        # 5. optimizer and schedule over the trainable parameters (after wrapping: FSDP2 swaps them)
        params = [p for _, p in trainable_parameters(model)]
        optimizer = build_optimizer(trainable_parameters(model), t)
        scheduler = build_scheduler(optimizer, t)
        recipe_lrs = list(scheduler.base_lrs)
        if t.ema_decay > 0 and info.strategy == "fsdp":  # engine.strategy auto on several processes
            raise RecipeError(
                "train.ema_decay is not supported with FSDP2 yet (engine.strategy auto chose fsdp for "
                f"{info.world_size} processes): set engine.strategy: ddp, or train.ema_decay: 0"
            )
        ema = WeightEMA(trainable_parameters(model), t.ema_decay) if t.ema_decay > 0 else None
        tracker = CorruptTracker()
        start = 0
        # 6. resume
        if resume_from is not None:
            state = ckpts.load_checkpoint(
                resume_from, module, optimizer, scheduler, info, trainable_only=r.lora is not None
            )
            if state["global_batch"] != t.global_batch:
                raise RecipeError(
                    f"{resume_from} was trained with global batch {state['global_batch']}; this recipe "
                    f"has {t.global_batch} (the data positions would not continue)"
                )
            if state["data"]["seed"] != r.data.seed:
                logger.warning(
                    "%s was trained with data seed %s; continuing with %s (a different sample order)",
                    resume_from,
                    state["data"]["seed"],
                    r.data.seed,
                )
            start = int(state["step"])
            changed = follow_recipe_schedule(optimizer, scheduler, t, recipe_lrs)
            if changed:
                logger.warning(
                    "the recipe changes the lr schedule of %s (%s): from step %d it follows the recipe",
                    resume_from,
                    "; ".join(changed),
                    start + 1,
                )
            tracker.load_state_dict(state["data"]["corrupt"])
            if ema is not None and (resume_from / EMA_FILE).is_file():
                ema.load(resume_from, state.get("ema_updates", 0))
            elif ema is not None:
                logger.warning("%s holds no weight average: the EMA starts from its weights", resume_from)
        elif self.resume:
            logger.info("no checkpoint in %s: starting from scratch", self.run_dir)
        # 7. data
        batches, accumulation = self._data(info, model, start)
        monitor = Monitor(
            self.run_dir,
            t.steps,
            start,
            enabled=info.is_main,
            tensorboard=r.log.tensorboard,
            progress=r.log.progress,
        )
        uses_shapes = any(s.kind == "shapes" for s in r.data.sources) and self.sources is None
        if uses_shapes and (r.log.sample_every > 0 or r.log.score_every > 0) and not self.hooks:
            logger.warning(
                "log.sample_every / log.score_every are set but no hooks were passed: nothing is sampled "
                "or scored (pass hooks=cheers.eval.train_hooks.recipe_hooks(recipe), as cheers train does)"
            )
        autocast = autocast_context(r.engine.precision, info.device)
        result = TrainResult(self.run_dir, start)
        stop = t.steps if self.stop_after is None else start + self.stop_after
        last = min(t.steps, stop)
        logger.info(
            "training steps %d..%d of %d: global batch %d = %d x %d accumulation x %d processes",
            start + 1,
            last,
            t.steps,
            t.global_batch,
            t.micro_batch,
            accumulation,
            info.world_size,
        )
        budget = None
        if t.minutes > 0:  # every process follows rank 0's fit, so that all stop at the same step
            agree = (lambda n: int(d.broadcast_object(n, info))) if info.world_size > 1 else None
            budget = StepBudget(t.minutes, start, t.steps, scheduler, agree=agree)
        # 8. the loop
        try:
            step = start
            while step < last:
                metrics = self._step(
                    module, batches, accumulation, params, optimizer, scheduler, tracker, info, autocast
                )
                if ema is not None:
                    ema.update()
                done = step = step + 1
                if budget is not None:  # the run's length is what the budget fits (export and resume read it)
                    t.steps = budget.update(done)
                    last = min(t.steps, stop)
                    monitor.set_total(t.steps)
                metrics["samples"], metrics["corrupt"] = done * t.global_batch, tracker.corrupt
                monitor.advance()
                if done % max(r.log.every, 1) == 0 or done in (start + 1, last):
                    monitor.log(done, metrics)
                    result.history.append({"step": done, **metrics})
                scores = run_hooks(
                    self.hooks, done, module, model, self.processor, self.run_dir, info, monitor
                )
                if scores:
                    monitor.log(done, scores, prefix="score")
                    result.history.append({"step": done, **scores})
                if (r.checkpoint.every and done % r.checkpoint.every == 0) or (
                    done == last and r.checkpoint.at_end
                ):
                    trainer_state = {
                        "global_batch": t.global_batch,
                        "micro_batch": t.micro_batch,
                        "accumulation": accumulation,
                        "samples_seen": done * t.global_batch,
                        "data": {"seed": r.data.seed, "corrupt": tracker.state_dict()},
                    }
                    if ema is not None:
                        trainer_state["ema_updates"] = ema.updates
                    ckpts.save_checkpoint(
                        self.run_dir,
                        done,
                        module,
                        optimizer,
                        scheduler,
                        trainer_state,
                        info,
                        keep=r.checkpoint.keep,
                        max_shard_size=r.checkpoint.max_shard_size,
                        trainable_only=r.lora is not None,
                        extra=ema.save if ema is not None else None,
                    )
                result.step = done
        finally:
            monitor.close()
        if budget is not None and info.is_main:
            logger.info("time budget of %.1f min: trained to step %d", t.minutes, result.step)
            (self.run_dir / "recipe.yaml").write_text(dump_recipe(r))  # with the fitted train.steps
        # 9. export (a LoRA run: its adapter only, in peft's layout; the base is the recipe's starting point);
        # with train.ema_decay, the weight average
        averaged = ema.applied() if ema is not None else contextlib.nullcontext()
        with averaged:
            self._export(module, info, result)
        return result

    def _export(self, module, info: d.DistInfo, result: TrainResult) -> None:
        r, t = self.recipe, self.recipe.train
        if r.checkpoint.export and result.step == t.steps and r.lora is not None:
            adapter = self.run_dir / "adapter"
            base = r.init.from_release or r.model.preset
            ckpts.export_adapter(module, info, adapter, base, r.checkpoint.export_dtype)
            result.export_dir = adapter if info.is_main else None
        elif r.checkpoint.export and result.step == t.steps:
            export = self.run_dir / "export"
            ckpts.export_release(module, info, export, r.checkpoint.export_dtype, r.checkpoint.max_shard_size)
            if info.is_main:
                self.processor.save_pretrained(export)
                self._keep_sampling_defaults(export)
                result.export_dir = export

    def _keep_sampling_defaults(self, export: Path) -> None:
        """A model continued from a release directory keeps that directory's ``sampling_defaults.json``
        (prompt template, steps, guidance, prefix image): without it the export would sample with the
        release's defaults, e.g. another prompt template than the one it was trained and scored with."""
        from cheers import atomic
        from cheers.pipeline import SAMPLING_DEFAULTS_FILE
        from cheers.training.parts import release_dir

        start = release_dir(self.recipe)
        source = Path(start) / SAMPLING_DEFAULTS_FILE if start else None
        if source is not None and source.is_file():
            atomic.write_bytes(export / SAMPLING_DEFAULTS_FILE, source.read_bytes())
            logger.info("kept the starting model's %s in the export", SAMPLING_DEFAULTS_FILE)

    def _step(
        self,
        module,
        batches,
        accumulation: int,
        params,
        optimizer,
        scheduler,
        tracker: CorruptTracker,
        info: d.DistInfo,
        autocast,
    ) -> dict[str, float]:
        """One optimizer step: accumulate, clip, update; returns the step's numbers over all processes."""
        t = self.recipe.train
        tic = time.perf_counter()
        sums = torch.zeros(3, dtype=torch.float64, device=info.device)  # loss, text loss, flow loss
        read, corrupt = 0, 0
        for a in range(accumulation):
            batch = next(batches)
            read, corrupt = read + batch.attempted, corrupt + batch.corrupt
            tracker.reasons = {
                k: tracker.reasons.get(k, 0) + batch.reasons.get(k, 0)
                for k in {*tracker.reasons, *batch.reasons}
            }
            batch = batch.to(info.device, non_blocking=True)
            with d.gradient_sync(module, info, sync=a == accumulation - 1):
                with autocast():
                    out = module(**batch.model_inputs(), flow_loss_weight=t.flow_loss_weight)
                (out.loss / accumulation).backward()
            sums += torch.stack([out.loss.detach(), out.text_loss.detach(), out.image_loss.detach()]).double()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, t.grad_clip if t.grad_clip > 0 else float("inf"))
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
            grad_norm = grad_norm.full_tensor()
        lr = optimizer.param_groups[0]["lr"]
        finite = bool(torch.isfinite(grad_norm)) and bool(torch.isfinite(sums).all())
        if finite:
            optimizer.step()
            self.nonfinite_run = 0
        else:  # policy: skip the update (weights and optimizer state untouched), stop after too many in a row
            self.nonfinite_run = getattr(self, "nonfinite_run", 0) + 1
            self.nonfinite_total = getattr(self, "nonfinite_total", 0) + 1
            logger.warning(
                "non-finite loss or gradient (loss %s, grad norm %s): update skipped (%d in a row)",
                sums.tolist(),
                float(grad_norm),
                self.nonfinite_run,
            )
            if self.nonfinite_run > t.max_nonfinite_steps:
                raise FloatingPointError(
                    f"{self.nonfinite_run} optimizer steps in a row had a non-finite loss or gradient (limit "
                    f"train.max_nonfinite_steps={t.max_nonfinite_steps}); "
                    "lower the learning rate or check the data"
                )
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        reduced = d.all_reduce_sum([*(sums / accumulation).tolist(), read, corrupt], info)
        tracker.attempted += int(reduced[3])
        tracker.corrupt += int(reduced[4])
        tracker.check(
            self.recipe.data.max_corrupt_fraction, self.recipe.data.corrupt_grace
        )  # same on every rank
        loss, text, flow = (v / info.world_size for v in reduced[:3])
        return {
            "loss": loss,
            "text_loss": text,
            "image_loss": flow,
            "lr": lr,
            "grad_norm": float(grad_norm),
            "samples_per_s": t.global_batch / (time.perf_counter() - tic),
            "skipped": 0 if finite else 1,
        }


def train(recipe: Recipe, run_dir: str | Path | None = None, **kwargs: Any) -> TrainResult:
    """Run a stage I-IV recipe (see :class:`Trainer` for the arguments)."""
    return Trainer(recipe, run_dir, **kwargs).run()
