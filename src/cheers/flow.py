"""The flow-matching convention of Cheers, written once.

* Time runs from noise to data: ``t = 0`` is pure noise ``x0 ~ N(0, I)``, ``t = 1`` is the clean latent
  ``z1``.
* The path is linear: ``z_t = t·z1 + (1 − t)·x0``.
* The network predicts the velocity ``u = dz_t/dt = z1 − x0``. Images seen at ``t = 1`` (understanding
  images) get the target 0, as in the release: ``u = (z1 − x0)·[t < 1]``.
* Sampling integrates ``dz/dt = v(z, t)`` from 0 to 1 (see :mod:`cheers.sampling`).
* The release's time shift ``shift(t) = α·t / (1 + (α − 1)·t)``; α = 1 is no shift, α < 1 spends more
  steps near t = 0 (the noise end). Diffusers' ``shift`` s (the SD3/FLUX convention on "sigma" = 1 − t)
  is the same map with α = 1/s.
* Training draws t ~ U(0, 1) for generation images, clamped to [1e-6, 1 − 1e-6] (a logit-normal draw is
  opt-in).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

T_EPS = 1e-6


def interpolate(z1: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``z_t = t·z1 + (1 − t)·x0`` with t (n,) broadcast over (n, C, h, w)."""
    t = t.reshape(-1, *([1] * (z1.dim() - 1))).to(z1.dtype)
    return t * z1 + (1 - t) * x0


def velocity_target(z1: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``(z1 − x0)·[t < 1]``: zero for clean (t = 1) images."""
    keep = (t < 1).reshape(-1, *([1] * (z1.dim() - 1))).to(z1.dtype)
    return (z1 - x0) * keep


def time_shift(t: torch.Tensor, alpha: float) -> torch.Tensor:
    """The release's schedule warp ``α·t / (1 + (α − 1)·t)``; fixes 0 and 1."""
    if not alpha > 0:
        raise ValueError(f"time shift alpha must be > 0, got {alpha}")
    return alpha * t / (1 + (alpha - 1) * t)


TIME_SAMPLINGS = ("uniform", "logit_normal")


def sample_t(
    n: int,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    kind: str = "uniform",
    loc: float = 0.0,
    scale: float = 1.0,
) -> torch.Tensor:
    """Training times for generation images, clamped to [1e-6, 1 − 1e-6].

    ``uniform`` (the release): U(0, 1). ``logit_normal`` (opt-in, SD3's): ``sigmoid(loc + scale·ε)``,
    ε ~ N(0, 1); ``loc < 0`` puts more of the training on the noisy end (t near 0), where only the prompt says
    what to draw.
    """
    if kind == "uniform":
        t = torch.rand(n, generator=generator, device=device)
    elif kind == "logit_normal":
        if not scale > 0:
            raise ValueError(f"logit-normal time sampling needs scale > 0, got {scale}")
        t = torch.sigmoid(loc + scale * torch.randn(n, generator=generator, device=device))
    else:
        raise ValueError(f"unknown time sampling {kind!r}; choose one of {TIME_SAMPLINGS}")
    return t.clamp(T_EPS, 1 - T_EPS)


def flow_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over every element of every image (the release's image loss)."""
    return F.mse_loss(pred.float(), target.float())
