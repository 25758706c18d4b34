"""``cheers bench``: lists the scripts of bench/ and runs one with its own arguments."""

from __future__ import annotations

import pytest
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


@pytest.mark.slow
def test_sampling_bench_breakdown_counts_the_tokenizer_calls_of_each_path(capsys):
    # 2 steps: the release-style loop decodes each latent once per guidance branch and tokenizes the prompt's
    # dummy image once per branch; ours shares both between the branches
    assert (
        main(
            [
                "bench",
                "sampling",
                "--preset",
                "tiny",
                "--steps",
                "2",
                "--repeats",
                "1",
                "--batches",
                "1",
                "--breakdown",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    release, ours = out.split("where the time of one image goes (release-style")[1].split("(ours")
    calls = {}
    for label, text in (("release", release), ("ours", ours)):
        for line in text.splitlines():
            if line.strip().startswith(("tokenizer VAE decoder", "VAE encoder", "VAE decoder (output")):
                name = line.strip().split("  ")[0]
                calls[label, name] = int(line.split()[-2])
    assert (
        calls["release", "tokenizer VAE decoder"] == 2 * 2 + 2
        and calls["ours", "tokenizer VAE decoder"] == 2 + 1
    )
    assert (
        calls["release", "VAE encoder (prompt image)"] == 2
        and calls["ours", "VAE encoder (prompt image)"] == 1
    )
    assert calls["release", "VAE decoder (output image)"] == calls["ours", "VAE decoder (output image)"] == 1
    assert "speed-up (release-style / ours, same run)" in out
    import re

    memory = re.search(
        r"peak memory of one image beyond the model \(resident, sampled\): release-style (\d+) MiB, "
        r"ours (\d+) MiB",
        out,
    )
    assert memory and int(memory.group(1)) > 0 and int(memory.group(2)) > 0, out


def test_count_flops_counts_the_cpu_attention_backward():
    import torch.nn.functional as F
    from torch.utils import flop_counter

    from cheers.flops import count_flops

    q, k, v = (torch.randn(2, 4, 8, 16, requires_grad=True) for _ in range(3))

    def forward_backward():
        F.scaled_dot_product_attention(q, k, v).sum().backward()

    total, _ = count_flops(forward_backward)
    shape = (2, 4, 8, 16)
    assert total == flop_counter.sdpa_flop_count(shape, shape, shape) + flop_counter.sdpa_backward_flop_count(
        shape, shape, shape, shape
    )


@pytest.mark.slow
def test_train_bench_reports_the_step_flops_and_mfu(capsys):
    import re

    assert main(["bench", "train", "--cpu-only", "--steps", "1", "--warmup", "2", "--micro-batch", "2"]) == 0
    out = capsys.readouterr().out
    flops = re.search(
        r"([\d.]+) GFLOP per optimizer step \(forward \+ backward\), ([\d.]+) TFLOP/s achieved; "
        r"MFU ([\d.]+) % of a 2048x2048 float32 matmul measured now \(([\d.]+) TFLOP/s\)",
        out,
    )
    assert flops, out
    gflop, achieved, mfu, peak = map(float, flops.groups())
    assert gflop > 1 and 0 < mfu < 150 and peak > 0
    assert abs(mfu - 100 * achieved / peak) < 0.2 + 0.01 * mfu
    assert (
        main(
            [
                "bench",
                "train",
                "--cpu-only",
                "--steps",
                "1",
                "--warmup",
                "1",
                "--micro-batch",
                "2",
                "--no-flops",
            ]
        )
        == 0
    )
    assert "GFLOP" not in capsys.readouterr().out


def test_count_flops_counts_the_buffered_decoders_fused_convolutions():
    from cheers.config import VAEDecoderConfig
    from cheers.flops import count_flops
    from cheers.models import vae
    from cheers.models.vae_fast import install_fast_vae

    dec = vae.LatentDecoder(
        VAEDecoderConfig(resolution=64, ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4)
    ).eval()
    z = torch.randn(1, 16, 2, 2)
    fast = install_fast_vae(dec)
    with torch.no_grad():
        fast.reuse_buffers = False
        plain, _ = count_flops(lambda: dec(z))  # the reference forward with polyphase upsampling
        fast.reuse_buffers = True
        fused, _ = count_flops(lambda: dec(z))
    assert plain > 0 and fused == plain
