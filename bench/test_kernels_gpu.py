"""GPU benchmarks of the Triton kernels, each against a real peer in the same run.

* decode: achieved bandwidth (K/V bytes read / time) of paged_decode_attention_triton against the
  device's measured copy bandwidth, batch 1..256 x context 512..32k (Llama-3-8B layer shape:
  32 query heads, 8 KV heads, head dim 128, bf16, engine page size 16); and the same kernel
  against flash-attn `flash_attn_with_kvcache` with a `block_table` (page 256, its minimum, same
  cache contents for both), or torch SDPA on a dense copy of the cache when flash-attn is absent;
* prefill: paged_prefill_attention_triton against flash-attn `flash_attn_varlen_func`, or torch
  SDPA (causal, GQA) when flash-attn is absent;
* silu_and_mul: silu_and_mul_triton against torch's `F.silu(gate) * up` (two kernels and a
  temporary) on the gate_up output of Qwen2.5-0.5B (intermediate 4864, bf16), at a decode batch
  and a prefill chunk, with the achieved bandwidth of each;
* rope_store_kv: the fused rotary + KV store against the two kernels it replaces (apply_rotary_triton
  then store_kv_triton) on Qwen2.5-0.5B's attention shape (14 query heads, 2 KV heads, head dim 64,
  bf16) at a decode batch and a prefill chunk, after checking both write the same q and cache;
* sampling: sample_triton against torch's own sampling (softmax + torch.multinomial; top-k by
  torch.topk and top-p by sort + cumsum where asked, as vLLM's torch fallback does), vocabulary
  151936, after checking that both draw from the same distribution.

Times are device times from bstar/testing/gpu_timing.py (CUDA graph replays, inputs rotated past L2, ours and
the peer by the same method; `timing` in extra_info says which); pytest-benchmark's own figures are
host wall times of one synchronised call.

Run: pytest bench/test_kernels_gpu.py --benchmark-only -s   (skips without CUDA)
"""

import functools
import math

import pytest
import torch
import triton

from bstar.testing.gpu_timing import copy_bandwidth, device_time, device_times, l2_bytes, rotation_count

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU kernel benchmarks need CUDA")

HQ, HKV, D, PAGE, DTYPE = 32, 8, 128, 16, torch.bfloat16
MAX_KV_BYTES = 24 * 2**30  # skip shapes whose K+V would not leave room for a peer's copy

try:
    from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache
except Exception:  # optional GPU extra (absent, or built for another torch); SDPA is the peer without it
    flash_attn_varlen_func = flash_attn_with_kvcache = None
PEER = "flash-attn" if flash_attn_with_kvcache is not None else "torch-sdpa"


def synced(fn):
    """fn, then a device synchronisation: what pytest-benchmark times must include the kernels, not
    only their (asynchronous) launch."""

    def run(*args, **kwargs):
        out = fn(*args, **kwargs)
        torch.cuda.synchronize()
        return out

    return run


def input_sets(nbytes: int) -> int:
    """How many copies of a benchmark's inputs (of nbytes) to rotate among so that none is timed from
    L2 (bstar/testing/gpu_timing.py)."""
    return rotation_count(nbytes, l2_bytes("cuda"))


def paged_cache(batch, context, page, gen, sets=1):
    """Random K/V cache with shuffled blocks, room for `sets` copies of the batch's context:
    (k, v, block_tables [sets, batch, blocks per sequence], seq_lens)."""
    per_seq = math.ceil(context / page)
    num_blocks = sets * batch * per_seq
    k = torch.randn(num_blocks, page, HKV, D, device="cuda", dtype=DTYPE, generator=gen)
    v = torch.randn(num_blocks, page, HKV, D, device="cuda", dtype=DTYPE, generator=gen)
    tables = torch.randperm(num_blocks, device="cuda", generator=gen).view(sets, batch, per_seq).int()
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    return k, v, tables, seq_lens


def dense_from_paged(cache, tables, context):
    """[B, Hkv, L, D] contiguous copy of each sequence's tokens (for the SDPA / varlen peers)."""
    B = tables.shape[0]
    return cache[tables.long()].view(B, -1, HKV, D)[:, :context].transpose(1, 2).contiguous()


