"""``cheers bench``: lists the scripts of bench/ and runs one with its own arguments."""

from __future__ import annotations

from cheers.cli import main


def test_bench_lists_and_runs_scripts(capsys):
    assert main(["bench", "list"]) == 0
    listed = capsys.readouterr().out
    assert "understanding" in listed and "solver-curve" in listed and "sampling" in listed
    assert main(["bench", "no-such-bench"]) == 2
    assert "unknown benchmark" in capsys.readouterr().err
    # the arguments reach the script (its own parser prints its help and exits 0)
    assert main(["bench", "understanding", "--help"]) == 0
    assert "--static-cache" in capsys.readouterr().out
    assert main(["bench", "solver-curve", "--solvers", "rk4"]) == 2  # the script's ValueError, as a CLI error
    assert "solver must be one of" in capsys.readouterr().err
