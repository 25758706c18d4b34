"""Stage 0 (ours, for ShapesWorld): train the small VAE, fit its latent statistics, seed the pixel decoder.

No pretrained VAE exists for the ShapesWorld model, so stage 0 makes one in three steps:

1. reconstruction training of ``vae_model.encoder`` + ``vae_model.decoder``: the decoder sees a sample of the
   encoder's posterior (mean + std·noise); loss = L1 and/or L2 reconstruction + ``kl_weight``·KL;
2. ``bn.fit`` on the 2x2-patchified posterior means of ``vae.fit_samples`` images, so that the normalised
   latents the flow works in have zero mean and unit variance per channel (the release's BatchNorm buffers);
3. the decoder and its statistics are copied into ``vae_decoder_projector``, which the vision tokenizer
   uses to decode z_t (the stages after this one train it further as the ``pixel_decoder`` group).

The result is ``<run>/vae`` (``vae_model.*`` + ``vae_decoder_projector.*`` safetensors and the VAE configs),
which a recipe names as ``init.vae``. One process (the VAE is small); resumable like the main loop.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cheers import checkpoint as ckpt
from cheers.data.loader import (
    CorruptTracker,
    Layout,
    MicroBatches,
    build_sources,
    make_loader,
    seed_everything,
)
from cheers.data.sources import CorruptSample
from cheers.models.vae import LatentDecoder, VAEModel, patchify
from cheers.training import checkpointing as ckpts
from cheers.training.config import Recipe, RecipeError
from cheers.training.distributed import DistInfo
from cheers.training.monitor import Monitor
from cheers.training.optim import StepBudget, build_optimizer, build_scheduler
from cheers.training.parts import model_config

logger = logging.getLogger(__name__)


class VAEPair(nn.Module):
    """The two VAE parts of Cheers under their release names (``vae_model``, ``vae_decoder_projector``)."""

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config
        self.vae_model = VAEModel(config.vae_encoder, config.vae_decoder)
        self.vae_decoder_projector = LatentDecoder(config.vae_decoder)

    def reconstruct(self, pixels: torch.Tensor, generator: torch.Generator | None = None):
        """(B, 3, H, W) -> reconstruction from a posterior sample, and the KL to N(0, I) (per element)."""
        moments = self.vae_model.encoder(pixels)  # (B, 2z, h', w')
        mean, logvar = moments.chunk(2, dim=1)
        logvar = logvar.clamp(-30.0, 20.0)
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        z = mean + (0.5 * logvar).exp() * noise
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()
        return self.vae_model.decoder(z), kl

    @torch.no_grad()
    def patchified_means(self, pixels: torch.Tensor) -> torch.Tensor:
        moments = self.vae_model.encoder(pixels)
        return patchify(moments[:, : moments.shape[1] // 2])  # (B, C, h, w)

    @torch.no_grad()
    def seed_pixel_decoder(self) -> None:
        self.vae_decoder_projector.decoder.load_state_dict(self.vae_model.decoder.state_dict())
        self.vae_decoder_projector.bn.load_state_dict(self.vae_model.bn.state_dict())


class _ImageBuilder:
    """record + images -> (k, 3, R, R) generation-preprocessed images (records without images are skipped)."""

    def __init__(self, resolution: int) -> None:
        self.resolution = resolution

    def __call__(self, record: dict[str, Any], images: list[Any], seed: int) -> torch.Tensor:
        from cheers.image_ops import preprocess_generation

        if not images:
            raise CorruptSample("no_image", f"{record.get('id')!r} has no image (stage 0 needs images)")
        try:
            return torch.stack([preprocess_generation(im, self.resolution) for im in images])
        except (ValueError, OSError) as err:
            raise CorruptSample("unreadable_image", str(err)) from None


class _Images:
    def __init__(self, tensors: torch.Tensor) -> None:
        self.pixels, self.attempted, self.corrupt, self.reasons = tensors, 0, 0, {}


def _collate_images(samples: list[torch.Tensor]) -> _Images:
    return _Images(torch.cat(samples))


def _loss(recipe: Recipe, rec: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    kind = recipe.vae.loss
    loss = rec.new_zeros(())
    if "l1" in kind:
        loss = loss + F.l1_loss(rec, target)
    if "l2" in kind:
        loss = loss + F.mse_loss(rec, target)
    return loss


def train_vae(
    recipe: Recipe, run_dir: str | Path | None = None, *, resume: bool = False, stop_after: int | None = None
) -> Path:
    """Run a stage-0 recipe; returns the VAE directory (``<run>/vae``), or the run dir when stopped early."""
    recipe.validate()
    if recipe.stage != "0":
        raise RecipeError(f"train_vae runs stage-0 recipes; this one is stage {recipe.stage!r}")
    r, t = recipe, recipe.train
    run_dir = Path(run_dir or r.out)
    info = DistInfo(
        device=torch.device("cuda" if torch.cuda.is_available() and r.engine.device != "cpu" else "cpu")
    )
    seed_everything(t.seed)
    config = model_config(r)
    model = VAEPair(config).to(info.device).train()
    for p in model.vae_decoder_projector.parameters():
        p.requires_grad_(False)
    optimizer = build_optimizer([(n, p) for n, p in model.named_parameters() if p.requires_grad], t)
    scheduler = build_scheduler(optimizer, t)
    start, tracker = 0, CorruptTracker()
    latest = ckpts.latest_checkpoint(run_dir) if resume else None
    if latest is not None:
        ckpts.load_model_weights(latest, model)
        state = ckpts.load_checkpoint(latest, model, optimizer, scheduler, info)
        start = int(state["step"])
        tracker.load_state_dict(state["data"]["corrupt"])
    accumulation = t.global_batch // t.micro_batch
    sources, ratios = build_sources(r.data.sources, config.image_size)
    dataset = MicroBatches(
        sources,
        ratios,
        _ImageBuilder(config.image_size),
        _collate_images,
        Layout(t.micro_batch, accumulation),
        r.data.seed,
        r.data.max_retries,
    )
    fit_micro = -(-r.vae.fit_samples // t.micro_batch)
    stop = t.steps if stop_after is None else start + stop_after
    last = min(t.steps, stop)
    loader = iter(
        make_loader(dataset, start * accumulation, t.steps * accumulation + fit_micro, r.data.num_workers)
    )
    monitor = Monitor(run_dir, t.steps, start, tensorboard=r.log.tensorboard, progress=r.log.progress)
    gen = torch.Generator(device=info.device).manual_seed(t.seed + start)
    try:
        budget = StepBudget(t.minutes, start, t.steps, scheduler) if t.minutes > 0 else None
        # 1. reconstruction training
        step = start
        while step < last:
            tic = time.perf_counter()
            totals = torch.zeros(3, dtype=torch.float64)
            for _ in range(accumulation):
                batch = next(loader)
                tracker.add(batch.attempted, batch.corrupt, batch.reasons)
                pixels = batch.pixels.to(info.device)
                rec, kl = model.reconstruct(pixels, gen)
                recon = _loss(r, rec, pixels)
                loss = recon + r.vae.kl_weight * kl
                (loss / accumulation).backward()
                totals += (
                    torch.stack([loss.detach(), recon.detach(), kl.detach()]).double().cpu() / accumulation
                )
            grad_norm = torch.nn.utils.clip_grad_norm_(
                model.parameters(), t.grad_clip if t.grad_clip > 0 else 1e9
            )
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            tracker.check(r.data.max_corrupt_fraction, r.data.corrupt_grace)
            done = step = step + 1
            if budget is not None:
                t.steps = budget.update(done)
                last = min(t.steps, stop)
                monitor.set_total(t.steps)
            monitor.advance()
            if done % max(r.log.every, 1) == 0 or done in (start + 1, last):
                loss_v, recon_v, kl_v = totals.tolist()
                monitor.log(
                    done,
                    {
                        "loss": loss_v,
                        "recon_loss": recon_v,
                        "kl": kl_v,
                        "lr": lr,
                        "grad_norm": float(grad_norm),
                        "samples_per_s": t.global_batch / (time.perf_counter() - tic),
                    },
                )
            if (r.checkpoint.every and done % r.checkpoint.every == 0) or (
                done == last and r.checkpoint.at_end
            ):
                ckpts.save_checkpoint(
                    run_dir,
                    done,
                    model,
                    optimizer,
                    scheduler,
                    {"global_batch": t.global_batch, "data": {"corrupt": tracker.state_dict()}},
                    info,
                    keep=r.checkpoint.keep,
                )
        if last < t.steps:
            return run_dir
        # 2. the latent statistics, 3. the pixel decoder
        model.eval()
        means = [model.patchified_means(next(loader).pixels.to(info.device)) for _ in range(fit_micro)]
        latents = torch.cat(means)[: r.vae.fit_samples]
        model.vae_model.bn.fit(latents)
        model.seed_pixel_decoder()
        psnr = _psnr(model, next(iter(make_loader(dataset, 0, 1))).pixels.to(info.device))
        monitor.log(
            t.steps,
            {"latent_mean": float(latents.mean()), "latent_std": float(latents.std()), "psnr": psnr},
            prefix="vae",
        )
        logger.info(
            "stage 0: latent statistics fitted on %d images; reconstruction PSNR %.2f dB", len(latents), psnr
        )
    finally:
        monitor.close()
    return save_vae(model, run_dir / "vae")


@torch.no_grad()
def _psnr(model: VAEPair, pixels: torch.Tensor) -> float:
    rec = model.vae_model.decode(model.vae_model.encode(pixels)).clamp(0, 1)
    mse = F.mse_loss(rec, pixels).clamp(min=1e-10)
    return float(10 * torch.log10(1 / mse))


def save_vae(model: VAEPair, directory: str | Path) -> Path:
    """``vae_model.*`` + ``vae_decoder_projector.*`` safetensors and the VAE configs (``init.vae`` reads
    it)."""
    directory = Path(directory)
    ckpt.save_state_dict(model.state_dict(), directory)
    cfg = model.config.to_dict()
    ckpt.atomic_write_json(
        directory / ckpt.CONFIG_NAME,
        {"vae_encoder_config": cfg["vae_encoder_config"], "vae_decoder_config": cfg["vae_decoder_config"]},
    )
    logger.info("saved the stage-0 VAE to %s", directory)
    return directory
