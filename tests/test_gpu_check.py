"""bench/gpu_check.py --dry-run: the prepared GPU check runs end to end on CPU (tiny sizes, Triton
interpreter), so the script a GPU session runs first cannot rot between GPU sessions."""

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_bench_script(script, out, *args, drop=("BSTAR_KERNELS", "OUT"), rc=0, **env_extra):
    """bench/<script> as a subprocess without `drop` in its environment, its JSON written to `out`;
    asserts its exit code and returns (completed process, report)."""
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(env_extra)
    r = subprocess.run(
        [sys.executable, str(REPO / "bench" / script), *args, "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=600,
    )
    assert r.returncode == rc, r.stdout[-4000:] + r.stderr[-4000:]
    return r, json.loads(out.read_text())


def test_gpu_check_dry_run(tmp_path):
    r, report = run_bench_script("gpu_check.py", tmp_path / "gpu_check.json", "--dry-run", OMP_NUM_THREADS="1")
    rows = report["rows"]
    assert report["meta"]["dry_run"] and {1, 2, 3, 4, 5} <= {row["step"] for row in rows}
    bad = [row for row in rows if row["status"] == "FAIL"]
    assert not bad, bad
    assert (tmp_path / "memory_check.json").exists()  # step 5 ran bench/memory_check.py beside it
    assert "| step | check | value | target | status | note |" in r.stdout  # the table for RESULTS.md


def _ptxas_available() -> bool:
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return Path(get_ptxas(90).path).exists()
    except Exception:
        return False


def test_as_gpu_takes_the_gpu_launch_configs():
    """On CPU tensors the wrappers pick the interpreter's configs; inside as_gpu() the GPU's: the
    autotuner's candidate list, one row per sampling program (what compile_check compiles)."""
    import torch

    from kernels.decode_attention_triton import paged_decode_attention_triton
    from kernels.launch import as_gpu, gpu_configs, record_variants
    from kernels.sampling_triton import sample_triton

    kc = torch.zeros(8, 16, 2, 64, dtype=torch.bfloat16)
    for gpu, n_configs, block_r in ((False, 1, 256), (True, 3, 1)):
        launches = []
        ctx = as_gpu() if gpu else contextlib.nullcontext()
        with ctx, record_variants(run=False, launches=launches):
            assert gpu_configs(kc) == gpu
            q = torch.zeros(2, 14, 64, dtype=torch.bfloat16)
            paged_decode_attention_triton(
                q, kc, kc, torch.zeros(2, 4, dtype=torch.int32), torch.ones(2, dtype=torch.int32)
            )
            tuner, args, kwargs = launches[0]
            assert len(tuner.early_config_prune(tuner.configs, dict(zip(tuner.arg_names, args)), **kwargs)) == n_configs
            f = torch.ones(100)
            z = torch.zeros(100, dtype=torch.int32)
            sample_triton(torch.zeros(100, 50), f, z, f, f * 0, z.long())
        assert launches[-1][2]["BLOCK_R"] == block_r


@pytest.mark.skipif(not _ptxas_available(), reason="triton without its bundled ptxas")
def test_compile_check_quick(tmp_path):
    """Every kernel (one case each, bf16) compiles for sm_90 with the GPU's launch configs, within
    the H100's shared memory and register file (bench/compile_check.py; the full run: all cases)."""
    drop = ("BSTAR_KERNELS", "TRITON_INTERPRET")
    rows = run_bench_script("compile_check.py", tmp_path / "compile.json", "--quick", drop=drop)[1]["rows"]
    kernels = {row["kernel"] for row in rows}
    assert {"_decode_split_kernel", "_decode_merge_kernel", "_prefill_kernel", "_sample_kernel"} <= kernels
    assert {"_chunk_stats_kernel", "_store_kv_kernel", "_rms_norm_kernel", "_qk_norm_rope_kernel"} <= kernels
    assert "_rope_store_kv_kernel" in kernels
    assert sum(row["kernel"] == "_decode_split_kernel" for row in rows) == 3  # every autotune candidate
    assert all(row["shared"] + row["static_smem"] <= 232448 and row["status"] != "FAIL" for row in rows)


def test_gpu_check_survives_a_dead_step(tmp_path):
    """A step whose process dies (as a CUDA error would leave it) becomes one FAIL row; the next
    step still runs and the JSON and table are still written."""
    r, report = run_bench_script(
        "gpu_check.py",
        tmp_path / "gpu_check.json",
        "--dry-run",
        "--only",
        "1,4",
        rc=1,
        OMP_NUM_THREADS="1",
        BSTAR_GPU_CHECK_CRASH="1",
    )
    rows = report["rows"]
    dead = [row for row in rows if row["step"] == 1]
    assert len(dead) == 1 and dead[0]["status"] == "FAIL" and "died" in dead[0]["value"]
    assert [row["status"] for row in rows if row["step"] == 4] and all(
        row["status"] != "FAIL" for row in rows if row["step"] == 4
    )
    assert "| step | check | value | target | status | note |" in r.stdout