def kv_bytes(batch, context):
    return 2 * batch * context * HKV * D * torch.finfo(DTYPE).bits // 8


@pytest.mark.parametrize("context", [512, 2048, 8192, 32768])
@pytest.mark.parametrize("batch", [1, 8, 32, 64, 256])
def test_decode_bandwidth(benchmark, batch, context):
    from bstar.kernels.decode_attention_triton import paged_decode_attention_triton

    nbytes = kv_bytes(batch, context)
    if nbytes > MAX_KV_BYTES:
        pytest.skip(f"K+V of {nbytes / 2**30:.0f} GiB")
    gen = torch.Generator(device="cuda").manual_seed(0)
    k, v, tables, seq_lens = paged_cache(batch, context, PAGE, gen, sets=input_sets(nbytes))
    q = torch.randn(batch, HQ, D, device="cuda", dtype=DTYPE, generator=gen)
    runs = [functools.partial(paged_decode_attention_triton, q, k, v, t, seq_lens) for t in tables]
    timing = device_time(runs)
    t = timing.seconds
    benchmark.pedantic(synced(runs[0]), rounds=5, iterations=3, warmup_rounds=1)
    achieved, peak = nbytes / t, copy_bandwidth()
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name(),
        kv_gib=round(nbytes / 2**30, 3),
        achieved_gbps=round(achieved / 1e9, 1),
        copy_gbps=round(peak / 1e9, 1),
        fraction_of_copy=round(achieved / peak, 3),
        us=round(t * 1e6, 1),
        timing=timing.note(),
        input_sets=len(tables),
    )
    print(
        f"\ndecode B={batch} ctx={context}: {t * 1e6:.1f} us, {achieved / 1e9:.0f} GB/s = "
        f"{achieved / peak:.0%} of copy bandwidth ({peak / 1e9:.0f} GB/s); {timing.note()}, {len(tables)} set(s)"
    )


@pytest.mark.parametrize("context", [2048, 16384])
@pytest.mark.parametrize("batch", [1, 64])
def test_decode_vs_peer(benchmark, batch, context):
    from bstar.kernels.decode_attention_triton import paged_decode_attention_triton

    gen = torch.Generator(device="cuda").manual_seed(1)
    page = 256 if PEER == "flash-attn" else PAGE  # flash-attn's paged KV needs pages of 256
    k, v, tables, seq_lens = paged_cache(batch, context, page, gen, sets=input_sets(kv_bytes(batch, context)))
    q = torch.randn(batch, HQ, D, device="cuda", dtype=DTYPE, generator=gen)
    ours = [functools.partial(paged_decode_attention_triton, q, k, v, t, seq_lens) for t in tables]
    if PEER == "flash-attn":

        def paged_peer(t):
            return flash_attn_with_kvcache(q[:, None], k, v, cache_seqlens=seq_lens, block_table=t).squeeze(1)

        peers = [functools.partial(paged_peer, t) for t in tables]
    else:

        def dense_peer(kd, vd):
            return torch.nn.functional.scaled_dot_product_attention(q[:, :, None], kd, vd, enable_gqa=True)[:, :, 0]

        dense = [(dense_from_paged(k, t, context), dense_from_paged(v, t, context)) for t in tables]
        peers = [functools.partial(dense_peer, kd, vd) for kd, vd in dense]

    torch.testing.assert_close(ours[0]().float(), peers[0]().float(), atol=2e-2, rtol=2e-2)
    times = device_times({"ours": ours, "peer": peers})
    t_ours, t_peer = times["ours"].seconds, times["peer"].seconds
    benchmark.pedantic(synced(ours[0]), rounds=5, iterations=3, warmup_rounds=1)
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name(),
        peer=PEER,
        page=page,
        ours_us=round(t_ours * 1e6, 1),
        peer_us=round(t_peer * 1e6, 1),
        speedup=round(t_peer / t_ours, 2),
        timing=times["ours"].note(),
        input_sets=len(tables),
    )
    print(
        f"\ndecode B={batch} ctx={context} page={page}: ours {t_ours * 1e6:.1f} us, {PEER} "
        f"{t_peer * 1e6:.1f} us, ratio {t_peer / t_ours:.2f}x; {times['ours'].note()}, {len(tables)} set(s)"
    )


