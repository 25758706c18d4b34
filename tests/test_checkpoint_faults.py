"""Training checkpoints under real faults: the writer killed with SIGKILL (at random moments, and just before
every file-system call of a save), and a disk that fills up part way through a save.

After every fault the checkpoint ``latest`` names must load and hold exactly the numbers of the step it
claims; the next save must succeed and leave no debris. The killed writer is a forked child of
``crash_saver.py`` (one interpreter start for all kills) running the real ``save_checkpoint``.
"""

from __future__ import annotations

import errno
import os
import queue
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors import SafetensorError

from cheers.training import checkpointing as ckpts
from cheers.training.distributed import DistInfo
from crash_saver import KEEP, make_state, save

pytestmark = [
    pytest.mark.skipif(not hasattr(os, "fork"), reason="the crash saver forks its writers"),
    pytest.mark.usefixtures("one_cpu_thread"),
]

HERE = Path(__file__).resolve().parent


class Zygote:
    """``crash_saver.py`` in a subprocess: send a command, read its replies (with a timeout, never
    hanging)."""

    def __init__(self) -> None:
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")])),
        }
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "crash_saver.py")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
            env=env,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.pending: list[str] = []  # replies of a child that came before the zygote's "pid" line
        threading.Thread(
            target=lambda: [self.lines.put(line.strip()) for line in self.proc.stdout], daemon=True
        ).start()
        assert self.read(timeout=120) == "ready"

    def read(self, timeout: float = 60) -> str:
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no answer from the crash saver in {timeout} s") from None

    def send(self, *words) -> int:
        """Start a child; returns its pid."""
        self.proc.stdin.write(" ".join(map(str, words)) + "\n")
        self.proc.stdin.flush()
        return int(self.expect("pid")[0])

    def expect(self, word: str) -> list[str]:
        """Read up to the line starting with ``word`` (keeping the others for :meth:`finish`); its
        arguments."""
        while True:
            line = self.read()
            head, *rest = line.split()
            if head == word:
                return rest
            self.pending.append(line)

    def finish(self) -> tuple[int, list[str]]:
        """Wait for the child: (exit status, the "saved"/"calls" replies it gave)."""
        replies, self.pending = self.pending, []
        while True:
            line = self.read()
            if line.startswith("exit"):
                return int(line.split()[1]), replies
            replies.append(line)

    def close(self) -> None:
        self.proc.stdin.write("quit\n")
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def zygote():
    z = Zygote()
    yield z
    z.close()


def verify(run_dir: Path) -> int:
    """Load the checkpoint ``latest`` names (weights, optimizer, scheduler, generators); every number must
    equal the step it records. Returns the step."""
    path = ckpts.latest_checkpoint(run_dir)
    state = ckpts.read_trainer_state(path)
    step = state["step"]
    assert state["marker"] == step and path.name.endswith(ckpts.step_name(step))
    model, optimizer, scheduler = make_state()
    generators = ckpts.capture_rng()
    try:
        ckpts.load_model_weights(path, model)
        ckpts.load_checkpoint(path, model, optimizer, scheduler, DistInfo())
    finally:
        ckpts.restore_rng(generators)  # loading restores the saved generator states; keep ours
    assert all(torch.all(p == step) for p in model.parameters())
    assert len(optimizer.state) == 8 and all(
        torch.all(s["momentum_buffer"] == step) for s in optimizer.state.values()
    )
    assert scheduler.last_epoch == step
    return step


def assert_tidy(run_dir: Path) -> None:
    """Only ``latest`` and at most KEEP complete step directories; no temp or moved-aside files anywhere."""
    root = ckpts.checkpoints_dir(run_dir)
    names = sorted(p.name for p in root.iterdir())
    steps = [n for n in names if n.startswith("step-")]
    assert names == [ckpts.LATEST, *steps] and len(steps) <= KEEP, names
    hidden = [p for p in root.rglob(".*")]
    assert not hidden, hidden


def baseline(tmp_path: Path) -> Path:
    """A run with checkpoints of steps 1 and 2 (``latest``: 2), written in this process."""
    run = tmp_path / "baseline"
    save(run, 1)
    save(run, 2)
    assert verify(run) == 2
    return run


def fresh_copy(base: Path, to: Path) -> Path:
    shutil.rmtree(to, ignore_errors=True)
    shutil.copytree(base, to)
    return to


@pytest.mark.slow
def test_sigkill_at_random_moments_keeps_the_last_checkpoint(zygote, tmp_path):
    run = tmp_path / "run"
    save(run, 1)
    last, rounds = 1, 6
    rng = random.Random(0)
    for _ in range(rounds):
        pid = zygote.send("loop", run, last + 1)
        first = int(zygote.expect("saved")[0])
        time.sleep(rng.uniform(0.0, 0.2))  # saves take ~30-100 ms: the kill lands anywhere in one of them
        os.kill(pid, signal.SIGKILL)
        status, replies = zygote.finish()
        assert status == -signal.SIGKILL
        reported = max([first] + [int(r.split()[1]) for r in replies if r.startswith("saved")])
        step = verify(run)
        # the last save that reported, or the one in flight if it got as far as writing `latest`
        assert step in (reported, reported + 1), (step, reported)
        last = step
    assert last > rounds
    pid = zygote.send("crash", run, last + 1, 0)  # a normal save after all that clears the debris
    assert zygote.finish()[0] == 0
    assert verify(run) == last + 1
    assert_tidy(run)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["next", "same"])
