"""Checkpoint IO: safetensors round trips, sharding, strict checks, meta loading, atomic saves, hub errors."""

import json
import socket
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors import safe_open
from torch import nn

from cheers import atomic
from cheers import checkpoint as ckpt
from cheers.checkpoint import (
    CheckpointError,
    CheckpointMismatchError,
    atomic_write_json,
    list_weight_files,
    load_into,
    load_state_dict,
    parse_size,
    resolve_checkpoint_dir,
    save_state_dict,
)

REFERENCE = Path(__file__).parent / "fixtures/reference/config_a/checkpoint"
TIE_TARGET, TIE_SOURCE = "lm_head.weight", "model.language_model.embed_tokens.weight"


class LanguageModel(nn.Module):
    def __init__(self, vocab: int, dim: int):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, dim)
        self.proj = nn.Linear(dim, dim)
        self.bn = nn.BatchNorm1d(dim)


class Inner(nn.Module):
    def __init__(self, vocab: int, dim: int):
        super().__init__()
        self.language_model = LanguageModel(vocab, dim)


class TinyLM(nn.Module):
    """Official-like names: model.language_model.embed_tokens.weight tied to lm_head.weight."""

    def __init__(self, vocab: int = 32, dim: int = 8, tie: bool = True):
        super().__init__()
        self.model = Inner(vocab, dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        if tie:
            self.lm_head.weight = self.model.language_model.embed_tokens.weight


def _trained(seed: int = 0, **kw) -> TinyLM:
    torch.manual_seed(seed)
    m = TinyLM(**kw)
    with torch.no_grad():  # non-default BatchNorm statistics so the buffers are really checked
        m.model.language_model.bn.running_mean.normal_()
        m.model.language_model.bn.running_var.uniform_(0.5, 2.0)
        m.model.language_model.bn.num_batches_tracked.fill_(7)
    return m


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


def _dir_names(path: Path) -> set[str]:
    return {p.name for p in path.iterdir()}


def test_single_file_round_trip_is_exact_and_stores_both_tied_names(tmp_path):
    m = _trained()
    files = save_state_dict(m.state_dict(), tmp_path, metadata={"note": "x"})
    assert files == [tmp_path / "model.safetensors"]
    assert _dir_names(tmp_path) == {"model.safetensors"}
    loaded = load_state_dict(tmp_path)
    _assert_same(loaded, m.state_dict())
    assert TIE_TARGET in loaded and torch.equal(loaded[TIE_TARGET], loaded[TIE_SOURCE])
    with safe_open(str(files[0]), "pt") as f:
        assert f.metadata() == {"format": "pt", "note": "x"}


def test_sharded_round_trip_is_exact_with_a_correct_index(tmp_path):
    m = _trained()
    sd = m.state_dict()
    files = save_state_dict(sd, tmp_path, max_shard_size=1200)
    assert len(files) > 2
    n = len(files)
    assert [f.name for f in files] == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in sd.values())
    assert set(index["weight_map"]) == set(sd)
    for name, shard in index["weight_map"].items():
        with safe_open(str(tmp_path / shard), "pt") as f:
            assert name in f.keys()
    assert list_weight_files(tmp_path) == files
    _assert_same(load_state_dict(tmp_path), sd)
    assert set(load_state_dict(tmp_path, keys=[TIE_TARGET])) == {TIE_TARGET}
    with pytest.raises(CheckpointError, match="nope"):
        load_state_dict(tmp_path, keys=["nope"])


def test_resave_removes_stale_shards_and_switches_layout(tmp_path):
    sd = _trained().state_dict()
    save_state_dict(sd, tmp_path, max_shard_size=600)
    (tmp_path / "config.json").write_text("{}")
    save_state_dict(sd, tmp_path, max_shard_size=1200)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert _dir_names(tmp_path) == shards | {"model.safetensors.index.json", "config.json"}
    save_state_dict(sd, tmp_path)
    assert _dir_names(tmp_path) == {"model.safetensors", "config.json"}
    _assert_same(load_state_dict(tmp_path), sd)


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size("1.5 GiB") == int(1.5 * 2**30)
    assert parse_size(1234) == parse_size("1234") == 1234
    for bad in ("lots", "-1GB", 0):
        with pytest.raises(CheckpointError):
            parse_size(bad)


