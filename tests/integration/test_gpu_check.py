"""bench/gpu_check.py --dry-run: the prepared GPU check runs end to end on CPU (tiny sizes, Triton
interpreter), so the script a GPU session runs first cannot rot between GPU sessions."""

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import bench_scripts
import pytest

REPO = Path(__file__).resolve().parents[2]


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
    assert any(row["check"].startswith("decode graphs' pool") for row in rows if row["step"] == 3)
    assert "| step | check | value | target | status | note |" in r.stdout  # the table for RESULTS.md
    # compile_check compiles what this run launched: every variant the dry run's kernel calls need on a GPU
    # is among those of the list it reads (else: `gpu_check.py --dry-run --launches-out bench/gpu_launches.json`)
    ran = _gpu_variants(json.loads((tmp_path / "gpu_launches.json").read_text()))
    listed = _gpu_variants(json.loads((REPO / "bench" / "gpu_launches.json").read_text()))
    assert ran <= listed, f"bench/gpu_launches.json is stale: {len(ran - listed)} variants missing"


def _gpu_variants(calls) -> set:
    """The variant keys a GPU launches for these recorded wrapper calls (kernels.launch.replay_call)."""
    from bstar.kernels.launch import as_gpu, record_variants, replay_call

    keys = set()
    for spec in calls:
        with as_gpu(), record_variants(run=False) as seen:
            replay_call(spec)
        keys |= {k for v in seen.values() for k in v}
    return keys


