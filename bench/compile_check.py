"""Compile every Triton kernel variant the engine launches on a GPU, for a GPU target, without a GPU.

    python bench/compile_check.py                      # sm_90 (H100), every case below
    python bench/compile_check.py --quick              # one case per kernel (CI smoke)
    python bench/compile_check.py --out compile.json   # the table as JSON too
    python bench/compile_check.py --ptx                # count accesses in the PTX, not the SASS

Each kernel wrapper is called on CPU tensors inside `kernels.launch.as_gpu()` and
`record_variants(run=False)`: the wrappers pick exactly the launch configs (tiles, warps, rows per
program, autotune candidates after pruning) they pick on a GPU, and nothing runs. Each recorded
launch is bound by Triton's own binder for the CUDA backend (the specialisation a GPU launch
gets) and compiled with `triton.compile(..., target=GPUTarget("cuda", arch, 32))`; ptxas then
reports registers and spills. A variant fails when it does not compile, when its shared memory
passes the H100's 227 KB per block, or when registers x threads pass the 64K register file (the
launch would fail with OutOfResources); spills are reported, not failed. The specialisation is the
one a GPU launch gets: the binder marks a pointer 16-byte aligned from `data_ptr() % 16` (CPU
allocations are 64-byte aligned, CUDA's 512; views keep the same offsets) and an integer from its
value; the JSON's `aligned16` lists the arguments a binary assumes divisible by 16. Registers and
stack come from the binary itself (cuobjdump -res-usage), spills from ptxas rerun with Triton's flags.

Memory-access quality, from each binary's SASS (the bundled nvdisasm with line info; with `--ptx`
or without nvdisasm, the PTX, and the `source` field says which): the `mem` column counts global
loads (`ld`), cp.async copies (`cp`) and stores (`st`) by width in bits, the matrix instructions
(HMMA: mma.sync, HGMMA: Hopper wgmma) and local-memory instructions (LDL/STL); static counts, an
instruction in a loop counts once. The kernels whose bulk traffic is contiguous 16-bit rows
(BULK16_KERNELS: decode and prefill attention's K/V tiles, KV store, RMSNorm, silu_and_mul,
rotary, q/k-norm rotary, rope_store_kv) should move those rows 16 bytes a thread in bf16/fp16; the
rows are told from the scalar loads (sequence lengths, block tables, slots, positions) by source
line, see access_report. A binary whose rows move narrower is "narrow", one with local memory
"local" (both reported, not failed).

Cases: every kernel call bench/gpu_check.py's dry run recorded (bench/gpu_launches.json: the engine's
launches for the tiny models the GPU run checks, head dim 16 in fp32, page size 8, vocabulary 320, one-block
tables), then paged decode and prefill attention at head dims 64 / 128 and GQA groups 1 / 4 / 7, KV store,
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

SMEM_LIMIT = 232448  # bytes of shared memory one block may opt into on sm_90 (227 KB)
REGFILE = 65536  # 32-bit registers per SM (and per block)
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _cases(quick: bool):
    """(name, thunk) pairs; each thunk calls one wrapper on CPU tensors."""
    from bstar.kernels.activation_triton import silu_and_mul_triton
    from bstar.kernels.decode_attention_triton import paged_decode_attention_triton
    from bstar.kernels.kv_store_triton import store_kv_triton
    from bstar.kernels.norm_rope_triton import apply_rotary_triton, qk_norm_rope_triton, rms_norm_triton
    from bstar.kernels.prefill_attention_triton import paged_prefill_attention_triton
    from bstar.kernels.prm_scoring_triton import prm_step_scores_triton
    from bstar.kernels.rope_store_triton import rope_store_kv_triton
    from bstar.kernels.sampling_triton import sample_triton

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
                # a one-block table: its row stride 1 is a specialisation of its own
                paged_decode_attention_triton(q, kc, kc, tables[:, :1].contiguous(), lens.clamp(max=page))

            def prefill(kc=kc, tables=tables, lens=lens, D=D, G=G, dt=dt):
                q = torch.zeros(64, hkv * G, D, dtype=dt)
                cu = torch.tensor([0, 16, 32, 48, 64], dtype=torch.int32)
                paged_prefill_attention_triton(q, kc, kc, tables, cu, lens, max_seqlen_q=16)
                one = tables[:, :1].contiguous()  # a one-block table (row stride 1)
                paged_prefill_attention_triton(q, kc, kc, one, cu, lens.clamp(max=page), max_seqlen_q=16)

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


def _recorded_cases(path: Path):
    """(name, thunk) pairs replaying the kernel calls bench/gpu_check.py recorded (kernels.launch.record_calls):
    what the engine and the check launch, derived rather than listed here, so the two cannot drift apart."""
    from bstar.kernels.launch import replay_call

    if not path.exists():
        return []
    calls = json.loads(path.read_text())
    out = []
    for spec in calls:
        shapes = "x".join(str(n) for n in next((a["shape"] for a in spec["args"] if isinstance(a, dict)), []))
        dt = next((a["tensor"] for a in spec["args"] if isinstance(a, dict)), "")
        out.append((f"recorded {spec['fn'].split(':')[1]} {shapes} {dt}", lambda spec=spec: replay_call(spec)))
    return out


def _ptxas_report(ptx: str, arch: int, fp_fusion: bool = True) -> dict:
    """ptxas -v on the kernel's PTX with the flags Triton's own ptxas call uses (-lineinfo,
    --regAllocOptLevel=2, --fmad=false without FP fusion): without them ptxas allocates registers
    differently (triton 3.9: _combine_thresholds_kernel spills 8 bytes in the real binary, none in
    a plain rerun)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        flags = ["-lineinfo", "--regAllocOptLevel=2"] + ([] if fp_fusion else ["--fmad=false"])
        cmd = [get_ptxas(arch).path, *flags, "-v", f"--gpu-name={sm_arch_from_capability(arch)}", str(src)]
        r = subprocess.run([*cmd, "-o", str(src) + ".o"], capture_output=True, text=True, check=True)
    log = r.stderr + r.stdout
    get = lambda pat: int(m.group(1)) if (m := re.search(pat, log)) else 0
    return dict(
        regs=get(r"Used (\d+) registers"),
        spill_stores=get(r"(\d+) bytes spill stores"),
        spill_loads=get(r"(\d+) bytes spill loads"),
        static_smem=get(r"(\d+) bytes smem"),
        stack=get(r"(\d+) bytes stack frame"),
    )