def test_strict_mismatch_lists_names_and_shapes(tmp_path):
    sd = _trained().state_dict()
    sd["extra.weight"] = torch.zeros(2)
    del sd["model.language_model.proj.bias"]
    sd["model.language_model.proj.weight"] = torch.zeros(3, 8)
    m = TinyLM()
    before = m.model.language_model.proj.weight.clone()
    with pytest.raises(CheckpointMismatchError) as info:
        load_into(m, sd)
    msg = str(info.value)
    assert "model.language_model.proj.bias" in msg and "extra.weight" in msg
    assert "model.language_model.proj.weight: checkpoint [3, 8] vs model [8, 8]" in msg
    rep = info.value.report
    assert rep.missing == ["model.language_model.proj.bias"] and rep.unexpected == ["extra.weight"]
    assert rep.mismatched == [("model.language_model.proj.weight", (3, 8), (8, 8))]
    assert torch.equal(m.model.language_model.proj.weight, before)  # nothing was loaded

    report = load_into(m, sd, strict=False)  # non-strict: loads what fits, reports the rest
    assert report.missing == rep.missing and report.n_loaded > 0
    assert torch.equal(m.model.language_model.bn.running_mean, sd["model.language_model.bn.running_mean"])


def test_long_mismatch_lists_are_capped():
    sd = {f"junk.{i}": torch.zeros(1) for i in range(50)}
    with pytest.raises(CheckpointMismatchError, match=r"and 30 more") as info:
        load_into(nn.Linear(2, 2), sd)
    assert len(info.value.report.unexpected) == 50


def test_missing_shard_is_named(tmp_path):
    save_state_dict(_trained().state_dict(), tmp_path, max_shard_size=1200)
    victim = sorted(tmp_path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name):
        list_weight_files(tmp_path)


def test_truncated_file_is_reported_by_name(tmp_path):
    save_state_dict(_trained().state_dict(), tmp_path)
    f = tmp_path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated or corrupt"):
        load_state_dict(tmp_path)


