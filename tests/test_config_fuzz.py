"""Fuzzing the config loader: any JSON-like input gives a config or a ConfigError, never another exception."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cheers.config import CheersConfig, ConfigError, preset

SUBS = ["vae_encoder_config", "vae_decoder_config", "vision_representation_config", "text_config", "cheers"]
FIELDS = [
    "ch",
    "ch_mult",
    "z_channels",
    "num_res_blocks",
    "resolution",
    "hidden_size",
    "num_attention_heads",
    "num_key_value_heads",
    "patch_size",
    "image_size",
    "intermediate_size",
    "vocab_size",
    "num_hidden_layers",
    "out_ch",
    "gen_head_depth",
    "time_embed_dim",
    "bogus",
]
values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-4, 300),
    st.floats(allow_nan=True),
    st.text(max_size=5),
    st.lists(st.integers(-1, 8), max_size=5),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.dictionaries(
        st.sampled_from(SUBS), st.dictionaries(st.sampled_from(FIELDS), values, max_size=4), max_size=4
    )
)
def test_config_loader_raises_only_config_errors(data):
    base = preset("tiny").to_dict()
    for sub, fields in data.items():
        base.setdefault(sub, {}).update(fields)
    try:
        cfg = CheersConfig.from_dict(json.loads(json.dumps(base)))
    except ConfigError:
        return
    assert CheersConfig.from_dict(cfg.to_dict()) == cfg


@settings(max_examples=100, deadline=None)
@given(
    st.one_of(
        st.none(),
        st.integers(),
        st.text(),
        st.lists(st.integers()),
        st.dictionaries(st.text(max_size=8), st.integers(), max_size=3),
    )
)
def test_non_object_configs_raise_config_errors(data):
    try:
        CheersConfig.from_dict(data)
    except ConfigError:
        pass