def _cubin_resources(cubin: bytes) -> dict | None:
    """REG / STACK / LOCAL of the binary Triton built (cuobjdump -res-usage), the truth the ptxas
    rerun must agree with; None without cuobjdump."""
    r = _run_on_cubin("cuobjdump", ["-res-usage"], cubin)
    if r is None:
        return None
    found = dict(re.findall(r"\b(REG|STACK|LOCAL):(\d+)", r.stdout))
    return {k.lower(): int(v) for k, v in found.items()} if r.returncode == 0 and "REG" in found else None


def _run_on_cubin(tool_name: str, args: list[str], cubin: bytes) -> subprocess.CompletedProcess | None:
    """Triton's bundled `tool_name` (cuobjdump, nvdisasm) run on the cubin; None when it is absent."""
    from triton import knobs

    try:
        tool = getattr(knobs.nvidia, tool_name).path
    except Exception:
        return None
    if not tool or not Path(tool).exists():
        return None
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "k.cubin"
        f.write_bytes(cubin)
        return subprocess.run([tool, *args, str(f)], capture_output=True, text=True)


# Kernels whose bulk traffic is contiguous 16-bit rows (head-dim or hidden rows); in bf16/fp16 their
# row loads and stores should be 16 bytes per thread (LDG.E.128 / LDGSTS.E.BYPASS.128 / STG.E.128).
BULK16_KERNELS = {
    "_decode_split_kernel",
    "_prefill_kernel",
    "_store_kv_kernel",
    "_rms_norm_kernel",
    "_silu_and_mul_kernel",
    "_rope_store_kv_kernel",
    "_rotary_kernel",
    "_qk_norm_rope_kernel",
}
_SASS_WIDTH = {"128": 128, "64": 64, "U16": 16, "S16": 16, "U8": 8, "S8": 8}  # else 32 bits
_SASS_CLASS = {"LDG": "ld", "LDGSTS": "cp", "STG": "st"}


