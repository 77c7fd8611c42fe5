"""Triton kernels against their torch references, and the references against float64.

Without CUDA the Triton kernels run under TRITON_INTERPRET=1 (tests/conftest.py) on CPU tensors;
with CUDA they run natively. Shapes are small because the interpreter is slow, but every case
covers ragged lengths, several tiles, shuffled and shared blocks and GQA.
"""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from bstar.kernels import (
    apply_rotary_ref,
    paged_decode_attention,
    paged_decode_attention_ref,
    paged_prefill_attention_ref,
    prm_step_scores_ref,
    qk_norm_rope_ref,
    rms_norm_ref,
    rope_store_kv,
    rope_store_kv_ref,
    sample_ref,
    silu_and_mul,
    silu_and_mul_ref,
)
from bstar.kernels.activation_triton import GPU_BLOCK, silu_and_mul_triton
from bstar.kernels.decode_attention_triton import MIN_TOKENS_PER_SPLIT, choose_num_splits, paged_decode_attention_triton
from bstar.kernels.kv_store import store_kv_ref
from bstar.kernels.kv_store_triton import store_kv_triton
from bstar.kernels.norm_rope_triton import apply_rotary_triton, qk_norm_rope_triton, rms_norm_triton
from bstar.kernels.prefill_attention_triton import paged_prefill_attention_triton
from bstar.kernels.prm_scoring_triton import prm_step_scores_triton
from bstar.kernels.rope_store_triton import rope_store_kv_triton
from bstar.kernels.sampling import apply_filters
from bstar.kernels.sampling_triton import SPLIT_VOCAB_MAX_ROWS, sample_triton

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# The interpreter's tl.dot on bfloat16 returns garbage, and its fp32->bf16 cast truncates.
ON_GPU = DEV == "cuda"
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy inf/nan in masked interpreter lanes


# ----------------------------------------------------------------------------- paged KV fixtures


def make_kv(num_blocks, page, hkv, d, dtype, gen):
    """K and V as views of one [blocks, 2, page, Hkv, D] tensor: non-contiguous, like a fused cache."""
    kv = torch.randn(num_blocks, 2, page, hkv, d, generator=gen).to(dtype).to(DEV)
    return kv[:, 0], kv[:, 1]


def make_tables(lens, page, num_blocks, gen, shared_prefix_blocks=0):
    """Block tables with blocks in shuffled order; the first `shared_prefix_blocks` blocks of every
    sequence are the same physical blocks (a shared prompt). Unused entries are -1."""
    need = [math.ceil(n / page) for n in lens]
    width = max(need) + 2
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    shared, pool = perm[:shared_prefix_blocks], perm[shared_prefix_blocks:]
    table = torch.full((len(lens), width), -1, dtype=torch.int32)
    for b, nb in enumerate(need):
        own = [pool.pop() for _ in range(nb - min(nb, len(shared)))]
        table[b, :nb] = torch.tensor((shared[:nb] + own)[:nb], dtype=torch.int32)
    return table.to(DEV)