def test_pickle_only_and_empty_dirs_raise(tmp_path):
    with pytest.raises(CheckpointError, match="no weights"):
        list_weight_files(tmp_path)
    torch.save({"w": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="safetensors only.*never unpickle"):
        load_state_dict(tmp_path)


def test_meta_module_loads_by_assign_and_keeps_ties(tmp_path):
    src = _trained()
    save_state_dict(src.state_dict(), tmp_path)
    with torch.device("meta"):
        m = TinyLM()
    assert m.lm_head.weight is m.model.language_model.embed_tokens.weight
    report = load_into(m, load_state_dict(tmp_path))
    assert report.still_meta == [] and not report.missing
    assert all(not t.is_meta for t in m.state_dict().values())
    assert m.get_submodule("lm_head").weight is m.get_parameter(TIE_SOURCE)
    assert m.lm_head.weight.requires_grad
    _assert_same(m.state_dict(), src.state_dict())
    h = m.model.language_model.embed_tokens(torch.tensor([1, 2, 3]))  # (3, 8)
    assert torch.equal(
        m.lm_head(h), src.lm_head(src.model.language_model.embed_tokens(torch.tensor([1, 2, 3])))
    )


def test_non_persistent_meta_buffers_are_reported():
    class WithRope(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(2, 2)
            self.register_buffer("inv_freq", torch.ones(2), persistent=False)

    sd = WithRope().state_dict()
    assert set(sd) == {"proj.weight", "proj.bias"}
    with torch.device("meta"):
        m = WithRope()
    report = load_into(m, sd)
    assert report.n_loaded == 2 and report.still_meta == ["inv_freq"]
    assert torch.equal(m.proj.weight, sd["proj.weight"])


def test_tied_key_missing_from_file_is_filled_from_source():
    src = _trained()
    sd = {k: v for k, v in src.state_dict().items() if k != TIE_TARGET}
    tied_model = TinyLM()
    load_into(tied_model, sd)
    assert tied_model.lm_head.weight is tied_model.model.language_model.embed_tokens.weight
    assert torch.equal(tied_model.lm_head.weight, sd[TIE_SOURCE])
    untied = TinyLM(tie=False)
    load_into(untied, sd, assign=True)
    assert torch.equal(untied.lm_head.weight, sd[TIE_SOURCE])
    assert untied.lm_head.weight.data_ptr() != untied.model.language_model.embed_tokens.weight.data_ptr()
    with pytest.raises(CheckpointMismatchError, match="lm_head.weight"):
        load_into(TinyLM(), sd, tied={})


def test_dtype_cast_leaves_integer_buffers(tmp_path):
    save_state_dict(_trained().state_dict(), tmp_path)
    sd = load_state_dict(tmp_path, dtype=torch.bfloat16)
    assert sd["model.language_model.bn.num_batches_tracked"].dtype == torch.int64
    assert int(sd["model.language_model.bn.num_batches_tracked"]) == 7
    assert sd["model.language_model.proj.weight"].dtype == torch.bfloat16
    with torch.device("meta"):
        m = TinyLM()
    load_into(m, sd)
    assert m.lm_head.weight.dtype == torch.bfloat16 and m.lm_head.weight is m.get_parameter(TIE_SOURCE)


def test_local_dir_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_checkpoint_dir(tmp_path / "absent")
    with pytest.raises(CheckpointError, match="config.json"):
        resolve_checkpoint_dir(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    assert resolve_checkpoint_dir(tmp_path) == tmp_path


def test_hub_id_offline_raises_clear_error_without_network(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError) as info:
        resolve_checkpoint_dir("ai9stars/Cheers", cache_dir=tmp_path / "cache")
    msg = str(info.value)
    assert "ai9stars/Cheers" in msg and "offline" in msg and "local directory" in msg


def test_hub_network_error_is_wrapped(tmp_path, monkeypatch):
    import huggingface_hub

    seen = {}

    def fake_download(repo_id, **kwargs):
        seen.update(kwargs)
        raise ConnectionError("connection refused")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match="could not fetch hub checkpoint 'ai9stars/Cheers'.*offline"):
        resolve_checkpoint_dir("ai9stars/Cheers")
    assert seen["local_files_only"] is False
    assert not any(p.endswith((".bin", ".py", ".pt", ".pkl")) for p in seen["allow_patterns"])
    assert {"*.bin", "*.py", "*.pt", "*.pkl"} <= set(seen["ignore_patterns"])


def test_failed_save_keeps_previous_checkpoint_and_leaves_no_temp_files(tmp_path, monkeypatch):
    old = _trained(seed=0).state_dict()
    save_state_dict(old, tmp_path, max_shard_size=1200)
    before = _dir_names(tmp_path)
    real_save = safetensors.torch.save_file
    calls = []

    def flaky_save(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:  # second shard: leave a partial temp file behind, then fail
            Path(filename).write_bytes(b"partial")
            raise OSError("disk full")
        real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", flaky_save)
    with pytest.raises(OSError, match="disk full"):
        save_state_dict(_trained(seed=1).state_dict(), tmp_path, max_shard_size=600)
    assert _dir_names(tmp_path) == before
    _assert_same(load_state_dict(tmp_path), old)


def test_atomic_write_json(tmp_path, monkeypatch):
    path = tmp_path / "sub" / "a.json"
    atomic_write_json(path, {"b": 1})
    assert json.loads(path.read_text()) == {"b": 1}

    def boom(*args):
        raise OSError("rename failed")

    monkeypatch.setattr(atomic.os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write_json(path, {"b": 2})
    assert json.loads(path.read_text()) == {"b": 1} and _dir_names(path.parent) == {"a.json"}


def test_the_package_exports_every_name_callers_use():
    for name in ckpt.__all__:
        assert getattr(ckpt, name) is not None, name
    assert ckpt.atomic_write_json is atomic.write_json and ckpt.os_error_behind is atomic.os_error_behind
    assert ckpt.resolve_checkpoint_dir.__module__ == "cheers.checkpoint.hub"
    assert callable(ckpt._cap)  # training.parts formats its messages with it


@pytest.mark.skipif(not (REFERENCE / "model.safetensors").exists(), reason="reference checkpoint not present")
def test_reference_checkpoint_has_identical_tied_copies():
    assert resolve_checkpoint_dir(REFERENCE) == REFERENCE
    assert list_weight_files(REFERENCE) == [REFERENCE / "model.safetensors"]
    sd = load_state_dict(REFERENCE / "model.safetensors", keys=[TIE_TARGET, TIE_SOURCE])
    assert torch.equal(sd[TIE_TARGET], sd[TIE_SOURCE])
