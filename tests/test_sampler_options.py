"""Sampler options on a tiny model: solvers end to end, guidance over an interval of t, pipeline and CLI
plumbing."""

from __future__ import annotations

import json

import pytest
import torch

from cheers.generation import generate
from cheers.pipeline import SamplingDefaults
from cheers.sampling import SOLVERS, ImageSampling, num_evaluations

from model_helpers import t2i_prompt, tiny_model, tiny_pipeline


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=4)


def run(model, **kw):
    prompt, dummy = t2i_prompt([9, 10]), torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(1, 32, 4, 4, generator=torch.Generator().manual_seed(0))
    image = dict(num_inference_steps=3, guidance_scale=3.0, shift=0.5)
    image |= {k: kw.pop(k) for k in ("guidance_scale", "solver", "guidance_interval") if k in kw}
    return generate(
        model,
        prompt,
        None,
        dummy,
        image_sampling=ImageSampling(**image),
        latents=noise,
        stop_after_image=True,
        **kw,
    )


class CountRows:
    """Records how many rows each LLM call runs (2 per guided evaluation of one prompt, 1 without)."""

    def __init__(self, model, monkeypatch):
        self.rows: list[int] = []
        original = model.run_language_model

        def counting(embeds, *args, **kwargs):
            self.rows.append(embeds.shape[0])
            return original(embeds, *args, **kwargs)

        monkeypatch.setattr(model, "run_language_model", counting)


@pytest.mark.parametrize("solver", SOLVERS)
def test_each_solver_runs_end_to_end(model, solver, monkeypatch):
    count = CountRows(model, monkeypatch)
    out = run(model, solver=solver, return_gates=True)
    image = out.images[0][0]
    assert image.shape == (3, 64, 64) and torch.isfinite(image).all()
    assert out.gates[0][0].shape == (3, 4, 4)  # one gate map per grid point, whatever the solver
    assert len(count.rows) == 1 + num_evaluations(solver, 3)  # the prefill, then the velocity evaluations
    if solver != "euler":
        assert not torch.allclose(image, run(model).images[0][0])


def test_euler_default_is_unchanged(model):
    assert torch.equal(run(model).images[0][0], run(model, solver="euler").images[0][0])


def test_interval_over_all_of_t_equals_plain_guidance(model):
    for solver in ("euler", "heun"):
        plain = run(model, solver=solver).latents[0][0]
        assert torch.equal(run(model, solver=solver, guidance_interval=(0.0, 1.0)).latents[0][0], plain)


def test_outside_the_interval_the_unconditional_branch_is_not_run(model, monkeypatch):
    unguided = run(model, guidance_scale=None).latents[0][0]
    count = CountRows(model, monkeypatch)
    never = run(model, guidance_interval=(0.99, 0.995)).latents[0][
        0
    ]  # the grid is 0, 1/3, 1 (after the shift)
    assert count.rows == [2, 1, 1, 1]  # both prompts prefilled, then the conditional rows only
    assert torch.allclose(never, unguided, atol=1e-5)
    count.rows.clear()
    partly = run(model, guidance_interval=(0.2, 0.6)).latents[0][0]  # only t = shift(1/2) = 1/3 is guided
    assert count.rows == [2, 1, 2, 1]
    assert not torch.allclose(partly, never) and not torch.allclose(partly, run(model).latents[0][0])


def test_a_conditional_only_last_evaluation_leaves_the_cache_as_a_full_one(model):
    """Text that follows the image sees the final latent's tokens in the conditional rows either way."""
    from cheers.generation import ImageSampler, prefill
    from cheers.tokens import unconditional_ids

    prompt, dummy = t2i_prompt([9, 10]), torch.rand(1, 3, 64, 64)
    ids = torch.cat([prompt, unconditional_ids(prompt, model.special)])
    x, t, active = torch.randn(1, 32, 4, 4), torch.tensor(1.0), torch.ones(1, dtype=torch.bool)
    with torch.no_grad():
        states = [prefill(model, ids, torch.ones_like(ids), dummy, repeat_images=2) for _ in range(2)]
        full, partial = (ImageSampler(model, s, 3.0, active) for s in states)
        full.velocity(torch.randn_like(x), torch.tensor(0.5))  # an earlier evaluation, cropped away below
        v_full, _, _ = full.velocity(x, t, guide=True)
        v_cond, v_uncond, _ = partial.velocity(x, t, guide=False)
        assert v_uncond is None and torch.allclose(v_cond, v_full, atol=1e-5)
        assert states[1].length == full.prefix_length  # the shared cache is untouched until finish()
        full.finish()
        partial.finish()
    a, b = states
    assert a.length == b.length and a.next_pos[0] == b.next_pos[0]
    assert torch.equal(a.key_valid[0], b.key_valid[0])
    # the unconditional row did not see this image: placeholders marked invalid, its position not advanced
    assert not b.key_valid[1, full.prefix_length :].any() and b.next_pos[1] == full.prefix_pos[1]
    for la, lb in zip(a.cache.layers, b.cache.layers):
        assert torch.allclose(la.keys[:1], lb.keys[:1], atol=1e-5)
        assert torch.allclose(la.values[:1], lb.values[:1], atol=1e-5)