def _loc_resolver(ir: str):
    """(file, line) of an MLIR `loc(...)` expression of Triton's IR, resolving `#locN` aliases,
    names (`"x"(#loc)`) and call sites (the callee's line: the `tl.load` inside an inlined helper)."""
    defs = dict(re.findall(r"^(#loc\d*) = loc\((.*)\)\s*$", ir, re.M))

    def resolve(expr: str, depth=0):
        if depth > 50:
            return None
        expr = expr.strip()
        if m := re.match(r'"([^"]+)":(\d+):\d+', expr):
            return m.group(1), int(m.group(2))
        if m := re.match(r"callsite\((#loc\d*) at (#loc\d*)\)", expr):
            return resolve(m.group(1), depth + 1) or resolve(m.group(2), depth + 1)
        if m := re.match(r'"[^"]*"\((#loc\d*)\)', expr):
            return resolve(m.group(1), depth + 1)
        if m := re.match(r"fused(?:<[^>]*>)?\[(#loc\d*)", expr):
            return resolve(m.group(1), depth + 1)
        if expr in defs:
            return resolve(defs[expr], depth + 1)
        return None

    return resolve


_MEM16 = re.compile(
    r"(?:tt\.load|tt\.store|ttg\.async_copy_global_to_local)\b[^\n]*?: tensor<[^\n]*?!tt\.ptr<(?:bf16|f16)>"
    r"[^\n]*?loc\((#loc\d*)\)"
)


def _bulk16_lines(ttgir: str) -> set:
    """Source lines (file, line) of the kernel's 16-bit row traffic, from its TTGIR: the global
    loads / stores / async copies of bf16 or fp16 tensors (block-table, length, slot and position
    loads are integers, cos/sin tables fp32, so they never count), and of those only the ones
    inside an `scf.for` when the kernel has any there (attention: the K/V tiles of the key loop,
    not the one query tile loaded and one output tile stored per program)."""
    resolve = _loc_resolver(ttgir)
    in_loop, outside = set(), set()
    stack = []  # the regions open at this line: True for an scf.for body
    for line in ttgir.splitlines():
        if m := _MEM16.search(line):
            if (where := resolve(m.group(1))) is not None:
                (in_loop if any(stack) else outside).add(where)
        code = re.sub(r'"[^"]*"', "", line)
        for _ in range(code.count("}"), code.count("{")):  # attribute dicts open and close on one line
            stack.append("scf.for" in code)
        for _ in range(code.count("{"), code.count("}")):
            if stack:
                stack.pop()
    return in_loop or outside


def _sass_instructions(cubin: bytes):
    """[(mnemonic, (file, line) or None)] of the cubin, via the bundled nvdisasm with line info;
    None when nvdisasm is absent or fails."""
    r = _run_on_cubin("nvdisasm", ["-g", "-c"], cubin)
    if r is None or r.returncode:
        return None
    out, where = [], None
    for line in r.stdout.splitlines():
        if m := re.match(r'\s*//## File "([^"]+)", line (\d+)', line):
            where = (m.group(1), int(m.group(2)))
        elif m := re.match(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line):
            out.append((m.group(1), where))
    return out


