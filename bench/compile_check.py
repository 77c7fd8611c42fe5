"""Compile every Triton kernel variant the engine launches on a GPU, for a GPU target, without a GPU.

    python bench/compile_check.py                      # sm_90 (H100), every case below
    python bench/compile_check.py --quick              # one case per kernel (CI smoke)
    python bench/compile_check.py --out compile.json   # the table as JSON too

Each kernel wrapper is called on CPU tensors inside `kernels.launch.as_gpu()` and
`record_variants(run=False)`: the wrappers pick exactly the launch configs (tiles, warps, rows per
program, autotune candidates after pruning) they pick on a GPU, and nothing runs. Each recorded
launch is bound by Triton's own binder for the CUDA backend (the specialisation a GPU launch
gets) and compiled with `triton.compile(..., target=GPUTarget("cuda", arch, 32))`; ptxas then
reports registers and spills. A variant fails when it does not compile, when its shared memory
passes the H100's 227 KB per block, or when registers x threads pass the 64K register file (the
launch would fail with OutOfResources); spills are reported, not failed.

Cases: paged decode and prefill attention at head dims 64 / 128 and GQA groups 1 / 4 / 7, KV store,
RMSNorm, rotary, Qwen3's q/k-norm rotary, both fused with the KV store, and the MLP's silu_and_mul at
the model shapes, PRM scoring, sampling at vocabulary 151,936 (both paths), each in bf16, fp16 and fp32 (the engine's
dtypes; its logits are fp32).
Needs triton with its bundled ptxas (Linux wheels); about 1-3 s per variant on one core.
"""

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SMEM_LIMIT = 232448  # bytes of shared memory one block may opt into on sm_90 (227 KB)
REGFILE = 65536  # 32-bit registers per SM (and per block)
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _cases(quick: bool):
    """(name, thunk) pairs; each thunk calls one wrapper on CPU tensors."""
    from kernels.activation_triton import silu_and_mul_triton
    from kernels.decode_attention_triton import paged_decode_attention_triton
    from kernels.kv_store_triton import store_kv_triton
    from kernels.norm_rope_triton import apply_rotary_triton, qk_norm_rope_triton, rms_norm_triton
    from kernels.prefill_attention_triton import paged_prefill_attention_triton
    from kernels.prm_scoring_triton import prm_step_scores_triton
    from kernels.rope_store_triton import rope_store_kv_triton
    from kernels.sampling_triton import sample_triton

    dtypes = DTYPES[:1] if quick else DTYPES
    combos = [(64, 7)] if quick else [(d, g) for d in (64, 128) for g in (1, 4, 7)]
    page, hkv, blocks, width = 16, 2, 64, 64
    out = []
    for dt in dtypes:
        for D, G in combos:
            kc = torch.zeros(blocks, page, hkv, D, dtype=dt)
            tables = torch.zeros(4, width, dtype=torch.int32)
            lens = torch.full((4,), 512, dtype=torch.int32)

            def decode(kc=kc, tables=tables, lens=lens, D=D, G=G, dt=dt):
                q = torch.zeros(1, hkv * G, D, dtype=dt)  # one row: several splits, the merge kernel too
                paged_decode_attention_triton(q, kc, kc, tables[:1], lens[:1], max_context=512)
                q = torch.zeros(4, hkv * G, D, dtype=dt)
                paged_decode_attention_triton(q, kc, kc, tables, lens)

            def prefill(kc=kc, tables=tables, lens=lens, D=D, G=G, dt=dt):
                q = torch.zeros(64, hkv * G, D, dtype=dt)
                cu = torch.tensor([0, 16, 32, 48, 64], dtype=torch.int32)
                paged_prefill_attention_triton(q, kc, kc, tables, cu, lens, max_seqlen_q=16)

            out += [(f"decode D={D} G={G} {dt}", decode), (f"prefill D={D} G={G} {dt}", prefill)]
        # Qwen2.5-0.5B, -7B, -14B: heads, KV heads, head dim, hidden, MLP intermediate
        shapes = [(14, 2, 64, 896, 4864)]
        shapes += [] if quick else [(28, 4, 128, 3584, 18944), (40, 8, 128, 5120, 13824)]
        for hq, hk, D, H, I in shapes:

            def layer(hq=hq, hk=hk, D=D, H=H, I=I, dt=dt):
                x = torch.zeros(8, H, dtype=dt)
                w = torch.ones(H, dtype=dt)
                rms_norm_triton(x, w, 1e-6)
                rms_norm_triton(x, w, 1e-6, x)
                silu_and_mul_triton(torch.zeros(8, 2 * I, dtype=dt))
                qkv = torch.zeros(8, (hq + 2 * hk) * D, dtype=dt)  # q, k, v as views of one GEMM output
                q, k, v = qkv.split([hq * D, hk * D, hk * D], dim=-1)
                q, k, v = q.view(8, hq, D), k.view(8, hk, D), v.view(8, hk, D)
                cs = torch.zeros(64, D, dtype=torch.float32)
                pos = torch.zeros(8, dtype=torch.int64)
                apply_rotary_triton(q, k, pos, cs)
                qk_norm_rope_triton(q, k, torch.ones(D, dtype=dt), torch.ones(D, dtype=dt), 1e-6, pos, cs)
                cache = torch.zeros(4, 16, hk, D, dtype=dt)
                store_kv_triton(k, v, cache, cache, torch.zeros(8, dtype=torch.int64))
                slots = torch.zeros(8, dtype=torch.int64)
                rope_store_kv_triton(q, k, v, cache, cache, slots, pos, cs)  # the engine's fused form
                rope_store_kv_triton(
                    q, k, v, cache, cache, slots, pos, cs, torch.ones(D, dtype=dt), torch.ones(D, dtype=dt)
                )
                head = torch.zeros(2, H, dtype=dt)
                prm_step_scores_triton(
                    x,
                    torch.zeros(2, dtype=torch.long),
                    head,
                    torch.zeros(2, dtype=dt),
                    torch.zeros(2, dtype=torch.long),
                    1,
                )

            out.append((f"layer H={H} I={I} Hq={hq} Hkv={hk} D={D} {dt}", layer))

    def sampling(V=151936, logits_dtypes=(torch.float32,) if quick else (torch.float32, torch.float16, torch.bfloat16)):
        for dt in logits_dtypes:  # the engine's logits are fp32; the kernel tests and benchmarks pass 16-bit too
            for B in (4, 256):  # split-vocabulary path, then one program per row
                logits = torch.zeros(B, V, dtype=dt)
                f = torch.ones(B)
                z = torch.zeros(B, dtype=torch.int32)
                sample_triton(logits, f, z, f, f * 0, z.long())

    out.append(("sampling V=151936", sampling))
    return out


