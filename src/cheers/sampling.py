"""Stateless flow-ODE sampling: schedules, classifier-free guidance and the ODE solvers.

Works on any velocity callable ``v = velocity_fn(x, t, step)``; knows nothing about the network.
The convention (t = 0 noise, t = 1 data, v = z1 − x0) is in :mod:`cheers.flow`.

Solvers on the release's grid ``t_0 < … < t_{S-1} = 1`` (velocity evaluations per image in brackets):

* ``euler`` (S): the release's loop, exactly (the default).
* ``multistep`` (S): second-order Adams–Bashforth with variable steps, the velocity-form counterpart of
  DPM-Solver++(2M): each step reuses the previous grid point's velocity, so it costs what Euler costs.
* ``heun`` (2S − 1): the trapezoid rule, predictor at ``t_{n+1}``; second order.
* ``midpoint`` (2S − 1): the explicit midpoint rule, second order.

Every solver ends the same way: it evaluates the velocity at ``(x(1), 1)`` (so a caller's KV cache holds the
final latent's tokens, as in the release) and, with ``final_step="release"``, adds it once more with step 1/S.
That overshoot is first order by construction, so the higher orders show fully only with ``"exact"``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from cheers.choices import SOLVERS
from cheers.flow import time_shift

VelocityFn = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
StepCallback = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]
FINAL_STEPS = ("release", "exact")
EVALS_PER_STEP = {"euler": 1, "multistep": 1, "heun": 2, "midpoint": 2}
EDIT_START_T = 0.1  # the release starts editing from a latent mixed at t = 0.1 ...
EDIT_STEP_FRACTION = 0.9  # ... and runs int(0.9·S) steps


def schedule(num_steps: int, shift: float = 1.0, start: float = 0.0) -> torch.Tensor:
    """The release's timesteps ``shift(linspace(start, 1, S))`` in float32 (S values, last one 1)."""
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_inference_steps must be a positive integer, got {num_steps!r}")
    return time_shift(torch.linspace(start, 1.0, num_steps, dtype=torch.float32), shift)


def edit_steps(num_steps: int) -> int:
    """The steps editing runs for ``num_inference_steps`` S: int(0.9·S), as released."""
    return int(num_steps * EDIT_STEP_FRACTION)


def edit_schedule(num_steps: int, shift: float = 1.0) -> torch.Tensor:
    """Editing: ``shift(linspace(0.1, 1, int(0.9·S)))``. Note the first velocity is taken at shift(0.1)."""
    effective = edit_steps(num_steps)
    if effective < 1:
        raise ValueError(f"editing needs num_inference_steps >= 2 (int(0.9·S) >= 1), got {num_steps}")
    return schedule(effective, shift, start=EDIT_START_T)


def edit_start(z_image: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The editing start latent ``0.1·encode(image) + 0.9·noise``."""
    return EDIT_START_T * z_image + (1 - EDIT_START_T) * noise


def apply_guidance(v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance on the final velocity: ``v_u + s·(v_c − v_u)``."""
    return v_uncond + scale * (v_cond - v_uncond)


def check_guidance_interval(interval) -> tuple[float, float] | None:
    """Validate ``(t_lo, t_hi)`` with 0 <= t_lo <= t_hi <= 1 (or None: guide everywhere); returns a tuple."""
    if interval is None:
        return None
    try:
        lo, hi = (float(v) for v in interval)
    except (TypeError, ValueError):
        raise ValueError(
            f"guidance_interval must be a pair (t_lo, t_hi) of numbers, got {interval!r}"
        ) from None
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"guidance_interval must satisfy 0 <= t_lo <= t_hi <= 1, got {interval!r}")
    return lo, hi


def in_guidance_interval(t: torch.Tensor | float, interval: tuple[float, float] | None) -> bool:
    """Whether guidance applies at time t: ``t_lo <= t <= t_hi`` (always without an interval).

    Guiding only over an interval of t (Kynkäänniemi et al., 2024) both helps quality and, outside the
    interval, saves the unconditional branch's compute.
    """
    if interval is None:
        return True
    return interval[0] <= float(t) <= interval[1]


def check_solver(solver: str) -> str:
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    return solver


def num_evaluations(solver: str, num_steps: int) -> int:
    """Velocity evaluations for ``num_steps`` grid points (S for one-step solvers, 2S − 1 for two-stage)."""
    return EVALS_PER_STEP[check_solver(solver)] * (num_steps - 1) + 1


def check_final_step(final_step: str) -> str:
    if final_step not in FINAL_STEPS:
        raise ValueError(f"final_step must be one of {FINAL_STEPS}, got {final_step!r}")
    return final_step