def _ptx_instructions(ptx: str):
    """The PTX fallback: the same classes as SASS names (LDG/LDGSTS/STG with their width,
    LDL/STL, HMMA for mma.sync, HGMMA for wgmma), with the `.loc` line of each."""
    files = dict(re.findall(r'^\s*\.file\s+(\d+)\s+"([^"]+)"', ptx, re.M))
    out, where = [], None
    for line in ptx.splitlines():
        if m := re.match(r"\s*\.loc\s+(\d+)\s+(\d+)", line):
            where = (files.get(m.group(1), "?"), int(m.group(2)))
            continue
        body = re.sub(r"^\s*@!?%\w+\s+", "", line).strip()
        if m := re.match(r"(ld|st)\.(global|local)((?:\.[\w:]+)*)", body):
            if m.group(2) == "local":
                out.append(("LDL" if m.group(1) == "ld" else "STL", where))
                continue
            mods = m.group(3).split(".")
            vec = next((int(t[1:]) for t in mods if re.fullmatch(r"v\d", t)), 1)
            bits = next((int(t[1:]) for t in mods if re.fullmatch(r"[bufs]\d+", t)), 32)
            w = {128: ".128", 64: ".64", 16: ".U16", 8: ".U8"}.get(vec * bits, "")
            out.append(("LDG.E" + w if m.group(1) == "ld" else "STG.E" + w, where))
        elif m := re.match(r"cp\.async\.\w+\.shared\.global\s+\[[^\]]*\],\s*\[[^\]]*\],\s*(\w+)", body):
            w = {16: ".128", 8: ".64", 4: ""}.get(int(m.group(1), 0), "")
            out.append(("LDGSTS.E" + w, where))
        elif body.startswith("mma.sync"):
            out.append(("HMMA", where))
        elif body.startswith("wgmma.mma_async"):
            out.append(("HGMMA", where))
    return out


def access_report(kernel_name: str, asm: dict, use_sass: bool = True) -> dict:
    """Memory-access quality of one binary, read from its SASS (the PTX when nvdisasm is absent
    or use_sass is False; `source` says which).

    Static instruction counts (a load in a loop counts once): global loads `ld`, cp.async copies
    `cp` and stores `st` by width in bits, local-memory instructions `local` (LDL/STL: spills or an
    array placed on the stack; the PTX shows only the arrays, ptxas's spills are in `spill_stores`),
    matrix instructions `mma` (HMMA: mma.sync; HGMMA: Hopper wgmma).

    Bulk versus scalar traffic is told apart by source line, not by width: the TTGIR says which
    `tl.load` / `tl.store` lines move tensors of bf16/fp16 (the row traffic; the scalar loads of
    sequence lengths, block tables, slots and positions are integers, cos/sin tables fp32), and the
    line info of each SASS instruction says which line it came from. `bulk16` counts the
    instructions at those lines by width; for the kernels of BULK16_KERNELS a bulk instruction
    narrower than 128 bits makes the binary "narrow" (reported, not failed: a tile of fewer than
    8 elements per thread cannot be loaded 16 bytes at a time, whatever the alignment)."""
    instrs = _sass_instructions(asm["cubin"]) if use_sass and "cubin" in asm else None
    source = "sass"
    if instrs is None:
        instrs, source = _ptx_instructions(asm["ptx"]), "ptx"
    bulk_lines = _bulk16_lines(asm.get("ttgir", ""))
    counts = {"ld": {}, "cp": {}, "st": {}}
    bulk = {"ld": {}, "cp": {}, "st": {}}
    mma, local = {}, 0
    for op, where in instrs:
        parts = op.split(".")
        base = parts[0]
        if base in _SASS_CLASS:
            cls = _SASS_CLASS[base]
            bits = next((_SASS_WIDTH[t] for t in parts[1:] if t in _SASS_WIDTH), 32)
            counts[cls][bits] = counts[cls].get(bits, 0) + 1
            if where in bulk_lines:
                bulk[cls][bits] = bulk[cls].get(bits, 0) + 1
        elif base in ("LDL", "STL"):
            local += 1
        elif base in ("HMMA", "HGMMA"):
            mma[base] = mma.get(base, 0) + 1
    narrow = {
        cls: {b: n for b, n in widths.items() if b < 128}
        for cls, widths in bulk.items()
        if any(b < 128 for b in widths)
    }
    checked = kernel_name in BULK16_KERNELS and bool(bulk_lines)
    note = ""
    if checked and not any(bulk.values()):
        note = "no SASS instruction at the 16-bit load/store lines"
    elif checked and narrow:
        note = "bulk 16-bit traffic narrower than 16 B: " + " ".join(
            f"{cls} " + " ".join(f"{b}b:{n}" for b, n in sorted(w.items(), reverse=True)) for cls, w in narrow.items()
        )
    return dict(
        source=source,
        ld=_str_keys(counts["ld"]),
        cp=_str_keys(counts["cp"]),
        st=_str_keys(counts["st"]),
        local=local,
        mma=mma,
        bulk16={cls: _str_keys(w) for cls, w in bulk.items()},
        bulk16_checked=checked,
        narrow=bool(note),
        note=note,
    )


