"""Cascade (shared-prefix) decode attention against the plain paged reference and float64 dense math,
on random caches and awkward block tables; and the engine's step-to-step own-K/V buffers."""

import random

import pytest
import torch

import bstar.kernels.cascade_attention as cascade_mod
import bstar.kernels.dense_decode_attention as dense_mod
from bstar.engine import LLM, SamplingParams
from bstar.engine.core.prompt_forward import forward_prompts
from bstar.engine.runner.cpu.decode_state import CpuDecodeState
from bstar.kernels import native
from bstar.kernels.cascade_attention import CascadeBuffers, build_cascade_plan, cascade_decode_attention
from bstar.kernels.decode_attention import paged_decode_attention_ref
from bstar.testing.model_factory import make_model


def dense_f64(q, k_cache, v_cache, table, n, scale):
    """One row: q [Hq, D] against its first n cached tokens, float64 -> [Hq, D]."""
    bs, hkv = k_cache.shape[1], k_cache.shape[2]
    blocks = torch.tensor(table[: -(-n // bs)])
    k = k_cache[blocks].reshape(-1, hkv, k_cache.shape[-1])[:n].double()
    v = v_cache[blocks].reshape(-1, hkv, v_cache.shape[-1])[:n].double()
    g = q.shape[0] // hkv
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    s = torch.einsum("hd,lhd->hl", q.double(), k) * scale
    return torch.einsum("hl,lhd->hd", torch.softmax(s, -1), v)


def padded(tables):
    w = max(map(len, tables))
    return torch.tensor([t + [-1] * (w - len(t)) for t in tables], dtype=torch.int32)


def awkward_case(seed, bs, hq, hkv, d=16):
    """Tables mixing: sibling groups with a shared prefix (and a shared partial block before CoW),
    a shared block in the middle that is not a common prefix, rows whose keys all lie in the shared
    prefix, a group whose rows are too short for a full shared block, singletons, -1 padding."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    num_blocks = 200
    free = list(range(num_blocks))
    rng.shuffle(free)
    take = free.pop
    tables, lens = [], []
    for _ in range(3):  # sibling groups
        pre = [take() for _ in range(rng.randint(1, 4))]
        partial = take()
        for _ in range(rng.randint(2, 5)):
            mode = rng.random()
            if mode < 0.2:  # still on the shared partial block (no token of its own yet)
                tables.append(pre + [partial]), lens.append(len(pre) * bs + rng.randint(1, bs))
            elif mode < 0.3:  # every key in the shared prefix
                tables.append(list(pre)), lens.append(len(pre) * bs)
            else:
                own = [take() for _ in range(rng.randint(1, 3))]
                tables.append(pre + own), lens.append((len(pre) + len(own) - 1) * bs + rng.randint(1, bs))
    mid = take()  # shared by two unrelated rows, at different positions
    a, b = [take(), mid, take()], [take(), take(), mid]
    tables += [a, b]
    lens += [2 * bs + 3, 3 * bs]
    short = take()  # same first block, shorter than one block: no prefix to share
    tables += [[short], [short]]
    lens += [3, bs - 1]
    tables.append([take()]), lens.append(1)
    order = list(range(len(tables)))
    rng.shuffle(order)  # siblings need not be adjacent rows
    tables, lens = [tables[i] for i in order], [lens[i] for i in order]
    k = torch.randn(num_blocks, bs, hkv, d, generator=gen)
    v = torch.randn(num_blocks, bs, hkv, d, generator=gen)
    q = torch.randn(len(tables), hq, d, generator=gen)
    return q, k, v, tables, lens


@pytest.mark.parametrize("seed,bs,hq,hkv", [(0, 4, 4, 4), (1, 8, 8, 2), (2, 16, 8, 1), (3, 4, 12, 4), (4, 8, 2, 2)])
def test_cascade_matches_reference_and_float64(seed, bs, hq, hkv):
    q, k, v, tables, lens = awkward_case(seed, bs, hq, hkv)
    plan = build_cascade_plan(tables, lens, bs)
    assert plan.num_prefix_blocks > 0  # the case does exercise the shared-prefix path
    out = cascade_decode_attention(q, k, v, plan, scale=0.37)
    ref = paged_decode_attention_ref(q, k, v, padded(tables), torch.tensor(lens, dtype=torch.int32), scale=0.37)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=2e-6)
    for r in range(len(tables)):
        torch.testing.assert_close(
            out[r].double(), dense_f64(q[r], k, v, tables[r], lens[r], 0.37), atol=1e-5, rtol=1e-5
        )


def test_plan_groups_only_full_common_leading_blocks():
    bs = 4
    tables = [[7, 8, 9, 1], [7, 8, 9, 2], [7, 8, 3], [5, 6], [5, 6]]
    lens = [14, 13, 9, 8, 5]
    plan = build_cascade_plan(tables, lens, bs)
    # group {0,1,2}: blocks 7, 8 (9 is not in row 2); group {3,4}: block 5 (6 is partial for row 4)
    assert plan.prefix_blocks.tolist() == [[7, 8], [5, 0]]
    assert plan.own_tables == [[9, 1], [9, 2], [3], [6], [6]]
    assert plan.own_len == 6  # row 0: 14 - 8 keys of its own
    assert plan.prefix_bias[1, 0, 0].isinf().tolist() == [False] * 4 + [True] * 4
    with pytest.raises(ValueError, match="needs 3 blocks"):
        build_cascade_plan([[1, 2]], [9], bs)


def test_plan_without_sharing_is_the_plain_reference():
    gen = torch.Generator().manual_seed(5)
    k, v = torch.randn(20, 4, 2, 8, generator=gen), torch.randn(20, 4, 2, 8, generator=gen)
    q = torch.randn(3, 4, 8, generator=gen)
    tables, lens = [[3, 4], [5], [6, 7, 8]], [6, 2, 9]
    plan = build_cascade_plan(tables, lens, 4)
    assert plan.num_prefix_blocks == 0
    ref = paged_decode_attention_ref(q, k, v, padded(tables), torch.tensor(lens, dtype=torch.int32))
    torch.testing.assert_close(cascade_decode_attention(q, k, v, plan), ref, atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("in_step", [False, True])
@pytest.mark.parametrize("pass_new", [False, True])
def test_buffers_across_steps_match_reference(pass_new, in_step):
    """Fresh fill, then appends of one token per row (crossing block boundaries) with the group
    prefix reused, then a refill; the newest K/V read back from the cache or handed in. Rows whose own
    parts grow in step (siblings) take the strided write, ragged ones the indexed write."""
    bs, hq, hkv, d = 4, 4, 2, 8
    gen = torch.Generator().manual_seed(11)
    k, v = torch.randn(64, bs, hkv, d, generator=gen), torch.randn(64, bs, hkv, d, generator=gen)
    pre = [0, 1]
    tables = [pre + [10], pre + [20], [30, 31]]
    lens = [2 * bs + 1, 2 * bs + 1, 1] if in_step else [2 * bs + 1, 2 * bs + 3, 6]
    next_block = iter(range(40, 64))
    bufs = CascadeBuffers(torch.zeros(3, 8 * bs, hkv, d), torch.zeros(3, 8 * bs, hkv, d))
    for step in range(7):
        plan = build_cascade_plan(tables, lens, bs)
        plan.own_fresh = plan.prefix_fresh = step in (0, 5)
        assert (plan.new_pos_same is not None) == in_step
        q = torch.randn(3, hq, d, generator=gen)
        new = None
        if pass_new:
            slots = [tables[r][(lens[r] - 1) // bs] * bs + (lens[r] - 1) % bs for r in range(3)]
            new = (k.view(-1, hkv, d)[slots].clone(), v.view(-1, hkv, d)[slots].clone())
        out = cascade_decode_attention(q, k, v, plan, 0.5, bufs, new)
        ref = paged_decode_attention_ref(q, k, v, padded(tables), torch.tensor(lens, dtype=torch.int32), 0.5)
        torch.testing.assert_close(out, ref, atol=2e-6, rtol=2e-6)
        for r in range(3):  # the next token of each row: a fresh block at a boundary, then its K/V
            if lens[r] % bs == 0:
                tables[r].append(next(next_block))
            blk, off = tables[r][lens[r] // bs], lens[r] % bs
            k[blk, off], v[blk, off] = torch.randn(hkv, d, generator=gen), torch.randn(hkv, d, generator=gen)
            lens[r] += 1
    # stale buffers (appends skipped, or a prefix changed behind the plan's back) must show:
    # the checks above are not vacuous
    plan = build_cascade_plan(tables, lens, bs)
    plan.own_fresh = plan.prefix_fresh = False
    q = torch.randn(3, hq, d, generator=gen)
    ref = paged_decode_attention_ref(q, k, v, padded(tables), torch.tensor(lens, dtype=torch.int32), 0.5)
    torch.testing.assert_close(cascade_decode_attention(q, k, v, plan, 0.5, bufs), ref, atol=2e-6, rtol=2e-6)
    saved = bufs.own_k.clone()
    bufs.own_k.zero_()
    assert not torch.allclose(cascade_decode_attention(q, k, v, plan, 0.5, bufs), ref, atol=1e-3)
    bufs.own_k.copy_(saved)
    bufs.pre_k = torch.randn_like(bufs.pre_k)
    assert not torch.allclose(cascade_decode_attention(q, k, v, plan, 0.5, bufs), ref, atol=1e-3)


def test_rows_in_group_order_take_no_shuffle():
    """Rows already group-major (as the scheduler orders siblings) give the same result as the same
    rows shuffled, and the plan says so."""
    bs, hq, hkv, d = 4, 8, 2, 16
    gen = torch.Generator().manual_seed(3)
    k, v = torch.randn(40, bs, hkv, d, generator=gen), torch.randn(40, bs, hkv, d, generator=gen)
    tables = [[0, 1, 2 + i] for i in range(3)] + [[10, 11, 12, 20 + i] for i in range(3)]
    lens = [2 * bs + 1 + i for i in range(3)] + [3 * bs + 2 + i for i in range(3)]
    q = torch.randn(6, hq, d, generator=gen)
    plan = build_cascade_plan(tables, lens, bs)
    assert plan.rows_in_order and plan.num_prefix_blocks == 3
    ref = paged_decode_attention_ref(q, k, v, padded(tables), torch.tensor(lens, dtype=torch.int32), 0.3)
    torch.testing.assert_close(cascade_decode_attention(q, k, v, plan, 0.3), ref, atol=2e-6, rtol=2e-6)
    perm = [3, 0, 4, 1, 5, 2]
    plan = build_cascade_plan([tables[i] for i in perm], [lens[i] for i in perm], bs)
    assert not plan.rows_in_order
    torch.testing.assert_close(cascade_decode_attention(q[perm], k, v, plan, 0.3), ref[perm], atol=2e-6, rtol=2e-6)


def require_native():
    """The C kernel must build wherever a compiler is (CI's machines have gcc): never a silent skip."""
    if native.shutil.which(native.os.environ.get("CC") or "gcc") is None:
        pytest.skip("no C compiler: the CPU kernels fall back to torch")
    assert native.load("dense_decode_attention") is not None


def own_f64(q, k, v, lens, scale):
    """Independent reference of dense decode attention in float64: q [B, H, G, D], k/v [B, L, H, D]."""
    B, L = k.shape[:2]
    s = torch.einsum("bhgd,blhd->bhgl", q.double(), k.double()) * scale
    n = torch.full((B,), L) if lens is None else lens
    s = s.masked_fill((torch.arange(L) >= n[:, None])[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)
    return torch.einsum("bhgl,blhd->bhgd", p, v.double()), lse


@pytest.mark.parametrize("native_kernel", [True, False])
@pytest.mark.parametrize("H,G,D", [(4, 2, 32), (2, 7, 64), (1, 1, 128), (3, 4, 48), (8, 8, 16)])
@pytest.mark.parametrize("L", [1, 31, 33, 100])
@pytest.mark.parametrize("layout", ["buffer", "head_major"])
def test_dense_decode_attention_matches_float64(monkeypatch, native_kernel, H, G, D, L, layout):
    """Own-part attention on random inputs, in the C kernel (blocks of 32 keys: lengths around one
    block, several blocks, one key) and in the torch reference: rows of mixed lengths (some with no
    key: out 0, lse -inf) or all of length L, K/V as views of the engine's token-major buffers or of
    head-major storage."""
    if native_kernel:
        require_native()
        monkeypatch.setattr(dense_mod, "dense_decode_attention_ref", None)  # must not be reached
    else:
        monkeypatch.setenv("BSTAR_CPU_NATIVE", "0")
    gen = torch.Generator().manual_seed(L * 100 + D)
    B, cap = 6, L + 9
    if layout == "buffer":  # [B, cap, H, D] buffers, the first L tokens of each row
        k, v = (torch.randn(B, cap, H, D, generator=gen)[:, :L] for _ in range(2))
    else:  # [B, H, cap, D] storage seen as [B, L, H, D]
        k, v = (torch.randn(B, H, cap, D, generator=gen)[:, :, :L].transpose(1, 2) for _ in range(2))
    q = torch.randn(B, H, G, D, generator=gen)
    for lens in (None, torch.tensor([L, 0, L // 2, 1, L - 1, 0])):
        out, lse = dense_mod.dense_decode_attention(q, k, v, lens, 0.3)
        ref_out, ref_lse = own_f64(q, k, v, lens, 0.3)
        torch.testing.assert_close(out.double(), ref_out, atol=2e-6, rtol=2e-5)
        torch.testing.assert_close(lse.double(), ref_lse, atol=2e-6, rtol=2e-6)
        if lens is not None:
            assert (out[lens == 0] == 0).all() and (lse[lens == 0] == float("-inf")).all()
    # the comparison can fail: other queries give other outputs (with one key: another lse)
    out, lse = dense_mod.dense_decode_attention(q * 1.5, k, v, None, 0.3)
    ref_out, ref_lse = own_f64(q, k, v, None, 0.3)
    assert not (torch.allclose(out.double(), ref_out, atol=1e-3) and torch.allclose(lse.double(), ref_lse, atol=1e-3))


def test_dense_decode_attention_falls_back_where_the_kernel_cannot_run(monkeypatch, recwarn):
    """float64 inputs, too many query heads per row, a compiler that fails (one warning) or
    BSTAR_CPU_NATIVE=0: the torch reference runs and gives the same result; and loading the kernel
    does not turn on flush-to-zero for the process (gcc < 13 links that in with -ffast-math)."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(3, 8, 9, 32, generator=gen), *(torch.randn(3, 20, 8, 32, generator=gen) for _ in range(2))
    small = q[:, :2], k[:, :, :2], v[:, :, :2]

    def check(q, k, v):
        out, lse = dense_mod.dense_decode_attention(q, k, v, None, 0.2)
        ref_out, ref_lse = own_f64(q, k, v, None, 0.2)
        torch.testing.assert_close(out.double(), ref_out, atol=2e-6, rtol=2e-5)
        torch.testing.assert_close(lse.double(), ref_lse, atol=2e-6, rtol=2e-6)

    assert not dense_mod.native_fits(q, k, v, None)  # 72 query heads per row
    assert not dense_mod.native_fits(*(t.double() for t in small), None)
    assert dense_mod.native_fits(*small, None)
    qs, ks, vs = small
    assert not dense_mod.native_fits(qs, ks[:2], vs[:2], None)  # shapes that disagree: never raw pointers
    assert not dense_mod.native_fits(qs, ks, vs[:, :5], None)
    assert not dense_mod.native_fits(qs, ks, vs, torch.zeros(2, dtype=torch.long))
    check(q, k, v)
    monkeypatch.setenv("CC", "false")  # a compiler that always fails
    assert native.load("dense_decode_attention") is None
    assert sum("not built" in str(w.message) for w in recwarn) == 1
    check(*small)
    monkeypatch.delenv("CC")
    monkeypatch.setenv("BSTAR_CPU_NATIVE", "0")
    assert native.load("dense_decode_attention") is None
    check(*small)
    monkeypatch.setenv("BSTAR_CPU_NATIVE", "yes")
    with pytest.raises(ValueError, match="BSTAR_CPU_NATIVE"):
        native.load("dense_decode_attention")
    monkeypatch.delenv("BSTAR_CPU_NATIVE")
    require_native()
    assert (torch.tensor([1e-39]) / 2).item() > 0  # denormals survive the library's load
    torch.set_default_dtype(torch.float64)  # the kernel's outputs are float32 whatever the default
    try:
        check(*small)
    finally:
        torch.set_default_dtype(torch.float32)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_model(str(tmp_path_factory.mktemp("casc") / "m"), "llama", seed=4, tokenizer=False)


@pytest.mark.parametrize("native_kernel", [True, False])
def test_engine_with_cascade_equals_plain_decode(tiny, monkeypatch, native_kernel):
    """Sampled candidates (shared prompt blocks, CoW, block boundaries, a preempting small cache)
    give the same tokens and logprobs with the cascade path as with the plain decode reference,
    the own parts in the C kernel or in the torch reference."""
    if native_kernel:
        require_native()
    monkeypatch.setenv("BSTAR_CPU_NATIVE", "1" if native_kernel else "0")
    ref_calls = []
    ref = dense_mod.dense_decode_attention_ref
    monkeypatch.setattr(dense_mod, "dense_decode_attention_ref", lambda *a: ref_calls.append(1) or ref(*a))
    prompts = [list(range(3, 3 + 21)), list(range(40, 40 + 9)), list(range(100, 100 + 33))]
    params = SamplingParams(n=5, temperature=1.0, max_tokens=24, ignore_eos=True, seed=1, logprobs=0)

    def run(**kw):
        llm = LLM(tiny, dtype="float32", device="cpu", block_size=4, **kw)
        outs = [c for o in llm.generate(prompts, params, use_tqdm=False) for c in o.outputs]
        return [c.token_ids for c in outs], [c.cumulative_logprob for c in outs]

    fast, small = run(), run(num_kv_blocks=40)
    assert bool(ref_calls) != native_kernel  # the own parts ran where the test says
    monkeypatch.setattr(CpuDecodeState, "plan", lambda *a, **k: None)  # decode rows take the plain path
    plain = run()
    for got in (fast, small):
        assert got[0] == plain[0]
        assert got[1] == pytest.approx(plain[1], abs=1e-4)


@pytest.mark.parametrize("max_num_seqs", [256, 8])
def test_rows_leaving_and_joining_keep_the_others_buffers(tiny, monkeypatch, max_num_seqs):
    """Candidates stopping at scattered steps (and, with 8 sequences at most, others joining as they
    finish): the rows still decoding keep their own K/V (moved to their new rows of the buffers, not
    gathered again from the paged cache), only joining rows are gathered, and every output equals the
    plain path."""
    prompts = [list(range(3, 3 + 21)), list(range(40, 40 + 9)), list(range(100, 100 + 33))]
    stops = list(range(200, 216))  # 5% of the vocabulary: candidates stop at scattered steps
    params = SamplingParams(n=6, temperature=1.0, max_tokens=40, seed=2, stop_token_ids=stops, logprobs=0)
    moves, full, partial = [], [], []
    move_rows, own_keys = CpuDecodeState._move_rows, cascade_mod._own_keys

    def counting_move_rows(self, rows, own_len):
        moves.append(sum(i >= 0 and i != b for b, i in enumerate(rows)))
        return move_rows(self, rows, own_len)

    def counting_own_keys(cache, buf, plan, *a):
        full.append(buf is None or plan.own_fresh)
        partial.append(not full[-1] and plan.fresh_rows is not None)
        return own_keys(cache, buf, plan, *a)

    monkeypatch.setattr(CpuDecodeState, "_move_rows", counting_move_rows)
    monkeypatch.setattr(cascade_mod, "_own_keys", counting_own_keys)

    def run():
        llm = LLM(tiny, dtype="float32", device="cpu", block_size=4, max_num_seqs=max_num_seqs)
        outs = [c for o in llm.generate(prompts, params, use_tqdm=False) for c in o.outputs]
        return [c.token_ids for c in outs], [c.cumulative_logprob for c in outs]

    fast = run()
    assert len(set(map(len, fast[0]))) > 5  # the candidates stopped at many different steps
    assert sum(m > 0 for m in moves) >= 5  # rows moved to new buffer rows instead of a re-gather
    # full gathers from the paged cache: the first decode step and block-table changes, not every step the
    # batch changed
    assert sum(full) < len(full) // 3
    if max_num_seqs == 8:
        assert sum(partial) >= 3  # rows joined mid-batch and only they were gathered
    monkeypatch.setattr(CpuDecodeState, "plan", lambda *a, **k: None)  # decode rows take the plain path
    plain = run()
    assert fast[0] == plain[0]
    assert fast[1] == pytest.approx(plain[1], abs=1e-4)


def test_write_back_keeps_the_cache_whole(tiny, monkeypatch):
    """Steady decode steps keep their new K/V out of the paged cache until a write-back. Whatever
    reads those slots later must see them: candidates that stop at different steps, an aborted
    request, later requests whose prompts reuse generated blocks from the prefix cache, and a
    prompt-only forward over them. Everything equals the plain decode path."""
    from bstar.engine.config import EngineConfig
    from bstar.engine.core.llm_engine import LLMEngine

    p0, p1 = list(range(3, 3 + 21)), list(range(60, 60 + 14))
    stops = list(range(200, 212))  # about 4% of the vocabulary: candidates stop at scattered steps

    def drive(eng, rid, prompt, params, abort_after=None):
        eng.add_request(rid, prompt, params)
        steps = 0
        while eng.has_unfinished_requests():
            for out in eng.step():
                return out
            steps += 1
            if abort_after is not None and steps == abort_after:
                seqs = [s for s in eng.scheduler.running if s.request_id == rid]
                longest = max(seqs, key=len).token_ids
                eng.abort_request(rid)
                return longest

    def run():
        eng = LLMEngine(tiny, dtype="float32", device="cpu", engine_config=EngineConfig(block_size=4))
        a = drive(
            eng, "a", p0, SamplingParams(n=6, temperature=1.0, max_tokens=40, seed=5, stop_token_ids=stops, logprobs=0)
        )
        a_out = [(c.token_ids, c.cumulative_logprob, c.finish_reason) for c in a.outputs]
        cut = drive(
            eng, "c", p1, SamplingParams(n=3, temperature=1.0, max_tokens=40, ignore_eos=True, seed=6), abort_after=17
        )
        longest = max(a.outputs, key=lambda c: len(c.token_ids))
        reuse = p0 + longest.token_ids[:16]
        b = drive(
            eng, "b", reuse, SamplingParams(n=2, temperature=1.0, max_tokens=8, ignore_eos=True, seed=7, logprobs=0)
        )
        d = drive(
            eng, "d", cut, SamplingParams(n=2, temperature=1.0, max_tokens=8, ignore_eos=True, seed=8, logprobs=0)
        )
        hits = eng.block_manager.prefix_hits
        logits = [lg for _, _, lg in forward_prompts(eng, [reuse, cut], use_prefix_cache=False)]
        later = [(c.token_ids, c.cumulative_logprob) for r in (b, d) for c in r.outputs]
        return a_out, later, hits, logits, [c.finish_reason for c in a.outputs]

    fast = run()
    assert len(set(map(len, (t for t, _, _ in fast[0])))) > 1  # the candidates stopped at different steps
    assert fast[2] >= 8 * 4  # b and d took generated blocks from the prefix cache
    monkeypatch.setattr(CpuDecodeState, "plan", lambda *a, **k: None)  # decode rows take the plain path
    plain = run()
    assert [t for t, _, _ in fast[0]] == [t for t, _, _ in plain[0]]
    assert [lp for _, lp, _ in fast[0]] == pytest.approx([lp for _, lp, _ in plain[0]], abs=1e-4)
    assert [t for t, _ in fast[1]] == [t for t, _ in plain[1]]
    assert [lp for _, lp in fast[1]] == pytest.approx([lp for _, lp in plain[1]], abs=1e-4)
    for x, y in zip(fast[3], plain[3]):
        torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-4)


def test_prompt_forward_right_after_write_back_reads_the_written_tokens(tiny):
    """A request's last decode steps leave their K/V only in the cascade buffers (write-back). A
    prompt forward that follows at once and takes those blocks from the prefix cache must see them
    (CpuRunner.prepare flushes before a forward without decode rows)."""
    from bstar.engine.config import EngineConfig
    from bstar.engine.core.llm_engine import LLMEngine

    eng = LLMEngine(tiny, dtype="float32", device="cpu", engine_config=EngineConfig(block_size=4))
    prompt = list(range(3, 3 + 21))
    eng.add_request("a", prompt, SamplingParams(n=2, temperature=1.0, max_tokens=24, ignore_eos=True, seed=3))
    outs = []
    while eng.has_unfinished_requests():
        outs += eng.step()
    assert eng.runner.cpu_decode._dirty > 1  # the last steps' K/V are not in the paged cache yet
    # candidate 0 computed 21 + 23 = 44 tokens: 11 full blocks in the prefix cache, the newest ones dirty
    ids = prompt + outs[0].outputs[0].token_ids + [5]
    [(_, first, cached)] = list(forward_prompts(eng, [ids], use_prefix_cache=True))
    assert first == 44
    [(_, _, whole)] = list(forward_prompts(eng, [ids], use_prefix_cache=False))
    torch.testing.assert_close(cached, whole[first:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("lens_equal", [True, False])
def test_shared_partial_block_joins_the_prefix(lens_equal):
    """Siblings whose prompt ends inside a block each hold a copy of that block: with share ids
    the group prefix takes the copied prompt tokens from the first row, own parts start mid-block,
    and with own parts of one length no mask is built. Results equal the plain reference; and a
    copy that differs shows, so the sharing claim matters."""
    bs, hq, hkv, d = 4, 4, 2, 8
    gen = torch.Generator().manual_seed(21)
    k, v = torch.randn(40, bs, hkv, d, generator=gen), torch.randn(40, bs, hkv, d, generator=gen)
    prompt = 2 * bs + 3  # two shared full blocks, 3 prompt tokens in each row's copy of block 2
    copies = [10, 11, 12]
    for c in copies[1:]:
        k[c, :3], v[c, :3] = k[copies[0], :3], v[copies[0], :3]
    tables = [[0, 1, c, 20 + i] for i, c in enumerate(copies)] + [[5, 6]]  # and a row on its own
    lens = [prompt + 3] * 3 + [3] if lens_equal else [prompt + 3, prompt + 2, prompt + 4, 6]
    q = torch.randn(4, hq, d, generator=gen)
    plan = build_cascade_plan(tables, lens, bs, shared_lens=[prompt] * 3 + [0], share_ids=["r", "r", "r", "x"])
    assert plan.own_offsets[:3] == [3, 3, 3] and plan.num_prefix_blocks == 3
    assert (plan.own_lens_t is None) == lens_equal
    ref = paged_decode_attention_ref(q, k, v, padded(tables), torch.tensor(lens, dtype=torch.int32), 0.5)
    torch.testing.assert_close(cascade_decode_attention(q, k, v, plan, 0.5), ref, atol=2e-6, rtol=2e-6)
    bufs = CascadeBuffers(torch.zeros(4, 8 * bs, hkv, d), torch.zeros(4, 8 * bs, hkv, d))
    torch.testing.assert_close(cascade_decode_attention(q, k, v, plan, 0.5, bufs), ref, atol=2e-6, rtol=2e-6)
    # Different share ids: no extension (offsets 0), same result.
    plain = build_cascade_plan(tables, lens, bs, shared_lens=[prompt] * 3 + [0], share_ids=["r", "s", "r", "x"])
    assert plain.own_offsets == [0, 0, 0, 0]
    torch.testing.assert_close(cascade_decode_attention(q, k, v, plain, 0.5), ref, atol=2e-6, rtol=2e-6)
    k[copies[1], 1] += 1.0  # the copies now differ: claiming they are shared gives a wrong answer
    ref = paged_decode_attention_ref(q, k, v, padded(tables), torch.tensor(lens, dtype=torch.int32), 0.5)
    assert not torch.allclose(cascade_decode_attention(q, k, v, plan, 0.5), ref, atol=1e-3)
