"""The GenEval/DPG runners pass the solver and the guidance interval through and record them in the manifest,
so a folder resumed under other settings is refused instead of mixing images."""

from __future__ import annotations

import pytest

from cheers.eval.runner import SamplingSettings


def test_settings_validate_and_record_solver_and_interval():
    s = SamplingSettings(solver="heun", guidance_interval=[0.2, 1.0])
    assert s.guidance_interval == (0.2, 1.0)
    ident = s.identity()
    assert ident["solver"] == "heun" and ident["guidance_interval"] == [0.2, 1.0]
    assert SamplingSettings().identity() != ident
    with pytest.raises(ValueError, match="solver"):
        SamplingSettings(solver="rk45")
    with pytest.raises(ValueError):
        SamplingSettings(guidance_interval=(0.9, 0.1))


def test_resolved_settings_fill_the_pipelines_defaults():
    from model_helpers import tiny_pipeline

    pipe = tiny_pipeline()
    r = SamplingSettings().resolved(pipe)
    assert r.solver == pipe.defaults.solver == "euler" and r.guidance_interval is None
    assert SamplingSettings(solver="multistep").resolved(pipe).solver == "multistep"
