"""The decode step's GEMMs on CPU (float32, 128 rows, tiny-Llama shapes of bench/test_bench_generate.py):
our Linear on the GEMM `cpu_gemm="auto"` picks for this machine (bstar/engine/model/linear.py), weights packed or
reordered as the engine does, against ATen's
F.linear (MKL sgemm, what transformers runs), rounds alternating, results checked equal first.

Run: pytest bench/test_bench_linear.py --benchmark-only -s
"""

import time

import pytest
import torch
import torch.nn.functional as F

from bstar.engine.model.linear import Linear, pack_linears, resolve_cpu_gemm, set_cpu_gemm

ROWS = 128
SHAPES = [(256, 512), (256, 256), (256, 1408), (704, 256), (256, 4096)]  # qkv, o, gate_up, down, lm_head
REPEAT = 50


def test_decode_gemms_cpu_vs_aten(benchmark):
    gemm = resolve_cpu_gemm("auto")
    if gemm == "aten":
        pytest.skip("no faster CPU GEMM in this torch build")
    gen = torch.Generator().manual_seed(0)
    layers = torch.nn.Sequential(*(Linear(k, n) for k, n in SHAPES))
    set_cpu_gemm(layers, gemm)
    pack_linears(layers, ROWS, 1 << 30)  # as the engine does after 3 steady decode steps
    xs = [torch.randn(ROWS, k, generator=gen) for k, _ in SHAPES]

    def ours():
        with torch.no_grad():
            for _ in range(REPEAT):
                for lin, x in zip(layers, xs):
                    lin(x)

    def peer():
        with torch.no_grad():
            for _ in range(REPEAT):
                for lin, x in zip(layers, xs):
                    F.linear(x, lin.weight, lin.bias)

    with torch.no_grad():
        for lin, x in zip(layers, xs):
            torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias), atol=1e-4, rtol=1e-4)
    peer_times = []

    def timed_peer():
        t = time.perf_counter()
        peer()
        peer_times.append(time.perf_counter() - t)

    ours(), peer()
    benchmark.pedantic(ours, setup=timed_peer, rounds=5, iterations=1)
    ours_us = benchmark.stats.stats.median / REPEAT * 1e6
    peer_us = sorted(peer_times)[len(peer_times) // 2] / REPEAT * 1e6
    benchmark.extra_info.update(
        gemm=gemm, ours_us=round(ours_us), aten_us=round(peer_us), speedup=round(peer_us / ours_us, 2)
    )
    print(
        f"\n[cpu, {gemm}] five decode GEMMs, {ROWS} rows: ours {ours_us:.0f} us, "
        f"ATen F.linear {peer_us:.0f} us, ratio {peer_us / ours_us:.2f}x"
    )