def gather_dense(cache, table_row, length):
    """[length, Hkv, D] float64 of one sequence, walking its block table token by token."""
    page = cache.shape[1]
    rows = [cache[int(table_row[p // page]), p % page] for p in range(length)]
    return torch.stack(rows).double()


def attention_f64(q, k, v, key_visible, scale):
    """q [n, Hq, D], k/v [L, Hkv, D], key_visible bool [n, L] -> [n, Hq, D] float64."""
    hq, hkv = q.shape[1], k.shape[1]
    kk = k.repeat_interleave(hq // hkv, dim=1)
    vv = v.repeat_interleave(hq // hkv, dim=1)
    s = torch.einsum("nhd,lhd->hnl", q.double(), kk) * scale
    s = s.masked_fill(~key_visible[None], float("-inf"))
    return torch.einsum("hnl,lhd->nhd", torch.softmax(s, -1), vv)


def decode_case(B, hq, hkv, d, page, dtype, seed, lens=None, shared=0):
    gen = torch.Generator().manual_seed(seed)
    lens = lens or torch.randint(1, 5 * page, (B,), generator=gen).tolist()
    num_blocks = sum(math.ceil(n / page) for n in lens) + 4
    k, v = make_kv(num_blocks, page, hkv, d, dtype, gen)
    table = make_tables(lens, page, num_blocks, gen, shared)
    # q as a view into a packed qkv projection (non-contiguous batch stride)
    qkv = torch.randn(B, (hq + 2 * hkv) * d, generator=gen).to(dtype).to(DEV)
    q = qkv[:, : hq * d].view(B, hq, d)
    return q, k, v, table, torch.tensor(lens, dtype=torch.int32, device=DEV)


# ----------------------------------------------------------------------------- decode attention


@pytest.mark.parametrize("group", [1, 4, 8])
def test_decode_reference_matches_float64(group):
    hkv, page = 2, 8
    q, k, v, table, lens = decode_case(
        3, hkv * group, hkv, 16, page, torch.float32, 10 + group, lens=[8, 13, 40], shared=1
    )
    out = paged_decode_attention_ref(q, k, v, table, lens, scale=0.3)
    for b, n in enumerate(lens.tolist()):
        kd, vd = gather_dense(k, table[b], n), gather_dense(v, table[b], n)
        want = attention_f64(q[b : b + 1], kd, vd, torch.ones(1, n, dtype=torch.bool, device=DEV), 0.3)[0]
        torch.testing.assert_close(out[b].double(), want, atol=1e-5, rtol=1e-5)


DECODE_CASES = [
    # (group, D, page, dtype, num_splits, lens, shared blocks)
    (1, 64, 16, torch.float32, 1, [16, 33, 1, 64], 0),
    (4, 32, 16, torch.float32, 3, [16, 75, 5, 48], 1),
    (8, 32, 8, torch.float32, None, [7, 70, 24], 2),
    (1, 32, 16, torch.float16, 4, [90, 3, 32], 1),
    (4, 64, 16, torch.float16, 1, [17, 64, 31], 2),
    (8, 16, 4, torch.float16, 2, [12, 1, 41], 3),
    (4, 48, 16, torch.float16, 2, [20, 9], 0),  # head dim that is not a power of two
]


@pytest.mark.parametrize("group,d,page,dtype,splits,lens,shared", DECODE_CASES)
def test_decode_triton_matches_reference(group, d, page, dtype, splits, lens, shared):
    hkv = 2
    q, k, v, table, seq = decode_case(
        len(lens), hkv * group, hkv, d, page, dtype, hash((group, d, page)) % 1000, lens=lens, shared=shared
    )
    want = paged_decode_attention_ref(q, k, v, table, seq)
    got = paged_decode_attention_triton(q, k, v, table, seq, num_splits=splits, block_n=16)
    assert got.dtype == q.dtype and got.shape == q.shape
    torch.testing.assert_close(got.float(), want.float(), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.skipif(not ON_GPU, reason="bf16 tl.dot is broken under the Triton interpreter")
@pytest.mark.parametrize("splits", [1, None])
def test_decode_triton_bf16_gpu(splits):
    q, k, v, table, seq = decode_case(5, 32, 8, 128, 16, torch.bfloat16, 7, lens=[1, 100, 513, 2048, 77], shared=2)
    want = paged_decode_attention_ref(q, k, v, table, seq)
    got = paged_decode_attention_triton(q, k, v, table, seq, num_splits=splits)
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)


def test_decode_default_tiles_and_dispatcher(monkeypatch):
    """Default tile sizes and split heuristic, reached through the public dispatcher (the backend passed
    explicitly, as the engine passes it; the environment is never read per call)."""
    q, k, v, table, seq = decode_case(3, 8, 2, 64, 16, torch.float32, 3, lens=[100, 7, 300])
    monkeypatch.setenv("BSTAR_KERNELS", "bogus")  # (a wrapper would raise if it read it)
    got = paged_decode_attention(q, k, v, table, seq, triton=True)
    want = paged_decode_attention(q, k, v, table, seq, triton=False)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def test_attention_64bit_offset_path(monkeypatch):
    """Caches of 2**31+ elements switch the kernels to 64-bit offsets; force that path on a small cache."""
    import bstar.kernels.decode_attention_triton as dec
    import bstar.kernels.prefill_attention_triton as pre

    monkeypatch.setattr(dec, "_needs_64bit_offsets", lambda *caches: True)
    monkeypatch.setattr(pre, "_needs_64bit_offsets", lambda *caches: True)
    q, k, v, table, seq = decode_case(3, 8, 2, 32, 8, torch.float32, 4, lens=[9, 30, 2], shared=1)
    torch.testing.assert_close(
        dec.paged_decode_attention_triton(q, k, v, table, seq, num_splits=2, block_n=16),
        paged_decode_attention_ref(q, k, v, table, seq),
        atol=2e-5,
        rtol=2e-5,
    )
    q, k, v, table, cu, seq = prefill_case([6, 11], [9, 0], 8, 2, 32, 8, torch.float32, 5, shared=1)
    torch.testing.assert_close(
        pre.paged_prefill_attention_triton(q, k, v, table, cu, seq, block_m=16, block_n=16),
        paged_prefill_attention_ref(q, k, v, table, cu, seq),
        atol=2e-5,
        rtol=2e-5,
    )


def test_decode_split_heuristic():
    cpu = torch.device("cpu")  # heuristic assumes 132 SMs off-GPU
    assert choose_num_splits(256, 8, 32768, cpu) == 1  # enough programs already
    assert choose_num_splits(1, 8, 32768, cpu) > 8  # long context, tiny batch: split
    assert choose_num_splits(1, 8, 300, cpu) == 2  # never below ~256 tokens per split
    assert choose_num_splits(1, 8, 100, cpu) == 1


def test_decode_padded_rows_and_runtime_splits():
    """Rows of length 0 (padded CUDA-graph rows) give zeros, never NaN, in both kernels and the
    reference; a heuristic split count larger than a short row needs (a graph sized for
    max_model_len) still gives the reference's output; max_context caps the heuristic."""
    q, k, v, table, seq = decode_case(4, 8, 2, 32, 8, torch.float32, 12, lens=[40, 1, 300, 9], shared=1)
    seq[1] = 0
    want = paged_decode_attention_ref(q, k, v, table, seq)
    assert not want[1].any() and torch.isfinite(want).all()
    wide = torch.zeros(4, 256, dtype=torch.int32, device=DEV)  # as wide as a 2048-token context
    wide[:, : table.shape[1]] = table
    for splits in (None, 1, 3):
        got = paged_decode_attention_triton(q, k, v, wide, seq, num_splits=splits)
        assert not got[1].any()
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    assert choose_num_splits(1, 2, 2048, torch.device("cpu")) == 2048 // MIN_TOKENS_PER_SPLIT
    got = paged_decode_attention_triton(q, k, v, wide, seq, max_context=300)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_store_kv_skips_negative_slots(dtype):
    """Triton and torch stores write the same slots, cast to the cache dtype; slot -1 writes nothing."""
    gen = torch.Generator().manual_seed(8)
    T, hkv, d, page, blocks = 7, 2, 48, 4, 5
    qkv = torch.randn(T, 3 * hkv * d, generator=gen).to(DEV)
    k = qkv[:, : hkv * d].view(T, hkv, d)  # strided views, as from the fused projection
    v = qkv[:, 2 * hkv * d :].view(T, hkv, d)
    slots = torch.tensor([3, -1, 0, 17, -1, 9, 19], device=DEV)
    caches = []
    for store in (store_kv_ref, store_kv_triton):
        kv = torch.full((2, blocks, page, hkv, d), 7.0, dtype=dtype, device=DEV)  # the engine's layout
        store(k, v, kv[0], kv[1], slots)
        caches.append(kv)
    assert torch.equal(caches[0], caches[1])
    flat = caches[1][0].reshape(-1, hkv, d)
    written = slots[slots >= 0]
    torch.testing.assert_close(flat[written].float(), k[slots >= 0].to(dtype).float())
    untouched = torch.ones(blocks * page, dtype=torch.bool, device=DEV)
    untouched[written] = False
    assert (flat[untouched] == 7).all()


def test_decode_rejects_bad_shapes():
    q, k, v, table, seq = decode_case(2, 6, 4, 16, 8, torch.float32, 1, lens=[3, 9])
    with pytest.raises(ValueError, match="multiple"):
        paged_decode_attention_triton(q, k, v, table, seq)
    q, k, v, table, seq = decode_case(2, 8, 4, 16, 8, torch.float32, 1, lens=[3, 9])
    with pytest.raises(ValueError, match="block_tables"):
        paged_decode_attention_triton(q, k, v, table[:1], seq)


# ----------------------------------------------------------------------------- prefill attention


def prefill_case(q_lens, prefix_lens, hq, hkv, d, page, dtype, seed, shared=0):
    gen = torch.Generator().manual_seed(seed)
    lens = [a + b for a, b in zip(q_lens, prefix_lens)]
    num_blocks = sum(math.ceil(n / page) for n in lens) + 3
    k, v = make_kv(num_blocks, page, hkv, d, dtype, gen)
    table = make_tables(lens, page, num_blocks, gen, shared)
    q = torch.randn(sum(q_lens), hq, d, generator=gen).to(dtype).to(DEV)
    cu = torch.tensor([0] + np.cumsum(q_lens).tolist(), dtype=torch.int32, device=DEV)
    return q, k, v, table, cu, torch.tensor(lens, dtype=torch.int32, device=DEV)


@pytest.mark.parametrize("group", [1, 4, 8])
def test_prefill_reference_matches_float64(group):
    q_lens, prefix = [5, 1, 12], [11, 0, 8]
    q, k, v, table, cu, seq = prefill_case(q_lens, prefix, 2 * group, 2, 16, 8, torch.float32, 20 + group, shared=1)
    out = paged_prefill_attention_ref(q, k, v, table, cu, seq)
    for b, (n, p) in enumerate(zip(q_lens, prefix)):
        L = n + p
        kd, vd = gather_dense(k, table[b], L), gather_dense(v, table[b], L)
        qpos = torch.arange(p, L, device=DEV)
        visible = torch.arange(L, device=DEV)[None, :] <= qpos[:, None]
        want = attention_f64(q[cu[b] : cu[b + 1]], kd, vd, visible, 16**-0.5)
        torch.testing.assert_close(out[cu[b] : cu[b + 1]].double(), want, atol=1e-5, rtol=1e-5)


PREFILL_CASES = [
    # (group, D, page, dtype, q_lens, prefix_lens, shared, block_m, block_n)
    (1, 32, 16, torch.float32, [20, 1, 16], [0, 37, 16], 0, 16, 16),
    (4, 32, 8, torch.float32, [9, 33, 0, 4], [24, 3, 5, 60], 1, 16, 16),
    (8, 16, 16, torch.float32, [17, 6], [15, 40], 1, None, None),
    (1, 64, 16, torch.float16, [31, 3], [1, 29], 0, 16, 32),
    (4, 32, 16, torch.float16, [40, 2, 16], [0, 50, 16], 1, 32, 16),
    (8, 32, 4, torch.float16, [5, 19], [10, 13], 2, 16, 16),
]


@pytest.mark.parametrize("group,d,page,dtype,q_lens,prefix,shared,bm,bn", PREFILL_CASES)
def test_prefill_triton_matches_reference(group, d, page, dtype, q_lens, prefix, shared, bm, bn):
    q, k, v, table, cu, seq = prefill_case(q_lens, prefix, 2 * group, 2, d, page, dtype, sum(q_lens), shared)
    want = paged_prefill_attention_ref(q, k, v, table, cu, seq)
    got = paged_prefill_attention_triton(q, k, v, table, cu, seq, block_m=bm, block_n=bn)
    torch.testing.assert_close(got.float(), want.float(), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.skipif(not ON_GPU, reason="bf16 tl.dot is broken under the Triton interpreter")
def test_prefill_triton_bf16_gpu():
    q, k, v, table, cu, seq = prefill_case([300, 1, 77], [0, 900, 129], 32, 8, 128, 16, torch.bfloat16, 5, shared=4)
    want = paged_prefill_attention_ref(q, k, v, table, cu, seq)
    got = paged_prefill_attention_triton(q, k, v, table, cu, seq)
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)


# ----------------------------------------------------------------------------- sampling


def allowed_f64(logits, temperature, top_k, top_p, min_p):
    """Independent numpy/float64 statement of the filter rules, in vLLM's order (temperature, min-p,
    top-k, top-p over what min-p and top-k kept): (allowed mask, renormalised probs)."""
    x = logits.astype(np.float64) / max(temperature, 1e-6)
    V = len(x)
    order = np.argsort(-x, kind="stable")
    keep = np.zeros(V, dtype=bool)
    k = V if top_k <= 0 or top_k > V else top_k
    keep[order[:k]] = True
    if min_p > 0:
        keep &= x >= x.max() + np.log(min_p)
    p = np.exp(x - x.max()) * keep
    p /= p.sum()
    if top_p < 1:
        before = np.cumsum(p[order]) - p[order]
        drop = order[before >= top_p]
        drop = drop[drop != order[0]]
        keep[drop] = False
    probs = np.exp(x - x.max()) * keep
    return keep, probs / probs.sum()


def run_sampler(fn, logits, temperature, top_k, top_p, min_p, seeds):
    B = logits.shape[0]
    args = (
        torch.as_tensor(logits, dtype=torch.float32, device=DEV),
        torch.as_tensor(np.broadcast_to(temperature, B).copy(), dtype=torch.float32, device=DEV),
        torch.as_tensor(np.broadcast_to(top_k, B).copy(), dtype=torch.int32, device=DEV),
        torch.as_tensor(np.broadcast_to(top_p, B).copy(), dtype=torch.float32, device=DEV),
        torch.as_tensor(np.broadcast_to(min_p, B).copy(), dtype=torch.float32, device=DEV),
        torch.as_tensor(seeds, dtype=torch.int64, device=DEV),
    )
    tok, lp = fn(*args)
    return tok.cpu().numpy(), lp.cpu().numpy()


def triton_small_tiles(*args):
    return sample_triton(*args, block_v=64)


SAMPLERS = {"ref": sample_ref, "triton": triton_small_tiles}
FILTERS = [  # (temperature, top_k, top_p, min_p)
    (1.0, 0, 1.0, 0.0),
    (0.7, 5, 1.0, 0.0),
    (1.3, 0, 0.6, 0.0),
    (1.0, 0, 1.0, 0.2),
    (0.9, 20, 0.8, 0.05),
    (1.0, 1, 1.0, 0.0),
    (2.0, 0, 0.0, 0.0),  # top_p 0 keeps only the most likely token
]


@pytest.mark.parametrize("name", SAMPLERS)
def test_sampling_draws_only_allowed_tokens(name):
    rng = np.random.default_rng(1)
    V, per = 300, 24
    rows, params = [], []
    for f in FILTERS:
        logits = rng.standard_normal((per, V)) * 3
        rows.append(logits)
        params += [f] * per
    logits = np.concatenate(rows)
    t, k, p, m = (np.array(c) for c in zip(*params))
    tok, lp = run_sampler(SAMPLERS[name], logits, t, k, p, m, rng.integers(0, 2**62, len(t)))
    for i in range(len(t)):
        keep, _ = allowed_f64(logits[i], t[i], k[i], p[i], m[i])
        assert keep[tok[i]], f"row {i} {params[i]} drew disallowed token {tok[i]}"
    raw = logits - logits.max(1, keepdims=True)
    want_lp = raw[np.arange(len(t)), tok] - np.log(np.exp(raw).sum(1))
    np.testing.assert_allclose(lp, want_lp, atol=1e-4, rtol=1e-4)


CHI_CASES = [(1.0, 0, 1.0, 0.0), (0.6, 6, 1.0, 0.0), (1.2, 0, 0.75, 0.0), (1.0, 0, 1.0, 0.15), (0.8, 9, 0.9, 0.04)]


@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize("case", CHI_CASES)
def test_sampling_frequencies_match_filtered_softmax(name, case):
    """Chi-square goodness of fit of 4000 draws against the float64 renormalised distribution."""
    rng = np.random.default_rng(7)
    V, N = 12, 4000
    logits = rng.standard_normal(V) * 1.5
    keep, probs = allowed_f64(logits, *case)
    assert 1 < keep.sum() < V or case[1:] == (0, 1.0, 0.0)  # the case exercises its filter
    tok, _ = run_sampler(SAMPLERS[name], np.tile(logits, (N, 1)), *case, np.arange(N) * 7919 + 3)
    assert keep[tok].all()
    counts = np.bincount(tok, minlength=V)[keep]
    expected = probs[keep] * N
    assert expected.min() > 5  # chi-square validity
    _, pvalue = stats.chisquare(counts, expected)
    assert pvalue > 1e-3, (counts, expected.round(1))


def test_sampling_chi_square_detects_a_wrong_distribution():
    """Guard on the test itself: draws at temperature 1 fail the fit against temperature 0.6."""
    rng = np.random.default_rng(7)
    V, N = 12, 4000
    logits = rng.standard_normal(V) * 1.5
    keep, probs = allowed_f64(logits, 0.6, 0, 1.0, 0.0)
    tok, _ = run_sampler(triton_small_tiles, np.tile(logits, (N, 1)), 1.0, 0, 1.0, 0.0, np.arange(N))
    _, pvalue = stats.chisquare(np.bincount(tok, minlength=V), probs * N)
    assert pvalue < 1e-6


@pytest.mark.parametrize("name", SAMPLERS)
def test_sampling_greedy_deterministic_and_batch_independent(name):
    rng = np.random.default_rng(3)
    B, V = 16, 200
    logits = rng.standard_normal((B, V)) * 2
    t = np.where(np.arange(B) % 3 == 0, 0.0, 1.0)
    seeds = rng.integers(0, 2**40, B)
    tok, _ = run_sampler(SAMPLERS[name], logits, t, 0, 0.95, 0.0, seeds)
    greedy = t == 0
    np.testing.assert_array_equal(tok[greedy], logits[greedy].argmax(1))
    again, _ = run_sampler(SAMPLERS[name], logits, t, 0, 0.95, 0.0, seeds)
    np.testing.assert_array_equal(tok, again)  # same seeds, same tokens
    alone, _ = run_sampler(SAMPLERS[name], logits[5:6], t[5:6], 0, 0.95, 0.0, seeds[5:6])
    assert alone[0] == tok[5]  # a row's draw depends only on its own seed
    flat = np.zeros((64, V))
    other, _ = run_sampler(SAMPLERS[name], flat, 1.0, 0, 1.0, 0.0, np.arange(64))
    assert len(set(other.tolist())) > 20  # different seeds give different draws (uniform here)


def test_sampling_triton_default_tiles_and_half_logits():
    rng = np.random.default_rng(5)
    logits = torch.tensor(rng.standard_normal((6, 3000)) * 4, dtype=torch.float16, device=DEV)
    temp = [0.0, 1.0, 0.8, 1.0, 0.5, 1.0]
    top_k = [0, 40, 0, 5, 0, 2]
    top_p = [1.0, 1.0, 0.7, 0.9, 1.0, 1.0]
    min_p = [0.0, 0.0, 0.0, 0.1, 0.3, 0.0]
    tok, lp = sample_triton(
        logits,
        torch.tensor(temp, device=DEV),
        torch.tensor(top_k, dtype=torch.int32, device=DEV),
        torch.tensor(top_p, device=DEV),
        torch.tensor(min_p, device=DEV),
        torch.arange(6, device=DEV),
    )
    x = logits.float().cpu().numpy()
    for i in range(6):
        keep, _ = allowed_f64(x[i], temp[i], top_k[i], top_p[i], min_p[i])
        assert keep[int(tok[i])]
    assert int(tok[0]) == int(logits[0].float().argmax())
    want = torch.log_softmax(logits.float(), -1).gather(1, tok[:, None]).squeeze(1)
    torch.testing.assert_close(lp, want, atol=1e-4, rtol=1e-4)


def test_sampling_masked_vocab_and_top_p_off_rows():
    """-inf logits (padded vocabulary) are never drawn; a top_p=1 row keeps its whole vocabulary
    even when another row of the batch uses top-p (the cumsum can round to 1.0 early)."""
    rng = np.random.default_rng(9)
    B, V = 8, 500
    logits = rng.standard_normal((B, V)) * 6
    logits[:, 450:] = -np.inf
    t = np.ones(B)
    p = np.where(np.arange(B) == 0, 0.5, 1.0)
    x = apply_filters(
        torch.tensor(logits, dtype=torch.float32),
        torch.tensor(t, dtype=torch.float32),
        torch.zeros(B, dtype=torch.int32),
        torch.tensor(p, dtype=torch.float32),
        torch.zeros(B),
    )
    assert torch.isfinite(x[1:, :450]).all() and not torch.isfinite(x[:, 450:]).any()
    for name, fn in SAMPLERS.items():
        tok, lp = run_sampler(fn, np.tile(logits, (64, 1)), np.tile(t, 64), 0, np.tile(p, 64), 0.0, np.arange(64 * B))
        assert (tok < 450).all() and np.isfinite(lp).all(), name


@pytest.mark.parametrize("V", [1000, 300])
def test_sampling_split_vocab_equals_row_kernel(V):
    """Batches of 1-4 rows over a vocabulary that is not a multiple of the tile: the split path
    draws exactly the row kernel's tokens (same noise per token id) with temperature, min-p,
    top-k and greedy rows, and the same logprobs."""
    rng = np.random.default_rng(V)
    for B in (1, 2, 4):
        logits = rng.standard_normal((B, V)) * 3
        t = np.array([0.0, 1.0, 0.7, 1.3])[:B]
        k = np.array([0, 0, 5, 0])[:B]
        m = np.array([0.0, 0.05, 0.0, 0.0])[:B]
        seeds = rng.integers(0, 2**40, B)
        split = lambda *a: sample_triton(*a, split=True, block_v=128)  # noqa: E731
        rows = lambda *a: sample_triton(*a, split=False)  # noqa: E731
        tok, lp = run_sampler(split, logits, t, k, 1.0, m, seeds)
        want, want_lp = run_sampler(rows, logits, t, k, 1.0, m, seeds)
        np.testing.assert_array_equal(tok, want)
        np.testing.assert_allclose(lp, want_lp, atol=1e-5, rtol=1e-5)
        assert tok[0] == logits[0].argmax()


@pytest.mark.parametrize("case", [CHI_CASES[0], CHI_CASES[3], CHI_CASES[4]])
def test_sampling_split_vocab_frequencies(case):
    """The split path's draws (batches of SPLIT_VOCAB_MAX_ROWS rows; the likely tokens on both
    sides of a chunk border and in the last, partial chunk) fit the float64 filtered
    distribution (chi-square): plain, min-p, and top-k + top-p + min-p."""
    rng = np.random.default_rng(11)
    V, N = 300, 1280
    logits = rng.standard_normal(V) * 1.5 - 8
    logits[[250, 253, 255, 290, 296, 299]] += 9  # (under the interpreter chunks are 256 tokens)
    keep, probs = allowed_f64(logits, *case)
    toks = []
    for i in range(0, N, SPLIT_VOCAB_MAX_ROWS):
        seeds = np.arange(i, i + SPLIT_VOCAB_MAX_ROWS) * 31 + 5
        toks.append(run_sampler(sample_triton, np.tile(logits, (SPLIT_VOCAB_MAX_ROWS, 1)), *case, seeds)[0])
    tok = np.concatenate(toks)
    assert keep[tok].all()
    big = probs * N > 5
    counts, expected = np.bincount(tok, minlength=V)[big], probs[big] * N
    if probs[~big].sum() * N > 5:  # the unlikely allowed tokens as one bin
        counts = np.append(counts, (~big[tok]).sum())
        expected = np.append(expected, probs[~big].sum() * N)
    _, pvalue = stats.chisquare(counts, expected * counts.sum() / expected.sum())
    assert pvalue > 1e-3, (counts, expected.round(1))


def test_sampling_split_vocab_qwen_vocabulary():
    """Vocabulary 151,936 at batch 4: greedy rows exact, drawn tokens allowed, logprobs exact."""
    rng = np.random.default_rng(2)
    V = 151936
    logits = torch.tensor(rng.standard_normal((4, V)) * 3, dtype=torch.float32, device=DEV)
    temp = torch.tensor([0.0, 1.0, 0.0, 0.8], device=DEV)
    zeros = torch.zeros(4, device=DEV)
    tok, lp = sample_triton(
        logits,
        temp,
        zeros.int(),
        zeros + 1,
        zeros + torch.tensor([0, 0, 0, 0.2], device=DEV),
        torch.arange(4, device=DEV),
    )
    argmax = logits.argmax(-1)
    assert tok[0] == argmax[0] and tok[2] == argmax[2]
    x = logits[3] / 0.8
    assert x[tok[3]] >= x.max() + math.log(0.2)
    torch.testing.assert_close(lp, torch.log_softmax(logits, -1).gather(1, tok[:, None])[:, 0], atol=1e-4, rtol=1e-4)


def test_sampling_split_vocab_gpu_configs():
    """The split path with a GPU's launch configs (kernels.launch.as_gpu: one row a program, whose
    threshold kernel then drops the row mask, 2048-token chunks and tiles), run here under the
    interpreter, with every filter: drawn tokens allowed by the float64 filters in vLLM's order,
    greedy rows the argmax, logprobs exact, and the row kernel's tokens (same configs) wherever
    both normalise top-p over the same tiles (top-p with top-k or min-p, or no top-p)."""
    from bstar.kernels.launch import as_gpu, record_variants

    rng = np.random.default_rng(13)
    V = 5000  # three chunks, the last partial
    t = np.array([0.0, 1.0, 0.8, 1.2, 1.0, 0.7, 1.0])
    k = np.array([0, 50, 0, 0, 20, 7, 0])
    p = np.array([1.0, 0.8, 0.9, 0.5, 1.0, 0.6, 1.0])
    m = np.array([0.0, 0.0, 0.05, 0.0, 0.0, 0.02, 0.3])
    B = len(t)
    logits = rng.standard_normal((B, V)) * 3
    logits[:, [17, 2047, 2048, 4999]] += 4  # likely tokens at the chunk borders and the last token
    seeds = rng.integers(0, 2**40, B)
    launches = []
    with as_gpu(), record_variants(launches=launches):
        tok, lp = run_sampler(lambda *a: sample_triton(*a, split=True), logits, t, k, p, m, seeds)
        want, _ = run_sampler(lambda *a: sample_triton(*a, split=False), logits, t, k, p, m, seeds)
    combine = [kw for kern, _, kw in launches if kern.fn.__name__ == "_combine_thresholds_kernel"]
    assert [kw["BLOCK_R"] for kw in combine] == [1]
    for i in range(B):
        keep, _ = allowed_f64(logits[i], t[i], k[i], p[i], m[i])
        assert keep[tok[i]], f"row {i} drew disallowed token {tok[i]}"
        assert t[i] == 0 or 1 < keep.sum() < V  # the row exercises its filters
    assert tok[0] == logits[0].argmax()
    same_tiles = (p == 1) | (k > 0) | (m > 0)
    np.testing.assert_array_equal(tok[same_tiles], want[same_tiles])
    raw = logits - logits.max(1, keepdims=True)
    want_lp = raw[np.arange(B), tok] - np.log(np.exp(raw).sum(1))
    np.testing.assert_allclose(lp, want_lp, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- PRM step scoring


def prm_case(dtype, seed, bias):
    """Hidden states, a full LM head (both in `dtype`) and step tags for 6 candidates; candidate 2
    has no step."""
    gen = torch.Generator().manual_seed(seed)
    T, H, V = 60, 96, 50
    hidden = torch.randn(T, H, generator=gen).to(dtype)
    lm_head = (torch.randn(V, H, generator=gen) * 0.2).to(dtype)
    lm_bias = torch.randn(V, generator=gen) if bias else None
    tag = torch.tensor([2, 5, 9, 11, 20, 31, 33, 40, 47, 52, 59])
    cand = torch.tensor([0, 0, 0, 1, 3, 3, 3, 3, 4, 5, 5])
    return hidden, lm_head, lm_bias, tag, cand, 6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])  # no tl.dot: bf16 is fine
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("agg", ["min", "last", "prod", "mean"])
def test_prm_matches_full_logits_softmax(dtype, bias, agg):
    hidden, lm_head, lm_bias, tag, cand, C = prm_case(dtype, 11, bias)
    good, bad = 17, 3
    # Independent float64 computation: full [T, V] logits, softmax over the two tag tokens.
    logits = hidden.double() @ lm_head.double().t()
    if lm_bias is not None:
        logits = logits + lm_bias.double()
    want_p = torch.softmax(logits[tag][:, [good, bad]], -1)[:, 0]
    reduce = {"min": min, "last": lambda xs: xs[-1], "prod": math.prod, "mean": lambda xs: sum(xs) / len(xs)}[agg]
    want_agg = torch.tensor(
        [reduce(want_p[cand == c].tolist()) if (cand == c).any() else 0.0 for c in range(C)], dtype=torch.float64
    )
    head_w = lm_head[[good, bad]].to(DEV)
    head_b = lm_bias[[good, bad]].to(DEV) if lm_bias is not None else None
    for fn in (prm_step_scores_ref, prm_step_scores_triton):
        p, a = fn(hidden.to(DEV), tag.to(DEV), head_w, head_b, cand.to(DEV), C, agg)
        torch.testing.assert_close(p.cpu().double(), want_p, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a.cpu().double(), want_agg, atol=1e-5, rtol=1e-5)
        assert a[2] == 0  # candidate without steps


def test_prm_long_hidden_many_steps_and_errors():
    gen = torch.Generator().manual_seed(2)
    T, H, S = 400, 700, 90  # several H tiles and several step tiles
    hidden = torch.randn(T, H, generator=gen, device="cpu").to(DEV)
    w = (torch.randn(2, H, generator=gen) * 0.05).to(DEV)
    tag = torch.randperm(T, generator=gen)[:S].sort().values.to(DEV)
    cand = (torch.arange(S) // 7).to(DEV)  # 13 candidates, the last one empty
    for agg in ("min", "prod"):
        want = prm_step_scores_ref(hidden, tag, w, None, cand, 14, agg)
        got = prm_step_scores_triton(hidden, tag, w, None, cand, 14, agg)
        torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5)
    p, a = prm_step_scores_triton(hidden, tag[:0], w, None, cand[:0], 3, "mean")
    assert p.shape == (0,) and a.tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="aggregate"):
        prm_step_scores_triton(hidden, tag, w, None, cand, 14, "median")
    with pytest.raises(ValueError, match="non-decreasing"):
        prm_step_scores_triton(hidden, tag, w, None, cand.flip(0), 14, "min")


# ----------------------------------------------------------------------------- RMSNorm and rotary


def rms_norm_f64(x, w, eps):
    x = x.double()
    return w.double() * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(dtype, with_residual):
    gen = torch.Generator().manual_seed(4)
    x = (torch.randn(5, 3, 200, generator=gen) * 2).to(dtype).to(DEV)
    r = torch.randn(5, 3, 200, generator=gen).to(dtype).to(DEV) if with_residual else None
    w = (1 + 0.3 * torch.randn(200, generator=gen)).to(dtype).to(DEV)
    ref = rms_norm_ref(x, w, 1e-5, r)
    got = rms_norm_triton(x, w, 1e-5, r)
    summed = x if r is None else (x + r)
    f64_tol = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
    ref_out = ref if r is None else ref[0]
    torch.testing.assert_close(ref_out.double(), rms_norm_f64(summed, w, 1e-5), atol=f64_tol, rtol=f64_tol)
    # Same rounding steps as the reference: exact up to one ulp (the interpreter truncates bf16).
    tol = 1e-5 if dtype == torch.float32 else (1e-3 if dtype == torch.float16 else 2e-2)
    if r is None:
        torch.testing.assert_close(got.float(), ref.float(), atol=tol, rtol=tol)
        assert got.dtype == ref.dtype
    else:
        torch.testing.assert_close(got[0].float(), ref[0].float(), atol=tol, rtol=tol)
        torch.testing.assert_close(got[1].float(), ref[1].float(), atol=tol, rtol=tol)


def rotary_f64(x, positions, cos_sin):
    """Neox rotary as a complex rotation of (x[:half], x[half:]) pairs, in float64."""
    half = x.shape[-1] // 2
    c = cos_sin[positions, :half].double()[:, None, :]
    s = cos_sin[positions, half:].double()[:, None, :]
    x1, x2 = x[..., :half].double(), x[..., half:].double()
    z = torch.complex(x1, x2) * torch.complex(c, s)
    return torch.cat([z.real, z.imag], -1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_rotary(dtype):
    gen = torch.Generator().manual_seed(6)
    T, hq, hkv, d = 7, 12, 4, 64
    theta = torch.arange(0, 100)[:, None].double() * (10000.0 ** (-torch.arange(0, d, 2).double() / d))[None]
    cos_sin = torch.cat([theta.cos(), theta.sin()], -1).float().to(DEV)
    qkv = torch.randn(T, (hq + 2 * hkv) * d, generator=gen).to(dtype).to(DEV)
    q = qkv[:, : hq * d].view(T, hq, d)  # non-contiguous views, as from a fused projection
    k = qkv[:, hq * d : (hq + hkv) * d].view(T, hkv, d)
    pos = torch.randint(0, 100, (T,), generator=gen).to(DEV)
    rq, rk = apply_rotary_ref(q, k, pos, cos_sin)  # adjacent views: rotated in one pass
    sq, sk = apply_rotary_ref(q.contiguous(), k.contiguous(), pos, cos_sin)  # separate tensors
    assert torch.equal(rq, sq) and torch.equal(rk, sk)
    f64_tol = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 5e-2}[dtype]
    torch.testing.assert_close(rq.double(), rotary_f64(q, pos, cos_sin), atol=f64_tol, rtol=f64_tol)
    torch.testing.assert_close(rk.double(), rotary_f64(k, pos, cos_sin), atol=f64_tol, rtol=f64_tol)
    tq, tk = apply_rotary_triton(q, k, pos, cos_sin)
    tol = 1e-6 if dtype == torch.float32 else (1e-3 if dtype == torch.float16 else 5e-2)
    torch.testing.assert_close(tq.float(), rq.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(tk.float(), rk.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_qk_norm_rope(dtype):
    """Qwen3's per-head q/k RMSNorm then rotary: the reference against float64 (norm over head_dim
    with a [D] weight shared by the heads, then the rotation), the Triton kernel against the
    reference, on views of a fused projection with a head_dim that is not a power of two."""
    gen = torch.Generator().manual_seed(8)
    T, hq, hkv, d = 9, 6, 2, 24
    theta = torch.arange(0, 100)[:, None].double() * (10000.0 ** (-torch.arange(0, d, 2).double() / d))[None]
    cos_sin = torch.cat([theta.cos(), theta.sin()], -1).float().to(DEV)
    qkv = (torch.randn(T, (hq + 2 * hkv) * d, generator=gen) * 3).to(dtype).to(DEV)
    q = qkv[:, : hq * d].view(T, hq, d)
    k = qkv[:, hq * d : (hq + hkv) * d].view(T, hkv, d)
    wq = (1 + 0.3 * torch.randn(d, generator=gen)).to(dtype).to(DEV)
    wk = (1 + 0.3 * torch.randn(d, generator=gen)).to(dtype).to(DEV)
    pos = torch.randint(0, 100, (T,), generator=gen).to(DEV)
    rq, rk = qk_norm_rope_ref(q, k, wq, wk, 1e-6, pos, cos_sin)
    f64_tol = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 6e-2}[dtype]
    want_q = rotary_f64(rms_norm_f64(q, wq, 1e-6), pos, cos_sin)
    want_k = rotary_f64(rms_norm_f64(k, wk, 1e-6), pos, cos_sin)
    torch.testing.assert_close(rq.double(), want_q, atol=f64_tol, rtol=f64_tol)
    torch.testing.assert_close(rk.double(), want_k, atol=f64_tol, rtol=f64_tol)
    tq, tk = qk_norm_rope_triton(q, k, wq, wk, 1e-6, pos, cos_sin)
    assert tq.dtype == rq.dtype == dtype and tk.dtype == rk.dtype
    # same rounding steps as the reference (the interpreter truncates bf16 casts: looser there)
    tol = 2e-6 if dtype == torch.float32 else (2e-3 if dtype == torch.float16 else 6e-2)
    torch.testing.assert_close(tq.float(), rq.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(tk.float(), rk.float(), atol=tol, rtol=tol)
    with pytest.raises(ValueError, match="norm weights must be"):
        qk_norm_rope_triton(q, k, wq[:-2], wk, 1e-6, pos, cos_sin)


# ----------------------------------------------------------------------------- rotary fused with the KV store

ROPE_STORE_CASES = [  # (Hq, Hkv, D, q/k norm): Llama-like GQA 4, Qwen2.5-0.5B's 7, Qwen3-like D=24, MHA
    (8, 2, 32, False),
    (14, 2, 64, False),
    (6, 2, 24, True),
    (4, 4, 16, True),
]


def rope_store_case(hq, hkv, d, dtype, seed, qk_norm, T=9, page=4, blocks=6):
    """Views of one fused qkv projection (the engine's q, k, v), a cache pair as views of one
    [2, blocks, page, Hkv, D] tensor filled with 7, slots in shuffled order with two -1 rows."""
    gen = torch.Generator().manual_seed(seed)
    theta = torch.arange(0, 100)[:, None].double() * (10000.0 ** (-torch.arange(0, d, 2).double() / d))[None]
    cos_sin = torch.cat([theta.cos(), theta.sin()], -1).float().to(DEV)
    qkv = (torch.randn(T, (hq + 2 * hkv) * d, generator=gen) * 3).to(dtype).to(DEV)
    q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    q, k, v = q.view(T, hq, d), k.view(T, hkv, d), v.view(T, hkv, d)
    slots = torch.randperm(blocks * page, generator=gen)[:T]
    slots[[1, T - 2]] = -1
    pos = torch.randint(0, 100, (T,), generator=gen)
    w = [(1 + 0.3 * torch.randn(d, generator=gen)).to(dtype).to(DEV) for _ in range(2)] if qk_norm else [None, None]
    return q, k, v, slots.to(DEV), pos.to(DEV), cos_sin, w


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hq,hkv,d,qk_norm", ROPE_STORE_CASES)
def test_rope_store_kv(dtype, hq, hkv, d, qk_norm):
    """The fused rotary (+ q/k norm) and KV store: the reference is exactly apply_rotary_ref /
    qk_norm_rope_ref then store_kv_ref and agrees with float64; the Triton kernel writes the same
    q and cache (every other cache entry untouched, slot -1 rows nowhere)."""
    q, k, v, slots, pos, cos_sin, (wq, wk) = rope_store_case(hq, hkv, d, dtype, hq * 100 + d, qk_norm)
    eps = 1e-6
    blocks, page = 6, 4
    caches = {}
    for name, fn in (("ref", rope_store_kv_ref), ("triton", rope_store_kv_triton)):
        kv = torch.full((2, blocks, page, hkv, d), 7.0, dtype=dtype, device=DEV)  # the engine's layout
        caches[name] = (fn(q, k, v, kv[0], kv[1], slots, pos, cos_sin, wq, wk, eps), kv)
    # the reference is the composition of the existing references, to the bit
    if qk_norm:
        sq, sk = qk_norm_rope_ref(q, k, wq, wk, eps, pos, cos_sin)
    else:
        sq, sk = apply_rotary_ref(q, k, pos, cos_sin)
    kv = torch.full((2, blocks, page, hkv, d), 7.0, dtype=dtype, device=DEV)
    store_kv_ref(sk, v, kv[0], kv[1], slots)
    rq, rkv = caches["ref"]
    assert torch.equal(rq, sq) and torch.equal(rkv, kv) and rq.dtype == dtype
    # against float64
    keep = slots >= 0
    want_q = rotary_f64(rms_norm_f64(q, wq, eps) if qk_norm else q, pos, cos_sin)
    want_k = rotary_f64(rms_norm_f64(k, wk, eps) if qk_norm else k, pos, cos_sin)
    f64_tol = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 6e-2}[dtype]
    flat = rkv.view(2, blocks * page, hkv, d)
    torch.testing.assert_close(rq.double(), want_q, atol=f64_tol, rtol=f64_tol)
    torch.testing.assert_close(flat[0, slots[keep]].double(), want_k[keep], atol=f64_tol, rtol=f64_tol)
    assert torch.equal(flat[1, slots[keep]], v[keep])
    untouched = torch.ones(blocks * page, dtype=torch.bool, device=DEV)
    untouched[slots[keep]] = False
    assert (flat[:, untouched] == 7).all()
    # Triton against the reference: same rounding steps, so bit-equal but where the interpreter's
    # truncating fp32 -> bf16 cast differs from torch's rounding (one bf16 ulp)
    tq, tkv = caches["triton"]
    assert tq.dtype == dtype and tq.shape == rq.shape
    if dtype == torch.bfloat16 and not ON_GPU:
        torch.testing.assert_close(tq.float(), rq.float(), atol=6e-2, rtol=2e-2)
        torch.testing.assert_close(tkv.float(), rkv.float(), atol=6e-2, rtol=2e-2)
        assert torch.equal(tkv[1], rkv[1])  # v is only copied
        assert (tkv.view(2, -1, hkv, d)[:, untouched] == 7).all()
    else:
        tol = 2e-6 if dtype == torch.float32 else 1e-3
        torch.testing.assert_close(tq.float(), rq.float(), atol=tol, rtol=tol)
        torch.testing.assert_close(tkv.float(), rkv.float(), atol=tol, rtol=tol)
        if dtype == torch.float16 or ON_GPU:
            assert (tq == rq).float().mean() > 0.99 and (tkv == rkv).float().mean() > 0.99


def test_rope_store_kv_dispatch_casts_and_errors():
    """The dispatcher follows its triton argument; a cache of another dtype gets k and v cast as store_kv
    casts them; contiguous inputs and T = 0 work; bad input is one clear line from the wrapper."""
    q, k, v, slots, pos, cos_sin, (wq, wk) = rope_store_case(6, 2, 24, torch.float16, 3, True)
    for triton in (True, False):
        kv = torch.zeros(2, 6, 4, 2, 24, dtype=torch.float32, device=DEV)  # fp32 cache, fp16 activations
        qc, kc, vc = q.contiguous(), k.contiguous(), v.contiguous()
        got = rope_store_kv(qc, kc, vc, kv[0], kv[1], slots, pos, cos_sin, wq, wk, triton=triton)
        kr = torch.zeros_like(kv)
        want = rope_store_kv_ref(q, k, v, kr[0], kr[1], slots, pos, cos_sin, wq, wk)
        torch.testing.assert_close(got.float(), want.float(), atol=1e-3, rtol=1e-3)
        torch.testing.assert_close(kv, kr, atol=1e-3, rtol=1e-3)
    assert rope_store_kv_triton(q[:0], k[:0], v[:0], kv[0], kv[1], slots[:0], pos[:0], cos_sin).shape == (0, 6, 24)
    kc, vc = kv[0].half(), kv[1].half()
    bad = [
        ((q, k, v[:, :1], kc, vc, slots, pos, cos_sin), "expects q"),
        ((q, k, v, kc[:, :, :1], vc[:, :, :1], slots, pos, cos_sin), "caches"),
        ((q, k, v, kc, vc, slots[:3], pos, cos_sin), "slot_mapping"),
        ((q, k, v, kc, vc, slots, pos, cos_sin[:, :10]), "even head dim"),
        ((q, k, v, kc, vc, slots, pos, cos_sin, wq, None), "both q/k norm weights"),
        ((q, k, v, kc, vc, slots, pos, cos_sin, wq[:-2], wk), "norm weights must be"),
        ((q, k.float(), v, kc, vc, slots, pos, cos_sin), "one dtype"),
    ]
    for args, msg in bad:
        with pytest.raises(ValueError, match=msg) as e:
            rope_store_kv_triton(*args)
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("hq,hkv,d,block_t,chunk,warps", [(14, 2, 64, 4, 8, 1), (40, 8, 128, 1, 32, 2)])
def test_rotary_kernels_gpu_tiles(dtype, hq, hkv, d, block_t, chunk, warps):
    """The rotary kernels with a GPU's launch configs (several tokens a program at the 0.5B shape,
    q heads in chunks: what makes their 16-bit rows 16 bytes a thread, bench/compile_check.py), run
    here under the interpreter: the same bits as the interpreter's configs (one program, q whole) and
    as the references where those round alike, with a token count that leaves a partial block."""
    from bstar.kernels.launch import as_gpu, record_variants

    T = 9
    q, k, v, slots, pos, cos_sin, _ = rope_store_case(hq, hkv, d, dtype, 5, False, T=T, page=4, blocks=6)
    w = [(1 + 0.3 * torch.randn(d, generator=torch.Generator().manual_seed(i))).to(dtype).to(DEV) for i in (1, 2)]

    def run():
        out = [*apply_rotary_triton(q, k, pos, cos_sin), *qk_norm_rope_triton(q, k, *w, 1e-6, pos, cos_sin)]
        for ws in ([None, None], w):
            kv = torch.full((2, 6, 4, hkv, d), 7.0, dtype=dtype, device=DEV)
            out += [rope_store_kv_triton(q, k, v, kv[0], kv[1], slots, pos, cos_sin, *ws), kv]
        return out

    want = run()
    launches = []
    with as_gpu(), record_variants(launches=launches):
        got = run()
    per_elem = 16 // q.element_size()
    for _, _, kw in launches:
        if per_elem == 8:  # 16-bit: the configs compile_check reads as 16 bytes wide
            assert (kw["BLOCK_T"], kw["BLOCK_HQC"], kw["num_warps"]) == (block_t, chunk, warps)
        # each thread holds 16 bytes of the k half-tile, and the launch covers every token
        assert kw["BLOCK_T"] * kw["BLOCK_HK"] * kw["BLOCK_HALF"] == 32 * kw["num_warps"] * per_elem
        assert kw["BLOCK_HQ"] % kw["BLOCK_HQC"] == 0 and kw["BLOCK_HQC"] < kw["BLOCK_HQ"]
    assert len(launches) == 4
    for g, r in zip(got, want):
        assert torch.equal(g, r)
    # and against the references (bit-equal where the interpreter's bf16 cast rounds as torch's)
    rq, rk = apply_rotary_ref(q, k, pos, cos_sin)
    if dtype == torch.float32:
        assert torch.equal(got[0], rq) and torch.equal(got[1], rk)
        kv = torch.full((2, 6, 4, hkv, d), 7.0, dtype=dtype, device=DEV)
        assert torch.equal(got[4], rope_store_kv_ref(q, k, v, kv[0], kv[1], slots, pos, cos_sin))
        assert torch.equal(got[5], kv)
    torch.testing.assert_close(got[0].float(), rq.float(), atol=6e-2, rtol=2e-2)


@pytest.mark.parametrize("tiles", [(1, 16, 4), (2, 4, 2), (16, 8, 1)])
def test_rope_store_kv_tiles_override(tiles):
    """rope_store_kv with its launch tiles given (the GPU benchmark's one-token-a-program baseline and
    odd blocks: a partial last block, q in several chunks) writes what the chosen tiles write."""
    q, k, v, slots, pos, cos_sin, _ = rope_store_case(14, 2, 64, torch.float16, 7, False, T=9, page=4, blocks=6)
    outs = []
    for t in (None, tiles):
        kv = torch.full((2, 6, 4, 2, 64), 7.0, dtype=torch.float16, device=DEV)
        outs.append((rope_store_kv_triton(q, k, v, kv[0], kv[1], slots, pos, cos_sin, tiles=t), kv))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


# ----------------------------------------------------------------------------- MLP activation


def silu_and_mul_f64(x):
    g, u = x.double().chunk(2, -1)
    return g / (1 + torch.exp(-g)) * u


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T,I", [(1, 1), (7, 5), (64, 64), (7, 1000), (64, 1100), (1, 4864)])
def test_silu_and_mul(dtype, T, I):
    """The reference against float64 and against the model's former `F.silu(gate) * up` (bit for bit);
    the Triton kernel against the reference, with the interpreter's whole-row block, the GPU's block
    of 1024 columns and one of 256 (I = 1000, 1100, 4864 end in a partial block), on a row-strided
    view of a wider tensor."""
    gen = torch.Generator().manual_seed(T * 10007 + I)
    wide = (torch.randn(T, 2 * I + 6, generator=gen) * 3).to(dtype).to(DEV)
    x = wide[:, 3 : 3 + 2 * I]  # rows 2 * I + 6 apart, not contiguous
    ref = silu_and_mul_ref(x)
    gate, up = x.chunk(2, dim=-1)
    assert torch.equal(ref, torch.nn.functional.silu(gate) * up) and ref.shape == (T, I) and ref.dtype == dtype
    # two roundings to the activation dtype: silu(gate), then the product
    f64_tol = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(ref.double(), silu_and_mul_f64(x), atol=1e-6, rtol=f64_tol)
    for block in (None, GPU_BLOCK, 256):
        got = silu_and_mul_triton(x, block=block)
        assert got.shape == ref.shape and got.dtype == dtype
        if dtype == torch.float32:  # exp differs from torch's by an ulp at most
            torch.testing.assert_close(got, ref, atol=0, rtol=1e-6)
        elif dtype == torch.float16 or ON_GPU:
            # the same roundings as the reference: bit-equal but where an ulp of fp32 exp tips one;
            # a kernel rounding only the product matches on ~73% of them
            assert (got == ref).float().mean() > 0.995, (got == ref).float().mean()
            torch.testing.assert_close(got.float(), ref.float(), atol=1e-6, rtol=2 * torch.finfo(dtype).eps)
        else:  # the interpreter truncates fp32 -> bf16 casts: within two bf16 ulps
            torch.testing.assert_close(got.float(), ref.float(), atol=1e-6, rtol=2e-2)


def test_silu_and_mul_shapes_dispatch_and_errors():
    """Leading dims are kept, a transposed (column-strided) input is copied rather than misread,
    empty inputs give empty outputs, the dispatcher follows its triton argument, and an odd last dim or an
    integer tensor is one clear line from both paths."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(2, 3, 40, generator=gen).to(DEV)
    torch.testing.assert_close(silu_and_mul_triton(x), silu_and_mul_ref(x), atol=0, rtol=1e-6)
    assert silu_and_mul_triton(x).shape == (2, 3, 20)
    xt = torch.randn(40, 5, generator=gen).to(DEV).t()  # [5, 40] with stride(-1) == 5
    torch.testing.assert_close(silu_and_mul_triton(xt), silu_and_mul_ref(xt), atol=0, rtol=1e-6)
    assert silu_and_mul_triton(x[:0]).shape == (0, 3, 20)
    torch.testing.assert_close(silu_and_mul(xt, triton=True), silu_and_mul_ref(xt), atol=0, rtol=1e-6)
    assert torch.equal(silu_and_mul(xt, triton=False), silu_and_mul_ref(xt))
    for bad in (torch.randn(3, 7), torch.zeros(3, 8, dtype=torch.int32), torch.tensor(1.0)):
        for fn in (silu_and_mul_ref, silu_and_mul_triton):
            with pytest.raises(ValueError, match=r"silu_and_mul needs a floating-point \[\.\.\., 2 \* I\]") as e:
                fn(bad.to(DEV))
            assert "\n" not in str(e.value)