@pytest.mark.parametrize("batch,new,prefix", [(4, 2048, 0), (16, 512, 0), (8, 512, 1536)])
def test_prefill_vs_peer(benchmark, batch, new, prefix):
    """Packed prefill of `batch` sequences of `new` tokens each after `prefix` cached tokens."""
    from bstar.kernels.prefill_attention_triton import paged_prefill_attention_triton

    gen = torch.Generator(device="cuda").manual_seed(2)
    context = prefix + new
    k, v, tables, seq_lens = paged_cache(batch, context, PAGE, gen)
    tables = tables[0]  # one input set: prefill is bound by arithmetic, where L2 residence barely counts
    q = torch.randn(batch * new, HQ, D, device="cuda", dtype=DTYPE, generator=gen)
    cu_q = torch.arange(0, batch * new + 1, new, dtype=torch.int32, device="cuda")
    ours = functools.partial(paged_prefill_attention_triton, q, k, v, tables, cu_q, seq_lens)
    kd, vd = dense_from_paged(k, tables, context), dense_from_paged(v, tables, context)  # [B, Hkv, L, D]
    if PEER == "flash-attn":
        kp = kd.transpose(1, 2).reshape(batch * context, HKV, D)
        vp = vd.transpose(1, 2).reshape(batch * context, HKV, D)
        cu_k = torch.arange(0, batch * context + 1, context, dtype=torch.int32, device="cuda")

        def peer():  # causal with seqlen_k > seqlen_q aligns to the bottom right, like ours
            return flash_attn_varlen_func(q, kp, vp, cu_q, cu_k, new, context, causal=True)
    else:
        qd = q.view(batch, new, HQ, D).transpose(1, 2)
        qpos = torch.arange(prefix, context, device="cuda")
        mask = None if prefix == 0 else torch.arange(context, device="cuda")[None, :] <= qpos[:, None]

        def peer():
            o = torch.nn.functional.scaled_dot_product_attention(
                qd, kd, vd, attn_mask=mask, is_causal=mask is None, enable_gqa=True
            )
            return o.transpose(1, 2).reshape(batch * new, HQ, D)

    torch.testing.assert_close(ours().float(), peer().float(), atol=2e-2, rtol=2e-2)
    times = device_times({"ours": [ours], "peer": [peer]})
    t_ours, t_peer = times["ours"].seconds, times["peer"].seconds
    benchmark.pedantic(synced(ours), rounds=5, iterations=3, warmup_rounds=1)
    flops = 4 * batch * HQ * D * sum(prefix + i + 1 for i in range(new))  # causal QK^T and PV
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name(),
        peer=PEER,
        ours_us=round(t_ours * 1e6, 1),
        peer_us=round(t_peer * 1e6, 1),
        speedup=round(t_peer / t_ours, 2),
        ours_tflops=round(flops / t_ours / 1e12, 1),
        timing=times["ours"].note(),
    )
    print(
        f"\nprefill B={batch} new={new} prefix={prefix}: ours {t_ours * 1e6:.0f} us "
        f"({flops / t_ours / 1e12:.0f} TFLOP/s), {PEER} {t_peer * 1e6:.0f} us, ratio {t_peer / t_ours:.2f}x; "
        f"{times['ours'].note()}"
    )


