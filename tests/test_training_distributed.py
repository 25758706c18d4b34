"""The distributed path on a CPU: two processes over Gloo with FSDP2 (fully_shard), resumed from a sharded DCP
checkpoint, exported in the release layout; the numbers match one process reading the same global batches.

A DDP variant is marked slow (``pytest -m slow``).
"""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from cheers.models.pretrained import from_pretrained
from cheers.training.loop import Trainer
from test_training_fixtures import one_thread, tiny_processor, tiny_recipe, write_data  # noqa: F401

SETS = {
    "train.steps": 3,
    "train.micro_batch": 1,
    "train.global_batch": 4,
    "checkpoint.export": True,
    "data.cfg_dropout": 0.5,
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, root: str, strategy: str, ports: list[int]) -> None:
    from pathlib import Path

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    root = Path(root)
    files = {k: root / f"{k}.jsonl" for k in ("und", "gen", "text", "edit")}
    recipe = tiny_recipe(root, files, **SETS, **{"engine.strategy": strategy})
    run = root / strategy
    os.environ["MASTER_PORT"] = str(ports[0])
    first = Trainer(
        recipe, run, processor=tiny_processor(), stop_after=2
    ).run()  # steps 1-2, then a checkpoint
    os.environ["MASTER_PORT"] = str(ports[1])
    second = Trainer(recipe, run, processor=tiny_processor(), resume=True).run()  # step 3 from the checkpoint
    if rank == 0:
        (run / "history.json").write_text(json.dumps(first.history + second.history))


def _two_processes(tmp_path, strategy: str):
    write_data(tmp_path)
    mp.spawn(_worker, args=(2, str(tmp_path), strategy, [_free_port(), _free_port()]), nprocs=2, join=True)
    history = json.loads((tmp_path / strategy / "history.json").read_text())
    files = {k: tmp_path / f"{k}.jsonl" for k in ("und", "gen", "text", "edit")}
    single = Trainer(
        tiny_recipe(tmp_path, files, **SETS), tmp_path / "single", processor=tiny_processor()
    ).run()
    return history, single


def _compare(history, single, tmp_path, strategy):
    assert [h["step"] for h in history] == [1, 2, 3]
    for mine, ref in zip(history, single.history):
        for key in ("loss", "text_loss", "image_loss", "grad_norm"):
            assert mine[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-6), (mine["step"], key)
    exported = from_pretrained(tmp_path / strategy / "export").state_dict()
    reference = from_pretrained(single.export_dir).state_dict()
    assert exported.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(exported[name], reference[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_fsdp2_on_two_gloo_processes_resumes_and_matches_one_process(tmp_path):
    history, single = _two_processes(tmp_path, "fsdp")
    _compare(history, single, tmp_path, "fsdp")
    assert (tmp_path / "fsdp" / "checkpoints" / "step-00000003" / "dcp").is_dir()  # sharded checkpoint


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_ddp_on_two_gloo_processes_matches_one_process(tmp_path):
    history, single = _two_processes(tmp_path, "ddp")
    _compare(history, single, tmp_path, "ddp")


def _budget_worker(rank: int, world: int, root: str, port: int) -> None:
    import time
    from pathlib import Path

    from cheers.training import optim

    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    if rank == 1:  # this process's clock runs 3x fast: left alone it would fit a third of rank 0's steps
        start = time.monotonic()
        optim.time = type(
            "FastClock", (), {"monotonic": staticmethod(lambda: start + 3 * (time.monotonic() - start))}
        )
    root = Path(root)
    files = {k: root / f"{k}.jsonl" for k in ("und", "gen", "text", "edit")}
    recipe = tiny_recipe(
        root,
        files,
        **{
            **SETS,
            "train.steps": 100_000,
            "train.minutes": 0.04,
            "checkpoint.every": 0,
            "engine.strategy": "ddp",
        },
    )
    result = Trainer(recipe, root / "budget", processor=tiny_processor()).run()
    (root / f"budget-rank{rank}.json").write_text(
        json.dumps({"step": result.step, "exported": result.export_dir is not None})
    )


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_a_time_budget_stops_every_process_at_rank_0s_step(tmp_path):
    write_data(tmp_path)
    mp.spawn(_budget_worker, args=(2, str(tmp_path), _free_port()), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"budget-rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["step"] == ranks[1]["step"] >= 10 and ranks[0]["exported"]