@dataclass(frozen=True)
class ImageSampling:
    """How an image is sampled (reference §10.1), beside :class:`cheers.text_sampling.TextSampling` for text.

    Args:
        num_inference_steps: grid points S of the ODE (editing runs ``int(0.9·S)`` of them from t = 0.1).
        guidance_scale: classifier-free guidance ``v_u + s·(v_c − v_u)``; None, 0 or 1 turns it off (the
            unconditional rows are then not run at all).
        shift: the release's time shift of the grid, ``shift·t / (1 + (shift − 1)·t)``; < 1 spends more steps
            near the noise end (diffusers' ``shift`` s is 1/s here).
        solver: one of :data:`SOLVERS` (``"euler"``: the release's).
        final_step: ``"release"`` (the overshooting last step, as released) or ``"exact"`` (stop at t = 1).
        guidance_interval: ``(t_lo, t_hi)``: guide only there; None: at every step.
    """

    num_inference_steps: int = 80
    guidance_scale: float | None = None
    shift: float = 1.0
    solver: str = "euler"
    final_step: str = "release"
    guidance_interval: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.num_inference_steps, int) or self.num_inference_steps < 1:
            raise ValueError(
                f"num_inference_steps must be a positive integer, got {self.num_inference_steps!r}"
            )
        scale = self.guidance_scale
        if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)):
            raise ValueError(f"guidance_scale must be a finite number or None, got {scale!r}")
        if not (isinstance(self.shift, (int, float)) and math.isfinite(self.shift) and self.shift > 0):
            raise ValueError(f"shift must be a finite number > 0, got {self.shift!r}")
        check_solver(self.solver)
        check_final_step(self.final_step)
        object.__setattr__(self, "guidance_interval", check_guidance_interval(self.guidance_interval))

    @property
    def guided(self) -> bool:
        """Whether the unconditional branch runs (a scale other than None, 0 and 1)."""
        return self.guidance_scale is not None and self.guidance_scale not in (0, 1)

    def timesteps(self, edit: bool = False) -> torch.Tensor:
        """The grid: :func:`schedule`, or :func:`edit_schedule` for editing."""
        if edit:
            return edit_schedule(self.num_inference_steps, self.shift)
        return schedule(self.num_inference_steps, self.shift)


def sample(
    velocity_fn: VelocityFn,
    x: torch.Tensor,
    timesteps: torch.Tensor,
    solver: str = "euler",
    final_step: str = "release",
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Integrate from ``timesteps[0]`` to 1 with ``solver`` (see the module docstring).

    Args:
        velocity_fn: ``v = f(x, t, step)`` with t a 0-d float32 tensor; ``step`` is the grid index n of the
            interval being integrated (two-stage solvers call it twice with the same n).
        x: (B, C, h, w) start latent.
        timesteps: (S,) increasing, ending at 1.
        solver: one of :data:`SOLVERS`.
        final_step: ``"release"`` or ``"exact"`` (see :func:`euler_sample`).
        callback: ``callback(n, t_n, x_n, v_n)`` once per grid point, after its velocity evaluation.
    Returns:
        The final latent (B, C, h, w).
    """
    if check_solver(solver) == "euler":
        return euler_sample(velocity_fn, x, timesteps, final_step, callback)
    check_final_step(final_step)
    steps = timesteps.shape[0]
    work = torch.promote_types(x.dtype, torch.float32)  # stage combinations never in half precision
    previous: tuple[torch.Tensor, torch.Tensor] | None = None  # (v_{n-1}, h_{n-1}) for the multistep solver

    def evaluate(x_: torch.Tensor, t_: torch.Tensor, n: int) -> torch.Tensor:
        v_ = velocity_fn(x_, t_, n)
        if not torch.isfinite(v_).all():
            raise FloatingPointError(f"the velocity at step {n} (t={float(t_):.4f}) has non-finite values")
        return v_

    for n in range(steps):
        t = timesteps[n]
        v = evaluate(x, t, n)
        if callback is not None:
            callback(n, t, x, v)
        if not (bool(t != 1) and n < steps - 1):
            return _add(x, v, 1.0 / steps) if final_step == "release" else x
        h = timesteps[n + 1] - t
        if solver == "heun":
            v_end = evaluate(_add(x, v, h), timesteps[n + 1], n)
            x = _add(x, v.to(work) + v_end.to(work), h / 2)
        elif solver == "midpoint":
            v_mid = evaluate(_add(x, v, h / 2), t + h / 2, n)
            x = _add(x, v_mid, h)
        elif previous is None:  # multistep: the first step has no history and is Euler's
            x = _add(x, v, h)
            previous = (v, h)
        else:
            v_prev, h_prev = previous
            r = h / h_prev  # variable-step Adams–Bashforth 2: v_n + (r/2)·(v_n − v_{n-1})
            x = _add(x, v.to(work) + (r / 2) * (v.to(work) - v_prev.to(work)), h)
            previous = (v, h)
    raise AssertionError("unreachable: the loop always returns at its last step")


def _add(x: torch.Tensor, direction: torch.Tensor, h: torch.Tensor | float) -> torch.Tensor:
    """``x + h·direction`` in at least float32, returned in x's dtype (half-precision latents stay so)."""
    work = torch.promote_types(x.dtype, torch.float32)
    return (x.to(work) + direction.to(work) * h).to(x.dtype)


def euler_sample(
    velocity_fn: VelocityFn,
    x: torch.Tensor,
    timesteps: torch.Tensor,
    final_step: str = "release",
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Integrate from ``timesteps[0]`` to 1 with Euler steps: the release's loop, exactly.

    Args:
        velocity_fn: ``v = f(x, t, step)`` with t a 0-d float32 tensor.
        x: (B, C, h, w) start latent.
        timesteps: (S,) increasing, ending at 1.
        final_step: ``"release"`` evaluates v at the last t (= 1) and adds it once more with step 1/S, so the
            integration overshoots t = 1 by 1/S (the released behaviour, reference §10.2); ``"exact"`` stops
            at t = 1 (the last velocity is still evaluated, so a caller's KV cache sees the final latent).
        callback: called as ``callback(step, t, x, v)`` after each velocity evaluation.
    Returns:
        The final latent (B, C, h, w).
    """
    check_final_step(final_step)
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