def _str_keys(widths: dict) -> dict:
    return {str(b): n for b, n in sorted(widths.items(), reverse=True)}


def access_columns(acc: dict) -> str:
    """The compact table cell: `ld 128b:1 32b:5 | cp 128b:8 | st 128b:2 | mma HMMA:8 | local 0`."""
    cell = lambda w: " ".join(f"{b}b:{n}" for b, n in w.items()) or "-"
    mma = " ".join(f"{k}:{n}" for k, n in acc["mma"].items()) or "-"
    return f"ld {cell(acc['ld'])} | cp {cell(acc['cp'])} | st {cell(acc['st'])} | mma {mma} | local {acc['local']}"


def compile_launch(kernel, args, kwargs, arch: int, use_sass: bool = True) -> list[dict]:
    """Compile one recorded launch (every pruned autotune candidate of an autotuned kernel) for
    cuda:arch; one result dict per binary, with its access report (access_report)."""
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
        kw["debug"] = False
        for knob in ("instrumentation_mode", "fpsan_homomorphic_casts"):  # what JITFunction.run adds (3.6: the first)
            if hasattr(knobs.compilation, knob):
                kw[knob] = getattr(knobs.compilation, knob)
        bound, spec, options = binder(*args, **kw)
        options, signature, constexprs, attrs = jit._pack_args(backend, kw, bound, spec, options)
        tiles = {k: v for k, v in kw.items() if k.startswith("BLOCK") or k in ("num_warps", "num_stages")}
        res = dict(kernel=jit.fn.__name__, config=tiles, aligned16=_aligned16(jit, attrs))
        try:
            t = time.perf_counter()
            k = triton_compile(ASTSource(jit, signature, constexprs, attrs), target=target, options=options.__dict__)
            res["compile_s"] = round(time.perf_counter() - t, 2)
            res["shared"] = k.metadata.shared
            res.update(_ptxas_report(k.asm["ptx"], arch, options.enable_fp_fusion))
            cubin_res = _cubin_resources(k.asm["cubin"])
            if cubin_res is not None:  # the binary's own numbers win; a mismatch is shown
                if (cubin_res["reg"], cubin_res["stack"]) != (res["regs"], res["stack"]):
                    res["ptxas_rerun"] = dict(regs=res["regs"], stack=res["stack"])
                res["regs"], res["stack"] = cubin_res["reg"], cubin_res["stack"]
            threads = 32 * k.metadata.num_warps
            problems = []
            if res["shared"] + res["static_smem"] > SMEM_LIMIT:
                problems.append(f"shared {res['shared'] + res['static_smem']} B > {SMEM_LIMIT}")
            if res["regs"] * threads > REGFILE:
                problems.append(f"{res['regs']} regs x {threads} threads > {REGFILE}")
            acc = access_report(res["kernel"], k.asm, use_sass)
            res["access"] = acc
            res["mem"] = access_columns(acc)
            flags = [
                f
                for f, on in (("spills", res["spill_stores"]), ("local", acc["local"]), ("narrow", acc["narrow"]))
                if on
            ]
            res["status"] = "FAIL: " + "; ".join(problems) if problems else ("+".join(flags) or "ok")
        except Exception as e:  # a compile error is a row of the table
            res["status"] = f"FAIL: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        results.append(res)
    return results