def test_recorded_calls_replay_with_their_layout():
    """record_calls keeps each traced wrapper call's tensor layout (shape, strides, dtype, 16-byte alignment)
    and scalars; replay_call makes the same call on CPU tensors: the same variant keys, GPU configs or not.
    A wrapper called inside another is recorded once, as the outer call."""
    import torch

    from bstar.kernels.decode_attention_triton import paged_decode_attention_triton
    from bstar.kernels.launch import as_gpu, record_calls, record_variants, replay_call
    from bstar.kernels.sampling_triton import sample_triton

    kc = torch.zeros(9, 8, 2, 16)
    f = torch.ones(3)
    z = torch.zeros(3, dtype=torch.int32)

    def calls():
        paged_decode_attention_triton(
            torch.zeros(2, 5, 16)[:, 1:], kc, kc, torch.zeros(2, 1, dtype=torch.int32), torch.ones(2, dtype=torch.int32)
        )
        sample_triton(torch.zeros(3, 321)[:, 1:], f, z, f, f * 0, z.long(), split=True)

    with record_calls() as specs:
        calls()
        calls()  # (the same calls: recorded once)
    assert [s["fn"].split(":")[1] for s in specs] == ["paged_decode_attention_triton", "sample_triton"]
    q = specs[0]["args"][0]
    assert (q["shape"], q["stride"], q["tensor"], q["align"]) == ([2, 4, 16], [80, 16, 1], "float32", 0)
    assert specs[1]["args"][0]["align"] == 4 and specs[1]["kwargs"] == {"split": True}
    for gpu in (False, True):
        ctx = as_gpu if gpu else contextlib.nullcontext
        with ctx(), record_variants(run=False) as want:
            calls()
        with ctx(), record_variants(run=False) as got:
            for spec in json.loads(json.dumps(specs)):
                replay_call(spec)
        assert got == want


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

    from bstar.kernels.decode_attention_triton import paged_decode_attention_triton
    from bstar.kernels.launch import as_gpu, gpu_configs, record_variants
    from bstar.kernels.sampling_triton import sample_triton

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
    the H100's shared memory and register file (bench/compile_check.py; the full run: all cases),
    and its SASS is read: the decode and prefill kernels' K/V tiles, the norm's and the MLP's rows,
    the KV store's and the rotary kernels' (plain, after the q/k norm, and fused with the KV store)
    rows move 16 bytes a thread, attention uses matrix instructions, and local
    memory is flagged. The same from the PTX (the fallback without nvdisasm)."""
    drop = ("BSTAR_KERNELS", "TRITON_INTERPRET")
    every = run_bench_script("compile_check.py", tmp_path / "compile.json", "--quick", drop=drop)[1]["rows"]
    assert not [row for row in every if row["status"].startswith("FAIL")]
    # the calls gpu_check's dry run recorded (bench/gpu_launches.json) compile too, with the GPU's configs: the
    # sampler at the tiny models' vocabulary 320 (one chunk: BLOCK_C = 1), head dim 16 in fp32
    recorded = [row for row in every if row["case"].startswith("recorded ")]
    assert any(row["config"].get("BLOCK_C") == 1 and "x320 " in row["case"] for row in recorded)
    assert {"_decode_split_kernel", "_prefill_kernel", "_rope_store_kv_kernel", "_sample_kernel"} <= {
        row["kernel"] for row in recorded if row["case"].endswith("float32")
    }
    rows = [row for row in every if row not in recorded]
    kernels = {row["kernel"] for row in rows}
    assert {"_decode_split_kernel", "_decode_merge_kernel", "_prefill_kernel", "_sample_kernel"} <= kernels
    assert {"_chunk_stats_kernel", "_store_kv_kernel", "_rms_norm_kernel", "_qk_norm_rope_kernel"} <= kernels
    assert "_rope_store_kv_kernel" in kernels
    assert sum(row["kernel"] == "_decode_split_kernel" for row in rows) == 6  # every autotune candidate, 2 tables
    assert all(row["shared"] + row["static_smem"] <= 232448 and not row["status"].startswith("FAIL") for row in rows)
    for row in rows:
        acc = row["access"]
        assert acc["source"] == "sass" and all(f"| {col} " in row["mem"] for col in ("cp", "st", "mma", "local"))
        assert ("local" in row["status"].split("+")) == (acc["local"] > 0)
        assert ("narrow" in row["status"].split("+")) == acc["narrow"]
    by = lambda name: [row for row in rows if row["kernel"] == name]
    for name in (
        "_decode_split_kernel",
        "_prefill_kernel",
        "_rms_norm_kernel",
        "_silu_and_mul_kernel",
        "_store_kv_kernel",
        "_rotary_kernel",
        "_qk_norm_rope_kernel",
        "_rope_store_kv_kernel",
    ):
        for row in by(name):
            bulk = row["access"]["bulk16"]
            assert row["access"]["bulk16_checked"] and any(bulk.values()), row
            assert {b for widths in bulk.values() for b in widths} == {"128"}, (name, row["mem"])
            assert row["status"] in ("ok", "spills"), row
    for row in by("_decode_split_kernel"):  # K/V tiles by cp.async, 16 bytes; the scores by mma.sync
        assert row["access"]["bulk16"]["cp"] and row["access"]["mma"].get("HMMA", 0) > 0
    assert all(row["access"]["mma"].get("HGMMA", 0) > 0 for row in by("_prefill_kernel"))  # Hopper wgmma

    ptx = run_bench_script(
        "compile_check.py", tmp_path / "compile_ptx.json", "--quick", "--ptx", "--launches", "", drop=drop
    )[1]["rows"]
    for row in ptx:
        if row["kernel"] == "_decode_split_kernel":
            assert row["access"]["source"] == "ptx" and set(row["access"]["bulk16"]["cp"]) == {"128"}, row


def test_access_report_reads_ptx_and_ttgir():
    """The access counter on a hand-written PTX and TTGIR: widths by vector size, cp.async by copy
    size, local memory, mma; 16-bit row traffic told from scalars by the TTGIR's types and, where
    the kernel loops, only the loop's."""
    cc = bench_scripts.load("compile_check")
    ttgir = "\n".join(
        [
            "tt.func public @_decode_split_kernel(%Q: !tt.ptr<bf16>) {",
            "  %q = tt.load %p : tensor<16x64x!tt.ptr<bf16>, #blocked> loc(#loc3)",
            "  %r = scf.for %i = %c0 to %n step %c1 iter_args(%a = %z) -> (tensor<16x64xf32>) : i32 {",
            "    %b = tt.load %bt : tensor<64x!tt.ptr<i32>, #blocked1> loc(#loc4)",
            "    %k = ttg.async_copy_global_to_local %kp, %s mask %m {contiguity = 8 : i32} : "
            "tensor<64x64x!tt.ptr<bf16>, #blocked> -> <64x64xbf16, #shared> loc(#loc6)",
            "    scf.yield %a : tensor<16x64xf32>",
            "  } loc(#loc2)",
            "  tt.return loc(#loc2)",
            "} loc(#loc2)",
            '#loc2 = loc("k.py":1:1)',
            '#loc3 = loc("k.py":10:5)',
            '#loc4 = loc("k.py":12:5)',
            '#loc5 = loc("k.py":13:9)',
            '#loc6 = loc("k"(#loc7))',
            "#loc7 = loc(callsite(#loc5 at #loc4))",
        ]
    )
    assert cc._bulk16_lines(ttgir) == {("k.py", 13)}  # the K tile in the loop, not q, not the block table
    ptx = "\n".join(
        [
            '.file 1 "k.py"',
            ".loc 1 10 5",
            "@%p1 ld.global.v2.b32 { %r1, %r2 }, [ %rd1 + 0 ];",
            ".loc 1 12 5",
            "@%p2 ld.global.b32 { %r3 }, [ %rd2 + 0 ];",
            ".loc 1 13 9",
            "cp.async.cg.shared.global [ %r4 + 0 ], [ %rd3 + 0 ], 0x10, %r5;",
            "cp.async.cg.shared.global [ %r4 + 16 ], [ %rd3 + 16 ], 0x8, %r5;",
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f1}, {%r1}, {%r2}, {%f1};",
            "st.local.b32 [%rd9], %r1;",
            "@%p3 st.global.b16 [ %rd4 + 0 ], { %rs1 };",
        ]
    )
    acc = cc.access_report("_decode_split_kernel", {"ptx": ptx, "ttgir": ttgir}, use_sass=False)
    assert acc["source"] == "ptx" and acc["ld"] == {"64": 1, "32": 1} and acc["st"] == {"16": 1}
    assert acc["cp"] == {"128": 1, "64": 1} and acc["mma"] == {"HMMA": 1} and acc["local"] == 1
    assert acc["bulk16"]["cp"] == {"128": 1, "64": 1} and acc["narrow"]  # one 8-byte copy in the K tile
    assert "ld 64b:1 32b:1 | cp 128b:1 64b:1 | st 16b:1 | mma HMMA:1 | local 1" == cc.access_columns(acc)


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