def test_sigkill_before_every_file_system_call_of_a_save(zygote, tmp_path, mode):
    """``next``: saving step 3 over steps 1, 2 (pruning 1). ``same``: re-saving step 2, which ``latest``
    names (the publish moves the old copy aside for an instant)."""
    base = baseline(tmp_path)
    target = 3 if mode == "next" else 2
    run = fresh_copy(base, tmp_path / "count")
    zygote.send("crash", run, target, 0)
    status, replies = zygote.finish()
    assert status == 0 and verify(run) == target
    calls = int(replies[-1].split()[1])
    assert calls > 10
    outcomes = set()
    for k in range(1, calls + 1):
        run = fresh_copy(base, tmp_path / "run")
        zygote.send("crash", run, target, k)
        assert zygote.finish()[0] == -signal.SIGKILL, f"the save made fewer than {k} calls"
        outcomes.add(verify(run))  # the checkpoint `latest` names loads, whatever the moment of death
        save(run, 4)  # the next save succeeds and clears what the killed one left
        assert verify(run) == 4
        assert_tidy(run)
    assert outcomes == ({2, 3} if mode == "next" else {2})


# -- a full disk ---------------------------------------------------------------------------------------------
class FullDisk:
    """A disk with ``free`` bytes left: writes past it store what fits, then fail as on a real full disk."""

    def __init__(self, free: float = float("inf")) -> None:
        self.free = free
        self.sizes: dict[
            str, int
        ] = {}  # bytes asked for, per file, in order ("model.safetensors", "latest", ...)

    def put(self, path, data: bytes, handle=None) -> None:
        fits = int(min(len(data), self.free))
        self.free -= fits
        name = Path(str(path)).name
        if name.startswith(".") and name.endswith(
            ".tmp"
        ):  # a temp file of the atomic writers: .{name}.{random}.tmp
            name = name[1:].rsplit(".", 2)[0]
        self.sizes[name] = self.sizes.get(name, 0) + len(data)
        if handle is not None:
            handle.write(data[:fits])
        else:
            with open(path, "wb") as f:
                f.write(data[:fits])
        if fits < len(data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    def install(self, monkeypatch) -> None:
        disk = self

        class File:  # what the saver's open(path, "wb") returns: torch.save writes through it
            def __init__(self, path, mode="r", *args, **kwargs):
                assert mode == "wb"
                self.path, self.f = path, open(path, mode)  # noqa: SIM115

            def write(self, data) -> int:
                disk.put(self.path, bytes(data), self.f)
                return len(data)

            def __getattr__(self, name):
                return getattr(self.f, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.f.close()

        def save_file(tensors, filename, metadata=None):  # safetensors reports the OS error in its message
            try:
                disk.put(filename, safetensors.torch.save(tensors, metadata=metadata))
            except OSError as err:
                failure = err
            else:
                return
            raise SafetensorError(
                f"Error while serializing: I/O error: {failure.strerror} (os error {failure.errno})"
            )

        monkeypatch.setattr(safetensors.torch, "save_file", save_file)
        monkeypatch.setattr(ckpts, "open", File, raising=False)
        monkeypatch.setattr(Path, "write_bytes", lambda path, data: disk.put(path, data) or len(data))


def _disk_budgets(tmp_path, monkeypatch, base) -> list[tuple[str, int]]:
    """(file, free bytes) pairs: the disk fills before each file of a save, and half way through it."""
    disk = FullDisk()
    with monkeypatch.context() as m:
        disk.install(m)
        save(fresh_copy(base, tmp_path / "dry"), 3)
    assert verify(tmp_path / "dry") == 3  # the simulated disk writes real, loadable files when not full
    assert list(disk.sizes) == [
        "model.safetensors",
        "optimizer.pt",
        "rank-00000.pt",
        "trainer_state.json",
        "latest",
    ]
    budgets, before = [], 0
    for name, size in disk.sizes.items():
        budgets += [(name, before), (name, before + size // 2)]
        before += size
    return budgets


def test_a_full_disk_fails_the_save_clearly_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    base = baseline(tmp_path)
    budgets = _disk_budgets(tmp_path, monkeypatch, base)
    for name, free in budgets:
        run = fresh_copy(base, tmp_path / "run")
        with monkeypatch.context() as m:
            FullDisk(free).install(m)
            with pytest.raises(OSError) as info:
                save(run, 3)
        err = info.value
        assert err.errno == errno.ENOSPC, (name, free, err)
        assert "No space left on device" in str(err) and "step-00000003" in str(err), str(err)
        assert "'latest' still names the previous checkpoint" in str(err)
        assert verify(run) == 2, (name, free)  # `latest` and what it names are untouched
        root = ckpts.checkpoints_dir(run)
        assert not list(root.rglob(".*")), (name, free, list(root.rglob(".*")))  # no temp files left
        left = sorted(p.name for p in root.iterdir())
        if name == "latest":  # the new step was complete and in place; only the pointer could not be written
            assert left == ["latest", "step-00000001", "step-00000002", "step-00000003"]
        else:
            assert left == ["latest", "step-00000001", "step-00000002"], (name, free, left)
        save(run, 3)  # space again: the same save now succeeds
        assert verify(run) == 3
        assert_tidy(run)
