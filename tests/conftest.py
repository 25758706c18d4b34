"""Session-wide test hooks."""

from __future__ import annotations

import pytest
import torch


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """After the run, list the largest parity error of every reference tensor that was compared."""
    try:
        from test_parity import MAX_ERRORS
    except ImportError:
        return
    if MAX_ERRORS and config.getoption("verbose") >= 0:
        worst = max(MAX_ERRORS.values())
        terminalreporter.write_sep(
            "-", f"parity: {len(MAX_ERRORS)} reference tensors, worst max |err| {worst:.2e}"
        )
        if config.getoption("verbose") > 0:
            for key, err in sorted(MAX_ERRORS.items()):
                terminalreporter.write_line(f"{key:60s} {err:.2e}")


@pytest.fixture(scope="module")
def one_cpu_thread():
    """Tiny models run fastest on one thread, and a shared CPU is not oversubscribed."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
