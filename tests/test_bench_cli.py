"""``cheers bench``: lists the scripts of bench/ and runs one with its own arguments."""

from __future__ import annotations

import torch

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


def test_count_flops_counts_grouped_query_attention_as_the_repeated_heads():
    import torch.nn.functional as F

    from cheers.flops import count_flops

    q, k, v = torch.randn(1, 8, 16, 32), torch.randn(1, 2, 16, 32), torch.randn(1, 2, 16, 32)
    # looked up at call time, as models do (the counting patch replaces the module attribute)
    grouped, out = count_flops(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
    k4, v4 = k.repeat_interleave(4, dim=1), v.repeat_interleave(4, dim=1)
    repeated, ref = count_flops(lambda: F.scaled_dot_product_attention(q, k4, v4))
    assert grouped == repeated == 2 * 2 * 8 * 16 * 16 * 32 and torch.equal(out, ref)
    assert F.scaled_dot_product_attention.__name__ == "scaled_dot_product_attention"  # restored