def test_bad_options_raise(model):
    with pytest.raises(ValueError, match="solver must be one of"):
        run(model, solver="rk45")
    for bad in ((0.5, 0.2), (-0.1, 0.5), (0.1,), "ab"):
        with pytest.raises(ValueError, match="guidance_interval"):
            run(model, guidance_interval=bad)
    with pytest.raises(ValueError, match="solver"):
        SamplingDefaults(solver="dpm")


def test_pipeline_defaults_call_kwargs_and_cli(tmp_path, capsys):
    from cheers.cli import main

    from model_helpers import save_pipeline

    pipe = tiny_pipeline(seed=5)
    kw = dict(num_inference_steps=2, guidance_scale=2.0, output_type="pt", height=64, width=64)
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    base = pipe.generate("red", generator=gen(), **kw)
    assert base.settings["solver"] == "euler" and base.settings["guidance_interval"] is None
    heun = pipe.generate("red", generator=gen(), solver="heun", guidance_interval=(0.0, 0.5), **kw)
    assert heun.settings["solver"] == "heun" and heun.settings["guidance_interval"] == (0.0, 0.5)
    pipe.defaults = SamplingDefaults(solver="heun", guidance_interval=[0.0, 0.5])  # a JSON list is accepted
    assert torch.equal(pipe.generate("red", generator=gen(), **kw).images[0], heun.images[0])
    with pytest.raises(ValueError, match="solver must be one of"):
        pipe.generate("red", solver="rk4", **kw)
    pipe.defaults = SamplingDefaults()
    directory = save_pipeline(pipe, tmp_path / "tiny")
    (directory / "sampling_defaults.json").write_text(json.dumps({"solver": "multistep"}))
    target = tmp_path / "img.png"
    small = ["--height", "64", "--width", "64", "--quiet"]
    assert (
        main(
            [
                "generate",
                "red",
                "--model",
                str(directory),
                "--steps",
                "2",
                "--out",
                str(target),
                *small,
                "--guidance-interval",
                "0.1",
                "0.9",
            ]
        )
        == 0
    )
    meta = json.loads(target.with_suffix(".json").read_text())
    assert meta["solver"] == "multistep" and meta["guidance_interval"] == [0.1, 0.9]
    assert (
        main(
            [
                "generate",
                "red",
                "--model",
                str(directory),
                "--steps",
                "2",
                "--out",
                str(target),
                *small,
                "--solver",
                "midpoint",
            ]
        )
        == 0
    )
    assert json.loads(target.with_suffix(".json").read_text())["solver"] == "midpoint"
    assert main(["generate", "red", "--model", str(directory), "--guidance-interval", "0.9", "0.1"]) == 2
    assert "guidance_interval" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", "red", "--solver", "rk4"])


def test_the_prefix_image_follows_the_models_defaults(tmp_path):
    """A model trained without the release's noise prefix image declares ``prefix_image: null`` in its
    sampling_defaults.json; calls that do not say follow it, explicit arguments win."""
    from cheers.pipeline import CheersPipeline

    from model_helpers import save_pipeline

    kw = dict(num_inference_steps=2, guidance_scale=2.0, output_type="pt", height=64, width=64)
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    directory = save_pipeline(tiny_pipeline(seed=5), tmp_path / "tiny")
    release = CheersPipeline.from_pretrained(directory, device="cpu", progress=False)
    assert release.defaults.prefix_image == "dummy"  # no word from the checkpoint: the release's behaviour
    dummy = release.generate("red", generator=gen(), **kw)
    (directory / "sampling_defaults.json").write_text(json.dumps({"prefix_image": None}))
    bare = CheersPipeline.from_pretrained(directory, device="cpu", progress=False)
    assert bare.defaults.prefix_image is None
    default = bare.generate("red", generator=gen(), **kw)
    explicit_none = bare.generate("red", generator=gen(), prefix_image=None, **kw)
    explicit_dummy = bare.generate("red", generator=gen(), prefix_image="dummy", **kw)
    assert dummy.settings["prefix_image"] == "dummy" and default.settings["prefix_image"] is None
    assert torch.equal(default.images[0], explicit_none.images[0])
    assert torch.equal(explicit_dummy.images[0], dummy.images[0])
    assert not torch.equal(default.images[0], dummy.images[0])  # the prefix image is seen by the model
    question = [{"role": "user", "content": "red?"}]
    assert (
        bare.chat(question, max_new_tokens=2).texts
        == bare.chat(question, max_new_tokens=2, prefix_image=None).texts
    )
    with pytest.raises(ValueError, match="prefix_image"):
        SamplingDefaults(prefix_image="noise")