def _aligned16(jit, attrs) -> list[str]:
    """The arguments this binary assumes divisible by 16 (a pointer 16-byte aligned, an integer a
    multiple of 16): with the head dim a constexpr, what lets Triton vectorise a row load."""
    names = [p.name for p in jit.params]
    return [
        names[path[0]]
        for path, kv in attrs.items()
        if len(path) == 1 and path[0] < len(names) and ["tt.divisibility", 16] in [list(x) for x in kv]
    ]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default 90: H100)")
    p.add_argument("--quick", action="store_true", help="one case per kernel, bf16 only")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    p.add_argument("--ptx", action="store_true", help="count accesses in the PTX, not the SASS (as without nvdisasm)")
    p.add_argument(
        "--launches",
        default=str(REPO / "bench" / "gpu_launches.json"),
        help="kernel calls recorded by `gpu_check.py --dry-run` to compile too ('' for none)",
    )
    a = p.parse_args()

    from bstar.kernels.launch import as_gpu, record_variants, variant_key

    rows, done = [], set()
    t0 = time.perf_counter()
    recorded = _recorded_cases(Path(a.launches)) if a.launches else []
    for name, thunk in _cases(a.quick) + recorded:
        launches = []
        with as_gpu(), record_variants(run=False, launches=launches):
            thunk()
        for kernel, args, kwargs in launches:
            key = variant_key(kernel, args, kwargs)
            if key in done:
                continue
            done.add(key)
            with as_gpu():  # (an autotuner's pruning asks too)
                results = compile_launch(kernel, args, kwargs, a.arch, use_sass=not a.ptx)
            for res in results:
                res["case"] = name
                rows.append(res)
                cfg = ",".join(f"{k}={v}" for k, v in res["config"].items())
                print(
                    f"[{time.perf_counter() - t0:5.0f}s] {name:34} {res['kernel']:28} {cfg:52} "
                    f"smem {res.get('shared', '-'):>6} regs {res.get('regs', '-'):>3} "
                    f"spill {res.get('spill_stores', '-'):>4} {res.get('mem', '-'):64} {res['status']}"
                    + (f"  ({res['access']['note']})" if res.get("access", {}).get("note") else ""),
                    flush=True,
                )
    failed = [r for r in rows if r["status"].startswith("FAIL")]
    flagged = lambda flag: [r for r in rows if flag in r["status"].split("+")]
    spills, local, narrow = flagged("spills"), flagged("local"), flagged("narrow")
    checked = [r for r in rows if r.get("access", {}).get("bulk16_checked")]
    source = {r["access"]["source"] for r in rows if "access" in r}
    print(
        f"\n{len(rows)} binaries for sm_{a.arch}: {len(failed)} failed, {len(spills)} spill, "
        f"{len(local)} use local memory; 16-bit row traffic ({'/'.join(sorted(source))}): "
        f"{len(checked) - len(narrow)} of {len(checked)} binaries 16 bytes wide, {len(narrow)} narrow"
        + (f" ({', '.join(sorted({r['kernel'] for r in narrow}))})" if narrow else "")
    )
    if a.out:
        Path(a.out).write_text(json.dumps(dict(arch=a.arch, rows=rows), indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