@pytest.mark.parametrize("tokens", [64, 8192])
def test_silu_and_mul_vs_torch(benchmark, tokens):
    """The MLP activation on [tokens, 2 * 4864] bf16: ours (one kernel) against F.silu(gate) * up."""
    import torch.nn.functional as F

    from bstar.kernels.activation import silu_and_mul_ref
    from bstar.kernels.activation_triton import silu_and_mul_triton

    I = 4864
    gen = torch.Generator(device="cuda").manual_seed(4)
    nbytes = 3 * tokens * I * torch.finfo(DTYPE).bits // 8  # gate and up read, the product written
    xs = [torch.randn(tokens, 2 * I, device="cuda", dtype=DTYPE, generator=gen) * 3 for _ in range(input_sets(nbytes))]

    def peer(x):
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up

    x = xs[0]
    got, ref = silu_and_mul_triton(x), silu_and_mul_ref(x)
    same = (got == ref).float().mean().item()
    # the reference's roundings: bit-equal but where an ulp of float32 exp tips a bf16 rounding
    assert same > 0.999, f"only {same:.4%} of outputs equal the reference"
    torch.testing.assert_close(got, ref, atol=0, rtol=torch.finfo(DTYPE).eps)
    times = device_times(
        {
            "ours": [functools.partial(silu_and_mul_triton, x) for x in xs],
            "peer": [functools.partial(peer, x) for x in xs],
        }
    )
    t_ours, t_peer = times["ours"].seconds, times["peer"].seconds
    benchmark.pedantic(synced(silu_and_mul_triton), args=(x,), rounds=5, iterations=10, warmup_rounds=1)
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name(),
        peer="torch F.silu(gate) * up",
        ours_us=round(t_ours * 1e6, 1),
        peer_us=round(t_peer * 1e6, 1),
        speedup=round(t_peer / t_ours, 2),
        ours_gbps=round(nbytes / t_ours / 1e9, 1),
        equal_to_reference=round(same, 6),
        timing=times["ours"].note(),
        input_sets=len(xs),
    )
    print(
        f"\nsilu_and_mul T={tokens} I={I}: ours {t_ours * 1e6:.1f} us ({nbytes / t_ours / 1e9:.0f} GB/s), "
        f"torch {t_peer * 1e6:.1f} us, ratio {t_peer / t_ours:.2f}x, {same:.4%} bit-equal; "
        f"{times['ours'].note()}, {len(xs)} set(s)"
    )


ROPE_SHAPE = dict(hq=14, hkv=2, d=64, page=16)  # Qwen2.5-0.5B's attention


def rope_inputs(tokens, seed):
    """Inputs of rope_store_kv for [tokens] rows at ROPE_SHAPE, bf16: (input sets of (q, k, v), each
    the engine's strided views of one qkv GEMM output; slots; positions; cos_sin; cache blocks;
    bytes moved per call: q, k, v read, q, k, v written)."""
    hq, hkv, d, page = ROPE_SHAPE.values()
    gen = torch.Generator(device="cuda").manual_seed(seed)
    nbytes = 2 * tokens * (hq + 2 * hkv) * d * torch.finfo(DTYPE).bits // 8
    qkvs = []
    for _ in range(input_sets(nbytes)):
        qkv = torch.randn(tokens, (hq + 2 * hkv) * d, device="cuda", dtype=DTYPE, generator=gen)
        q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
        qkvs.append((q.view(tokens, hq, d), k.view(tokens, hkv, d), v.view(tokens, hkv, d)))
    blocks = max(1, 2 * tokens // page)
    slots = torch.randperm(blocks * page, device="cuda", generator=gen)[:tokens]
    pos = torch.randint(0, 32768, (tokens,), device="cuda", generator=gen)
    theta = torch.arange(32768, device="cuda")[:, None] * 1e6 ** (-torch.arange(0, d, 2, device="cuda") / d)[None]
    cos_sin = torch.cat([theta.cos(), theta.sin()], -1).float()
    return qkvs, slots, pos, cos_sin, blocks, nbytes


def rope_caches(n, blocks):
    hq, hkv, d, page = ROPE_SHAPE.values()
    return [torch.zeros(2, blocks, page, hkv, d, device="cuda", dtype=DTYPE) for _ in range(n)]


@pytest.mark.parametrize("tokens", [64, 8192])
def test_rope_store_kv_vs_two_kernels(benchmark, tokens):
    """Rotary + K/V store of [tokens] rows of a fused qkv output (Qwen2.5-0.5B, bf16): ours (one
    kernel) against apply_rotary_triton then store_kv_triton (the rotated k written and read back)."""
    from bstar.kernels.kv_store_triton import store_kv_triton
    from bstar.kernels.norm_rope_triton import apply_rotary_triton
    from bstar.kernels.rope_store_triton import rope_store_kv_triton

    qkvs, slots, pos, cos_sin, blocks, nbytes = rope_inputs(tokens, 5)
    caches = rope_caches(2, blocks)

    def ours(q, k, v):
        return rope_store_kv_triton(q, k, v, caches[0][0], caches[0][1], slots, pos, cos_sin)

    def peer(q, k, v):
        qr, kr = apply_rotary_triton(q, k, pos, cos_sin)
        store_kv_triton(kr, v, caches[1][0], caches[1][1], slots)
        return qr

    same = torch.equal(ours(*qkvs[0]), peer(*qkvs[0])) and torch.equal(caches[0], caches[1])
    assert same, "fused and two-kernel results differ"
    times = device_times(
        {"ours": [functools.partial(ours, *t) for t in qkvs], "peer": [functools.partial(peer, *t) for t in qkvs]}
    )
    t_ours, t_peer = times["ours"].seconds, times["peer"].seconds
    benchmark.pedantic(synced(ours), args=qkvs[0], rounds=5, iterations=10, warmup_rounds=1)
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name(),
        peer="apply_rotary_triton + store_kv_triton",
        ours_us=round(t_ours * 1e6, 1),
        peer_us=round(t_peer * 1e6, 1),
        speedup=round(t_peer / t_ours, 2),
        ours_gbps=round(nbytes / t_ours / 1e9, 1),
        timing=times["ours"].note(),
        input_sets=len(qkvs),
    )
    print(
        f"\nrope_store_kv T={tokens}: ours {t_ours * 1e6:.1f} us ({nbytes / t_ours / 1e9:.0f} GB/s), "
        f"two kernels {t_peer * 1e6:.1f} us, ratio {t_peer / t_ours:.2f}x; {times['ours'].note()}, {len(qkvs)} set(s)"
    )


