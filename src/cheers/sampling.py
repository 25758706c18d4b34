"""Stateless flow-ODE sampling: schedules, classifier-free guidance and Euler integration.

Works on any velocity callable ``v = velocity_fn(x, t, step)``; knows nothing about the network.
The convention (t = 0 noise, t = 1 data, v = z1 − x0) is in :mod:`cheers.flow`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from cheers.flow import time_shift

VelocityFn = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
FINAL_STEPS = ("release", "exact")
EDIT_START_T = 0.1  # the release starts editing from a latent mixed at t = 0.1 ...
EDIT_STEP_FRACTION = 0.9  # ... and runs int(0.9·S) steps


def schedule(num_steps: int, alpha: float = 1.0, start: float = 0.0) -> torch.Tensor:
    """The release's timesteps ``shift(linspace(start, 1, S))`` in float32 (S values, last one 1)."""
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_inference_steps must be a positive integer, got {num_steps!r}")
    return time_shift(torch.linspace(start, 1.0, num_steps, dtype=torch.float32), alpha)


def edit_schedule(num_steps: int, alpha: float = 1.0) -> torch.Tensor:
    """Editing: ``shift(linspace(0.1, 1, int(0.9·S)))``. Note the first velocity is taken at shift(0.1)."""
    effective = int(num_steps * EDIT_STEP_FRACTION)
    if effective < 1:
        raise ValueError(f"editing needs num_inference_steps >= 2 (int(0.9·S) >= 1), got {num_steps}")
    return schedule(effective, alpha, start=EDIT_START_T)


def edit_start(z_image: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The editing start latent ``0.1·encode(image) + 0.9·noise``."""
    return EDIT_START_T * z_image + (1 - EDIT_START_T) * noise


def apply_guidance(v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance on the final velocity: ``v_u + s·(v_c − v_u)``."""
    return v_uncond + scale * (v_cond - v_uncond)


def euler_sample(velocity_fn: VelocityFn, x: torch.Tensor, timesteps: torch.Tensor,
                 final_step: str = "release",
                 callback: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Integrate from ``timesteps[0]`` to 1 with Euler steps.

    Args:
        velocity_fn: ``v = f(x, t, step)`` with t a 0-d float32 tensor.
        x: (B, C, h, w) start latent.
        timesteps: (S,) increasing, ending at 1.
        final_step: ``"release"`` evaluates v at the last t (= 1) and adds it once more with step 1/S, so the
            integration overshoots t = 1 by 1/S (the released behaviour, SPEC §10.2); ``"exact"`` stops at t = 1
            (the last velocity is still evaluated, so a caller's KV cache sees the final latent).
        callback: called as ``callback(step, t, x, v)`` after each velocity evaluation.
    Returns:
        The final latent (B, C, h, w).
    """
    if final_step not in FINAL_STEPS:
        raise ValueError(f"final_step must be one of {FINAL_STEPS}, got {final_step!r}")
    steps = timesteps.shape[0]
    for n in range(steps):
        t = timesteps[n]
        v = velocity_fn(x, t, n)
        if not torch.isfinite(v).all():
            raise FloatingPointError(f"the velocity at step {n} (t={float(t):.4f}) has non-finite values")
        if callback is not None:
            callback(n, t, x, v)
        if bool(t != 1) and n < steps - 1:
            x = x + v * (timesteps[n + 1] - t).to(v.dtype)
        else:
            return x + v * (1.0 / steps) if final_step == "release" else x
    raise AssertionError("unreachable: the loop always returns at its last step")
