"""A training-checkpoint writer for tests/test_checkpoint_faults.py to kill with SIGKILL.

Run as a script it is a *zygote*: it imports torch and the checkpoint code once (seconds), then forks one
child per command read from stdin, so every kill costs milliseconds instead of a fresh interpreter. A child
saves real checkpoints with :func:`cheers.training.checkpointing.save_checkpoint` of a small model whose
every weight, momentum buffer and scheduler step equals the step number (see :func:`make_state`), so a
loaded checkpoint can be verified against the step it says it holds. Commands and replies (one line each):

    loop <run> <first>       save steps first, first+1, ... of run dir <run> ("saved <step>" after each)
                             until the test kills it
    crash <run> <step> <k>   save <step>, SIGKILL-ing itself just before its k-th file-system call (k = 0:
                             never; it then reports "calls <n>", the number of calls the whole save made)
    quit

The zygote answers "pid <pid>" when a child starts and "exit <status>" when it is gone (-9: killed by
SIGKILL, 0: finished, 1: raised; its traceback goes to stderr).
The calls counted are those that change the file system (opening for writing, mkdir, rename/replace, remove,
rmdir, rmtree), seen through a Python audit hook; nothing in the saver is patched.
"""

from __future__ import annotations

import os
import signal
import sys
import traceback

import torch
from torch import nn

from cheers.training import checkpointing
from cheers.training.distributed import DistInfo

CHANGES = {
    "os.mkdir",
    "os.rename",
    "os.remove",
    "os.rmdir",
    "shutil.rmtree",
}  # audit events (rename: replace too)
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT
KEEP = 2
WIDTH = 256  # four 256x256 layers: ~1 MB of weights and 1 MB of momentum per checkpoint


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(*(nn.Linear(WIDTH, WIDTH) for _ in range(4)))


def make_state(step: int | None = None):
    """(model, optimizer, scheduler); with ``step``, every number they save equals it. Draws nothing from
    the global generators."""
    with torch.random.fork_rng(devices=[]):
        model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    if step is not None:
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        optimizer.step()  # creates the momentum buffers
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(step)
                optimizer.state[p]["momentum_buffer"].fill_(step)
        scheduler.last_epoch = step
    return model, optimizer, scheduler


def save(run_dir: str, step: int, state=None) -> None:
    model, optimizer, scheduler = state or make_state(step)
    checkpointing.save_checkpoint(
        run_dir, step, model, optimizer, scheduler, {"marker": step}, DistInfo(), keep=KEEP
    )


def _child(command: list[str]) -> None:
    torch.set_num_threads(1)
    run_dir = command[1]
    if command[0] == "loop":
        step = int(command[2])
        while True:
            save(run_dir, step)
            print(f"saved {step}", flush=True)
            step += 1
    step, kill_at = int(command[2]), int(command[3])
    state = make_state(step)  # before the hook: only the save's own calls are counted
    calls = 0

    def hook(event: str, args) -> None:
        nonlocal calls
        if event in CHANGES or (event == "open" and args[2] & WRITE_FLAGS):
            calls += 1
            if calls == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

    sys.addaudithook(hook)
    save(run_dir, step, state)
    print(f"calls {calls}", flush=True)


def main() -> None:
    torch.set_num_threads(1)
    print("ready", flush=True)
    for line in sys.stdin:
        command = line.split()
        if not command or command[0] == "quit":
            return
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                _child(command)
            except BaseException:
                traceback.print_exc()
                code = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        print(f"pid {pid}", flush=True)
        _, status = os.waitpid(pid, 0)
        print(
            f"exit {-os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)}", flush=True
        )


if __name__ == "__main__":
    main()