@pytest.mark.parametrize("tokens", [1, 64, 256, 8192])
def test_rope_store_kv_token_tiles_vs_one_token(benchmark, tokens):
    """rope_store_kv's launch (kernels.norm_rope_triton.token_tiles: several tokens a program, few
    warps, 16-byte accesses; 0.5B: 4 tokens, 1 warp) against one token a program over 4 warps (the
    launch before 2026-11-27: 2-8-byte accesses, but T programs): at decode batches (T = 1..256)
    parallelism may matter more than access width; only a GPU can say."""
    from bstar.kernels.norm_rope_triton import token_tiles
    from bstar.kernels.rope_store_triton import rope_store_kv_triton

    hq, hkv, d, _ = ROPE_SHAPE.values()
    qkvs, slots, pos, cos_sin, blocks, nbytes = rope_inputs(tokens, 6)
    caches = rope_caches(2, blocks)
    tiles = {"token_tiles": token_tiles(qkvs[0][1], hq, hkv, d // 2), "one_token": (1, triton.next_power_of_2(hq), 4)}

    def run(name, i, q, k, v):
        return rope_store_kv_triton(q, k, v, caches[i][0], caches[i][1], slots, pos, cos_sin, tiles=tiles[name])

    same = torch.equal(run("token_tiles", 0, *qkvs[0]), run("one_token", 1, *qkvs[0]))
    assert same and torch.equal(caches[0], caches[1]), "the two launches write different values"
    times = device_times({name: [functools.partial(run, name, i, *t) for t in qkvs] for i, name in enumerate(tiles)})
    t_tiles, t_one = times["token_tiles"].seconds, times["one_token"].seconds
    benchmark.pedantic(synced(run), args=("token_tiles", 0, *qkvs[0]), rounds=5, iterations=10, warmup_rounds=1)
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name(),
        peer="one token a program, 4 warps",
        tiles=tiles["token_tiles"],
        ours_us=round(t_tiles * 1e6, 1),
        peer_us=round(t_one * 1e6, 1),
        speedup=round(t_one / t_tiles, 2),
        timing=times["token_tiles"].note(),
    )
    print(
        f"\nrope_store_kv T={tokens}: token_tiles {tiles['token_tiles']} {t_tiles * 1e6:.1f} us "
        f"({nbytes / t_tiles / 1e9:.0f} GB/s), one token a program {t_one * 1e6:.1f} us, ratio {t_one / t_tiles:.2f}x; "
        f"{times['token_tiles'].note()}"
    )


def torch_sample(logits, temperature, top_k, top_p):
    """The peer: filters in torch, then torch.multinomial over the softmax (one k/p for all rows)."""
    x = logits.float() / temperature[:, None]
    if top_k:
        kth = torch.topk(x, top_k, dim=-1).values[:, -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p < 1:
        sx, order = torch.sort(x, dim=-1, descending=True)
        p = torch.softmax(sx, -1)
        drop = (torch.cumsum(p, -1) - p) >= top_p
        x = x.scatter(1, order, sx.masked_fill(drop, float("-inf")))
    return torch.multinomial(torch.softmax(x, -1), 1)[:, 0]


FILTERS = {"plain": (0, 1.0), "top_p": (0, 0.9), "top_k_top_p": (50, 0.9)}


@pytest.mark.parametrize("filters", list(FILTERS))
@pytest.mark.parametrize("batch", [1, 16, 64, 256])
def test_sampling_vs_torch(benchmark, batch, filters):
    """Fused sampling against torch.multinomial over the softmax on Qwen-sized logits."""
    from scipy import stats

    from bstar.kernels.sampling_triton import sample_triton

    V = 151936
    k, p = FILTERS[filters]
    gen = torch.Generator(device="cuda").manual_seed(3)
    # Same distribution: one row's logits repeated over 4096 rows, drawn by both, two-sample chi-square;
    # ours by both paths (one program per row, and split over the vocabulary as a small batch draws).
    row = torch.randn(V, device="cuda", generator=gen) * 4
    many = row.expand(4096, V).contiguous()
    temp4k = torch.full((4096,), 0.8, device="cuda")
    filters4k = (
        temp4k,
        torch.full((4096,), k, dtype=torch.int32, device="cuda"),
        torch.full((4096,), p, device="cuda"),
        torch.zeros(4096, device="cuda"),
        torch.arange(4096, device="cuda"),
    )
    peer_tok = torch_sample(many, temp4k, k, p)
    top = torch.topk(row, 24).indices
    pvalues = {}
    for split in (False, True):
        ours_tok, _ = sample_triton(many, *filters4k, split=split)
        table = [[int((t == i).sum()) for i in top] + [int((~torch.isin(t, top)).sum())] for t in (ours_tok, peer_tok)]
        table = [[a, b] for a, b in zip(*table) if a + b]
        pvalues["split" if split else "rows"] = stats.chi2_contingency(table).pvalue
    for path, pv in pvalues.items():
        assert pv > 1e-3, f"ours ({path} path) and torch.multinomial draw different distributions (p={pv:.2g})"
    pvalue = min(pvalues.values())

    sets = input_sets(batch * V * torch.finfo(DTYPE).bits // 8)
    logits = [torch.randn(batch, V, device="cuda", dtype=DTYPE, generator=gen) * 4 for _ in range(sets)]
    temp = torch.full((batch,), 0.8, device="cuda")
    params = (
        temp,
        torch.full((batch,), k, dtype=torch.int32, device="cuda"),
        torch.full((batch,), p, device="cuda"),
        torch.zeros(batch, device="cuda"),
        torch.arange(batch, device="cuda"),
    )
    times = device_times(
        {
            "ours": [functools.partial(sample_triton, x, *params) for x in logits],
            "peer": [functools.partial(torch_sample, x, temp, k, p) for x in logits],
        }
    )
    t_ours, t_peer = times["ours"].seconds, times["peer"].seconds
    benchmark.pedantic(synced(sample_triton), args=(logits[0], *params), rounds=5, iterations=3, warmup_rounds=1)
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name(),
        peer="torch softmax + multinomial",
        ours_us=round(t_ours * 1e6, 1),
        peer_us=round(t_peer * 1e6, 1),
        speedup=round(t_peer / t_ours, 2),
        same_distribution_pvalue={path: round(pv, 4) for path, pv in pvalues.items()},
        timing=times["ours"].note(),
        input_sets=sets,
    )
    print(
        f"\nsampling B={batch} {filters}: ours {t_ours * 1e6:.0f} us, torch multinomial {t_peer * 1e6:.0f} us, "
        f"ratio {t_peer / t_ours:.2f}x (same distribution, both paths: p >= {pvalue:.3f}); "
        f"{times['ours'].note()}, {sets} set(s)"
    )
