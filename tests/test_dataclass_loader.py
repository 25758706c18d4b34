"""The strict dict -> dataclass loader behind the model config and the recipes."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cheers.config import CheersConfig, ConfigError
from cheers.dataclass_loader import StrictLoader

OFFICIAL = Path(__file__).parent / "fixtures/official/config.json"


class Bad(ValueError):
    pass


@dataclass
class Inner:
    n: int = 1
    sizes: tuple[int, ...] = (1, 2)


@dataclass
class Outer:
    name: str = "x"
    rate: float = 0.5
    flag: bool = False
    tag: str | None = None
    inner: Inner = field(default_factory=Inner)
    items: list[Inner] = field(default_factory=list)
    extra: dict = field(default_factory=dict)


STRICT = StrictLoader(Bad, "thing")
TEXT = StrictLoader(Bad, "thing", parse_text=True)


def test_nested_dataclasses_lists_tuples_and_defaults():
    out = STRICT.build(
        Outer, {"rate": 1, "inner": {"sizes": [3, 4]}, "items": [{"n": 2}, None], "extra": {"k": [1]}}
    )
    assert out == Outer(rate=1.0, inner=Inner(sizes=(3, 4)), items=[Inner(n=2), Inner()], extra={"k": [1]})
    assert isinstance(out.rate, float) and STRICT.build(Outer, None) == Outer()


@pytest.mark.parametrize(
    "data, message",
    [
        ({"inner": {"m": 1}}, r"unknown thing key\(s\): inner\.m; known keys of inner: \['n', 'sizes'\]"),
        ({"items": [{}, {"colour": 1}]}, r"items\.1\.colour"),
        ({"bogus": 1}, r"unknown thing key\(s\): bogus; known keys: \['name'"),
        ({"inner": {"n": True}}, r"inner\.n: expected an integer"),
        ({"inner": {"n": 2.0}}, r"inner\.n: expected an integer, got 2\.0"),
        ({"inner": {"sizes": [1, "2"]}}, r"inner\.sizes\.1"),
        ({"rate": float("inf")}, r"rate: expected a finite number"),
        ({"rate": 10**400}, r"rate: .*out of range"),
        ({"rate": "0.1"}, r"rate: expected a number"),
        ({"flag": 1}, r"flag: expected true or false"),
        ({"tag": 3}, r"tag: expected a string"),
        ({"inner": [1]}, r"inner: expected a mapping"),
        ([1], r"thing: expected a mapping"),
    ],
)
def test_strict_mode_rejects_naming_the_key_path(data, message):
    with pytest.raises(Bad, match=message):
        STRICT.build(Outer, data)


def test_text_mode_parses_what_people_and_overrides_write():
    out = TEXT.build(Outer, {"name": 7, "rate": "2e-5", "inner": {"n": "3", "sizes": [2.0]}})
    assert (out.name, out.rate, out.inner) == ("7", 2e-5, Inner(n=3, sizes=(2,)))
    for data, message in [
        ({"inner": {"n": "many"}}, r"inner\.n"),
        ({"inner": {"n": 2.5}}, "whole number"),
        ({"rate": "nan"}, "finite"),
        ({"flag": "yes"}, "true or false"),
    ]:
        with pytest.raises(Bad, match=message):
            TEXT.build(Outer, data)


def test_the_release_config_loads_and_only_named_release_keys_are_ignored():
    data = json.loads(OFFICIAL.read_text())
    assert {"architectures", "auto_map", "transformers_version"} <= set(data)
    cfg = CheersConfig.from_dict(data)
    assert CheersConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match=r"unknown config key\(s\): auto_mapp; known keys: \["):
        CheersConfig.from_dict({**data, "auto_mapp": {}})
    with pytest.raises(ConfigError, match=r"text_config\.bos_token_idd"):
        CheersConfig.from_dict({**data, "text_config": {**data["text_config"], "bos_token_idd": 1}})
    for bad, message in [
        ({"text_config": 5}, "text_config: expected a mapping"),
        ({"torch_dtype": 16}, "torch_dtype: expected a string"),
        ({"text_config": {"rms_norm_eps": float("nan")}}, r"text_config\.rms_norm_eps"),
    ]:
        with pytest.raises(ConfigError, match=message):
            CheersConfig.from_dict({**data, **bad})
