"""ODE solvers of the flow sampler: convergence orders on an analytic field, validation, Euler unchanged."""

from __future__ import annotations

import math

import pytest
import torch

from cheers.sampling import SOLVERS, euler_sample, num_evaluations, sample, schedule

ORDERS = {"euler": 1, "multistep": 2, "heun": 2, "midpoint": 2}


def field(x: torch.Tensor, t: torch.Tensor, n: int) -> torch.Tensor:
    """dx/dt = (sin 2t − 1.5/(1 + t))·x: time-dependent, so a solver's stage times matter."""
    t = t.double()
    return (torch.sin(2 * t) - 1.5 / (1 + t)) * x


def exact(x0: torch.Tensor, t: float) -> torch.Tensor:
    return x0 * math.exp(0.5 - 0.5 * math.cos(2 * t) - 1.5 * math.log(1 + t))


@pytest.mark.parametrize("alpha", [1.0, 0.5])  # 0.5: the shifted, non-uniform grid the bundled model uses
@pytest.mark.parametrize("solver", SOLVERS)
def test_error_shrinks_at_the_solvers_order(solver, alpha):
    x0 = torch.tensor([1.0, -0.5], dtype=torch.float64)
    errors = []
    for intervals in (16, 32, 64, 128):
        ts = schedule(intervals + 1, alpha).double()
        out = sample(field, x0, ts, solver=solver, final_step="exact")
        errors.append(float((out - exact(x0, 1.0)).abs().max()))
    rates = [math.log2(a / b) for a, b in zip(errors, errors[1:])]
    assert all(abs(r - ORDERS[solver]) < 0.25 for r in rates[1:]), (solver, errors, rates)


@pytest.mark.parametrize("solver", SOLVERS)
def test_evaluation_count_and_callbacks(solver):
    calls, grid = [], []
    ts = schedule(6, 0.5)
    sample(
        lambda x, t, n: calls.append(float(t)) or -x,
        torch.ones(1, 2, 2, 2),
        ts,
        solver=solver,
        callback=lambda n, t, x, v: grid.append(n),
    )
    assert len(calls) == num_evaluations(solver, 6)
    assert grid == list(range(6))  # one callback per grid point, whatever the solver
    assert (
        calls[-1] == 1.0
    )  # every solver ends with the velocity at t = 1 (the KV cache sees the final latent)


def test_release_final_step_overshoots_like_euler():
    x0, ts = torch.tensor([1.0], dtype=torch.float64), schedule(9).double()
    for solver in SOLVERS:
        exact_end = sample(field, x0, ts, solver=solver, final_step="exact")
        release = sample(field, x0, ts, solver=solver, final_step="release")
        assert torch.allclose(release, exact_end + field(exact_end, torch.tensor(1.0), 0) / 9)


def test_euler_is_the_release_loop_bit_for_bit():
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 4, 3, 3, generator=gen), torch.randn(4, 4, generator=gen)

    def velocity(x_, t, n):
        return torch.einsum("bchw,cd->bdhw", torch.tanh(x_), w) * (1 + t)

    for final_step in ("release", "exact"):
        ts = schedule(7, 0.5)
        assert torch.equal(
            sample(velocity, x, ts, final_step=final_step),
            euler_sample(velocity, x, ts, final_step=final_step),
        )
        manual = x
        for n in range(6):  # the release's loop, written out
            manual = manual + velocity(manual, ts[n], n) * (ts[n + 1] - ts[n])
        if final_step == "release":
            manual = manual + velocity(manual, ts[6], 6) * (1.0 / 7)
        assert torch.equal(sample(velocity, x, ts, final_step=final_step), manual)


def test_bad_solver_and_final_step_raise():
    with pytest.raises(ValueError, match="solver must be one of"):
        sample(field, torch.ones(1), schedule(3), solver="rk4")
    with pytest.raises(ValueError, match="final_step"):
        sample(field, torch.ones(1), schedule(3), solver="heun", final_step="late")


def test_half_precision_latents_keep_their_dtype():
    x = torch.ones(1, 2, 2, 2, dtype=torch.bfloat16)
    for solver in SOLVERS:
        out = sample(lambda x_, t, n: -x_, x, schedule(4), solver=solver)
        assert out.dtype == torch.bfloat16