def _ptxas_report(ptx: str, arch: int) -> dict:
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        r = subprocess.run(
            [
                get_ptxas(arch).path,
                "-v",
                f"--gpu-name={sm_arch_from_capability(arch)}",
                str(src),
                "-o",
                str(src) + ".o",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
    log = r.stderr + r.stdout
    get = lambda pat: int(m.group(1)) if (m := re.search(pat, log)) else 0
    return dict(
        regs=get(r"Used (\d+) registers"),
        spill_stores=get(r"(\d+) bytes spill stores"),
        spill_loads=get(r"(\d+) bytes spill loads"),
        static_smem=get(r"(\d+) bytes smem"),
    )


def compile_launch(kernel, args, kwargs, arch: int) -> list[dict]:
    """Compile one recorded launch (every pruned autotune candidate of an autotuned kernel) for
    cuda:arch; one result dict per binary."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.compiler import compile as triton_compile
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    configs = [None]
    jit = kernel
    if hasattr(kernel, "configs"):  # an autotuner: the candidates its pruning keeps
        nargs = dict(zip(kernel.arg_names, args))
        prune = getattr(kernel, "early_config_prune", None)
        configs = prune(kernel.configs, nargs, **kwargs) if prune else kernel.configs
        jit = kernel.fn
    binder = create_function_from_signature(jit.signature, jit.params, backend)
    results = []
    for cfg in configs:
        kw = dict(kwargs)
        if cfg is not None:
            kw.update({k: v for k, v in cfg.all_kwargs().items() if v is not None})
        kw.update(
            debug=False,
            instrumentation_mode=knobs.compilation.instrumentation_mode,
            fpsan_homomorphic_casts=knobs.compilation.fpsan_homomorphic_casts,
        )
        bound, spec, options = binder(*args, **kw)
        options, signature, constexprs, attrs = jit._pack_args(backend, kw, bound, spec, options)
        tiles = {k: v for k, v in kw.items() if k.startswith("BLOCK") or k in ("num_warps", "num_stages")}
        res = dict(kernel=jit.fn.__name__, config=tiles)
        try:
            t = time.perf_counter()
            k = triton_compile(ASTSource(jit, signature, constexprs, attrs), target=target, options=options.__dict__)
            res["compile_s"] = round(time.perf_counter() - t, 2)
            res["shared"] = k.metadata.shared
            res.update(_ptxas_report(k.asm["ptx"], arch))
            threads = 32 * k.metadata.num_warps
            problems = []
            if res["shared"] + res["static_smem"] > SMEM_LIMIT:
                problems.append(f"shared {res['shared'] + res['static_smem']} B > {SMEM_LIMIT}")
            if res["regs"] * threads > REGFILE:
                problems.append(f"{res['regs']} regs x {threads} threads > {REGFILE}")
            res["status"] = "FAIL: " + "; ".join(problems) if problems else ("spills" if res["spill_stores"] else "ok")
        except Exception as e:  # a compile error is a row of the table
            res["status"] = f"FAIL: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        results.append(res)
    return results


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default 90: H100)")
    p.add_argument("--quick", action="store_true", help="one case per kernel, bf16 only")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    a = p.parse_args()

    from kernels.launch import as_gpu, record_variants, variant_key

    rows, done = [], set()
    t0 = time.perf_counter()
    for name, thunk in _cases(a.quick):
        launches = []
        with as_gpu(), record_variants(run=False, launches=launches):
            thunk()
        for kernel, args, kwargs in launches:
            key = variant_key(kernel, args, kwargs)
            if key in done:
                continue
            done.add(key)
            with as_gpu():  # (an autotuner's pruning asks too)
                results = compile_launch(kernel, args, kwargs, a.arch)
            for res in results:
                res["case"] = name
                rows.append(res)
                cfg = ",".join(f"{k}={v}" for k, v in res["config"].items())
                print(
                    f"[{time.perf_counter() - t0:5.0f}s] {name:34} {res['kernel']:28} {cfg:52} "
                    f"smem {res.get('shared', '-'):>6} regs {res.get('regs', '-'):>3} "
                    f"spill {res.get('spill_stores', '-'):>4} {res['status']}",
                    flush=True,
                )
    failed = [r for r in rows if r["status"].startswith("FAIL")]
    spills = [r for r in rows if r["status"] == "spills"]
    print(f"\n{len(rows)} binaries for sm_{a.arch}: {len(failed)} failed, {len(spills)} spill")
    if a.out:
        Path(a.out).write_text(json.dumps(dict(arch=a.arch, rows=rows), indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
