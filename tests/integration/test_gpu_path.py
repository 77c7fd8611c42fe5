"""The engine's GPU code path, run in CI on CPU tensors (BSTAR_KERNELS=triton, TRITON_INTERPRET=1).

Every Triton kernel, the persistent step inputs, the device block tables and the padded decode
buckets of the CUDA graphs run here exactly as on a GPU, except that nothing is captured (a
"replay" is the same forward on the same padded buffers). Checked against transformers (greedy
output, with chunked prefill, a tight KV budget and n > 1 copy-on-write) and against freshly
built block tables after every step; plus the no-recompile guarantee, read off Triton's own
binder for every launch. Only speed needs a GPU (bench/gpu_check.py).
"""

import contextlib
import functools
import os
import random
import sys
from pathlib import Path

import pytest
import torch

from bstar.engine import LLM, SamplingParams
from bstar.engine.config import EngineConfig
from bstar.engine.core.block_manager import BlockManager
from bstar.engine.core.scheduler import Scheduler
from bstar.engine.core.sequence import Sequence
from bstar.engine.entrypoints.sampling_params import SamplingParams as SP
from bstar.engine.runner.gpu.cuda_graphs import bucket_sizes
from bstar.engine.runner.gpu.step_inputs import PAD_SLOT, StepInputs
from bstar.kernels.launch import record_variants
from bstar.testing.model_factory import hf_model, make_model

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),  # numpy inf/nan in masked interpreter lanes
]

CPU = torch.device("cpu")
REPO = Path(__file__).resolve().parents[2]
# Kernels on CPU tensors need the interpreter (tests/conftest.py sets it where CUDA is absent; on a GPU
# machine bench/gpu_check.py runs these checks natively).
needs_interpreter = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="Triton kernels on CPU tensors need TRITON_INTERPRET=1"
)


@pytest.fixture
def triton_path(monkeypatch):
    monkeypatch.setenv("BSTAR_KERNELS", "triton")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu_path")
    return {
        "llama": make_model(str(root / "llama"), "llama", seed=1, tokenizer=False, max_position_embeddings=256),
        # GQA 4:1 and q/k/v biases
        "qwen2": make_model(str(root / "qwen2"), "qwen2", seed=3, tokenizer=False, num_key_value_heads=1),
    }


def _prompts(seed, lengths, vocab=320):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def _hf_greedy(path, prompt, n):
    ids = hf_model(path).generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return ids[0, len(prompt) :].tolist()


def assert_tables_fresh(inputs: StepInputs, batch, block_tables: torch.Tensor):
    """The device block tables equal tables built afresh from the sequences: each sequence's keyed
    row, and the batch-order gather the kernels read (padded rows: the all-zero row 0)."""
    table = inputs.tables.table.cpu()
    gathered = block_tables.cpu()
    assert not table[0].any()
    for b, s in enumerate(batch.seqs):
        n = len(s.block_table)
        assert table[inputs.tables.row_of[s.seq_id], :n].tolist() == s.block_table
        assert gathered[b, :n].tolist() == s.block_table
    assert not gathered[len(batch.seqs) :].any()


class Spy:
    """Wraps StepInputs.prepare: checks the tables and the buffers' addresses after every step."""

    def __init__(self, inputs: StepInputs):
        self.inputs, self.prepare = inputs, inputs.prepare
        self.ptrs = [b.data_ptr() for b in self._buffers()]
        self.steps = []  # (rows, pad_to)
        inputs.prepare = self

    def _buffers(self):
        i = self.inputs
        return [i.input_ids, i.positions, i.slot_mapping, i.seq_lens, i.block_tables]

    def __call__(self, batch, pad_to=None):
        ids, pos, meta, sample = self.prepare(batch, pad_to)
        i = self.inputs
        assert [b.data_ptr() for b in self._buffers()] == self.ptrs  # persistent: never reallocated
        assert ids.data_ptr() == i.input_ids.data_ptr() and pos.data_ptr() == i.positions.data_ptr()
        assert meta.slot_mapping.data_ptr() == i.slot_mapping.data_ptr()
        assert meta.seq_lens.data_ptr() == i.seq_lens.data_ptr()
        assert meta.block_tables.data_ptr() == i.block_tables.data_ptr()
        assert_tables_fresh(i, batch, meta.block_tables)
        if pad_to is not None:  # padded rows: slot -1, length 0
            B = len(batch.seqs)
            assert (i.slot_mapping[B:pad_to] == PAD_SLOT).all() and not i.seq_lens[B:pad_to].any()
        self.steps.append((len(batch.seqs), pad_to))
        return ids, pos, meta, sample


def test_bucket_sizes():
    assert bucket_sizes(1) == [1]
    assert bucket_sizes(3) == [1, 2, 4]
    assert bucket_sizes(16) == [1, 2, 4, 8, 16]
    assert bucket_sizes(17) == [1, 2, 4, 8, 16, 32]
    assert bucket_sizes(256) == [1, 2, 4, 8, *range(16, 257, 16)]


def test_block_tables_follow_the_scheduler():
    """The scheduler and block manager alone (no model): requests with n > 1 (copy-on-write of the
    shared partial block), shared prefixes (prefix-cache hits), a KV budget tight enough to preempt,
    finishing sequences freeing their blocks and rows. After every step the device tables equal
    fresh ones, while only the changed entries were written."""
    bs = 4
    cfg = EngineConfig(block_size=bs, num_kv_blocks=40, max_num_seqs=12, max_num_batched_tokens=24)
    bm = BlockManager(cfg.num_kv_blocks, bs, enable_prefix_caching=True)
    sched = Scheduler(cfg, bm)
    inputs = StepInputs(64, 16, 16, bs, CPU)
    rng = random.Random(0)
    shared = [rng.randrange(3, 300) for _ in range(10)]
    for r in range(14):
        n = rng.choice([1, 1, 3])
        prompt = (shared if r % 3 == 0 else []) + [rng.randrange(3, 300) for _ in range(rng.randrange(2, 14))]
        params = SP(n=n, max_tokens=rng.randrange(3, 20), ignore_eos=True)
        sched.add(Sequence(f"r{r}", prompt, params, fork_count=n - 1))
    steps = written = copies = 0
    while sched.has_work():
        batch = sched.schedule()
        assert batch, "no progress"
        copies += len(batch.copies)
        before = inputs.tables.entries_written
        _, _, meta, _ = inputs.prepare(batch)
        assert_tables_fresh(inputs, batch, meta.block_tables)
        written += sum(len(s.block_table) for s in batch.seqs)
        steps += 1
        assert inputs.tables.entries_written - before <= sum(len(s.block_table) for s in batch.seqs)
        seqs, _ = sched.advance(batch)
        for s in seqs:
            s.append_token(rng.randrange(3, 300), 0.0, None)
            if s.num_output >= s.params.max_tokens:
                sched.finish(s, "length")
    assert sched.num_preemptions > 0 and copies > 0 and bm.prefix_hits > 0
    assert inputs.tables.entries_written < written / 3  # incremental: a fraction of a full rebuild
    assert inputs.tables.table.shape[0] > 64 or inputs.tables.row_of  # rows were reclaimed or grown


def test_step_token_buffers_start_aligned():
    """Token ids, positions and slots are rows of one buffer (one copy fills them), yet each starts
    as aligned as a buffer of its own: Triton specialises on pointer alignment (16 bytes), so a
    misaligned row after an odd max_tokens would need variants the warm-up never compiled."""
    for max_tokens in (15, 16, 17, 250):
        i = StepInputs(max_tokens, 8, 4, 4, CPU)
        for b in (i.input_ids, i.positions, i.slot_mapping):
            assert b.shape == (max_tokens,) and b.is_contiguous()
            assert b.data_ptr() % 16 == 0 and (b.data_ptr() - i.token_rows.data_ptr()) % 128 == 0
        assert (i.slot_mapping == PAD_SLOT).all() and not i.input_ids.any() and not i.positions.any()


@needs_interpreter
def test_gpu_path_greedy_chunked_prefill_padded_buckets(tiny, triton_path):
    """Llama through the padded decode buckets (CPU stand-in for the graphs) with chunked prefill:
    greedy output equals transformers; batches of 3 run padded to the bucket of 4 as the batch
    drains 3 -> 2 -> 1; and no launch needs a variant the start-up warm-up did not compile."""
    path = tiny["llama"]
    with record_variants() as warm:
        llm = LLM(path, dtype="float32", device="cpu", max_num_batched_tokens=16, max_num_seqs=4)
    runner = llm.engine.runner
    assert runner.graphs is not None and runner.graphs.sizes == [1, 2, 4]
    spy = Spy(runner.inputs)
    prompts = _prompts(2, [5, 19, 40])
    lengths = [12, 7, 3]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in lengths]
    with record_variants() as used:
        outs = llm.generate(prompts, params, use_tqdm=False)
    for p, n, o in zip(prompts, lengths, outs):
        assert o.outputs[0].token_ids == _hf_greedy(path, p, n)
    replays = runner.graphs.replays
    assert {4, 2, 1} <= set(replays) and (3, 4) in spy.steps  # 3 rows ran in the bucket of 4
    assert any(pad is None for _, pad in spy.steps)  # the chunked prefill steps ran eagerly
    for name, keys in used.items():
        assert keys <= warm.get(name, set()), f"{name}: a variant not compiled at start-up"
    assert {"_decode_split_kernel", "_rope_store_kv_kernel", "_chunk_draw_kernel"} <= set(used)


@needs_interpreter
def test_gpu_launch_configs_compile_nothing_after_start_up(tmp_path, triton_path):
    """The no-recompile guarantee with a GPU's launch configs (kernels.launch.as_gpu: tiles, one row
    per sampling program, autotune candidates, decode splits from the 1k-token block table the
    graphs read), run under the interpreter: an async-scheduled generate with chunked prefill,
    mixed steps, padded buckets (4 and 1), n > 1 sampled candidates with logprobs, penalties
    and min_tokens bans launches no variant the start-up did not compile. Greedy rows equal the
    interpreter configs' run."""
    from bstar.kernels.launch import as_gpu

    path = make_model(str(tmp_path / "llama"), "llama", seed=1, tokenizer=False, max_position_embeddings=1024)
    prompts = _prompts(2, [5, 19, 40, 9])
    params = [
        SamplingParams(temperature=0, max_tokens=9, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
        SamplingParams(n=2, temperature=0.9, top_p=0.8, top_k=12, seed=3, max_tokens=5, ignore_eos=True, logprobs=2),
        SamplingParams(temperature=1.0, seed=4, max_tokens=6, min_tokens=3, repetition_penalty=1.3, presence_penalty=1),
    ]
    opts = dict(dtype="float32", device="cpu", max_num_batched_tokens=16, max_num_seqs=4, async_scheduling=True)
    want = LLM(path, **opts).generate(prompts[:2], params[:2], use_tqdm=False)
    with as_gpu():
        with record_variants() as warm:
            llm = LLM(path, **opts)
        with record_variants() as used:
            outs = llm.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs[:2]] == [o.outputs[0].token_ids for o in want]
    assert [len(c.token_ids) for o in outs for c in o.outputs] == [9, 4, 5, 5, 6]
    for name, keys in used.items():
        assert keys <= warm.get(name, set()), f"{name}: a variant not compiled at start-up"
    # the graphs' decode splits a 1k context (the merge kernel); the split-vocabulary sampler
    assert {"_decode_split_kernel", "_decode_merge_kernel", "_rope_store_kv_kernel", "_chunk_draw_kernel"} <= set(used)
    assert {1, 4} <= set(llm.engine.runner.graphs.replays)


@needs_interpreter
def test_gpu_path_preemption_and_copy_on_write(tiny, triton_path):
    """Qwen2 (GQA 4:1, biases) eagerly (enforce_eager), n=2 candidates forking a shared prompt
    (copy-on-write of its partial block) and a KV budget that forces preemption: every candidate's
    greedy output equals transformers, and the block tables stay exact through frees and recomputes."""
    path = tiny["qwen2"]
    llm = LLM(path, dtype="float32", device="cpu", num_kv_blocks=7, block_size=8, enforce_eager=True)
    runner = llm.engine.runner
    assert runner.graphs is None and runner.inputs is not None
    spy = Spy(runner.inputs)
    prompts = _prompts(6, [13, 20, 9])
    sp = SamplingParams(n=2, temperature=0, max_tokens=10, ignore_eos=True)
    copies = []
    copy_blocks = runner.copy_blocks
    runner.copy_blocks = lambda pairs: copies.extend(pairs) or copy_blocks(pairs)
    outs = llm.generate(prompts, sp, use_tqdm=False)
    assert llm.engine.scheduler.num_preemptions > 0 and copies  # preempted, and a partial block copied on write
    assert all(pad is None for _, pad in spy.steps)
    for p, o in zip(prompts, outs):
        want = _hf_greedy(path, p, 10)
        assert [c.token_ids for c in o.outputs] == [want, want]
    assert llm.engine.block_manager.num_used == 0


@needs_interpreter
def test_gpu_path_prompt_forwards(tiny, monkeypatch):
    """LLM.compute_logits (the PRM's path too) on the GPU path, with more prompts than the largest decode
    bucket (the scheduler admits them max_num_seqs at a time, chunked): the torch path's logits."""
    prompts = _prompts(9, [3, 17, 1, 30, 8, 12])
    want = LLM(tiny["llama"], dtype="float32", device="cpu").compute_logits(prompts)
    monkeypatch.setenv("BSTAR_KERNELS", "triton")
    llm = LLM(tiny["llama"], dtype="float32", device="cpu", max_num_seqs=4)
    assert llm.engine.runner.inputs.block_tables.shape[0] == 4
    for a, b in zip(llm.compute_logits(prompts), want):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@needs_interpreter
def test_prm_scoring_on_the_gpu_path_compiles_nothing_after_start_up(tmp_path_factory, monkeypatch):
    """A PRM on the GPU path compiles its scoring kernels at start-up: scoring calls of 1, 16 and
    17 steps (Triton specialises integers equal to 1 or divisible by 16 unless told not to) need
    no variant the start-up did not make; the scores equal the torch path's."""
    from bstar.engine import PRM

    path = make_model(str(tmp_path_factory.mktemp("prm") / "lm"), "llama", seed=5, extra_tokens=("ки",))
    question = "Janet has 3 apples and buys 5 more."
    cands = ["The answer is 8.", "\n".join(f"step {i}" for i in range(16)), "\n".join(f"s {i}" for i in range(17))]
    torch_prm = PRM(path, dtype="float32", device="cpu")
    want = [torch_prm.score(question, [c])[0] for c in cands]
    monkeypatch.setenv("BSTAR_KERNELS", "triton")
    with record_variants() as warm:
        prm = PRM(path, dtype="float32", device="cpu")
    assert {"_prm_step_kernel", "_prm_aggregate_kernel"} <= set(warm)
    with record_variants() as used:
        got = [prm.score(question, [c])[0] for c in cands]  # one call each: 1, 16, 17 steps
    for name, keys in used.items():
        assert keys <= warm.get(name, set()), f"{name}: a variant not compiled at start-up"
    assert [len(g.step_scores) for g in got] == [1, 16, 17]
    for g, w in zip(got, want):
        torch.testing.assert_close(torch.tensor(g.step_scores), torch.tensor(w.step_scores), atol=1e-4, rtol=1e-4)


def test_cpu_default_path_untouched(tiny):
    """Without BSTAR_KERNELS the CPU engine keeps its torch path: the CPU runner (no persistent inputs, no
    buckets), torch attention."""
    from bstar.engine.runner.cpu.runner import CpuRunner

    llm = LLM(tiny["llama"], dtype="float32", device="cpu")
    assert type(llm.engine.runner) is CpuRunner and not hasattr(llm.engine.runner, "graphs")
    assert not llm.engine.model.backend.triton and not llm.engine.sampler.triton


def test_kernel_variants_do_not_depend_on_batch_size():
    """Qwen2.5-0.5B's attention and vocabulary shapes, batch sizes 1..256 (launches recorded, not
    run): one variant per kernel, so a batch draining from 256 to 1 compiles nothing new; and the
    prefill kernel's variant does not depend on how many decode rows precede the prefill rows."""
    from bstar.kernels.activation_triton import silu_and_mul_triton
    from bstar.kernels.decode_attention_triton import paged_decode_attention_triton
    from bstar.kernels.kv_store_triton import store_kv_triton
    from bstar.kernels.norm_rope_triton import apply_rotary_triton, qk_norm_rope_triton, rms_norm_triton
    from bstar.kernels.prefill_attention_triton import paged_prefill_attention_triton
    from bstar.kernels.rope_store_triton import rope_store_kv_triton
    from bstar.kernels.sampling_triton import sample_triton

    Hq, Hkv, D, page, W, V, H, I = 14, 2, 64, 16, 2048, 151936, 896, 4864
    k = torch.empty(64, page, Hkv, D, dtype=torch.bfloat16)
    tables = torch.zeros(256, W, dtype=torch.int32)
    lens = torch.ones(256, dtype=torch.int32)
    q = torch.empty(256, Hq, D, dtype=torch.bfloat16)
    qkv = torch.empty(256, (Hq + 2 * Hkv) * D, dtype=torch.bfloat16)
    x = torch.empty(256, H, dtype=torch.bfloat16)
    gate_up = torch.empty(256, 2 * I, dtype=torch.bfloat16)
    w = torch.empty(H, dtype=torch.bfloat16)
    qk_w = torch.empty(D, dtype=torch.bfloat16)  # Qwen3's per-head q/k norm
    cos_sin = torch.empty(4096, D)
    pos = torch.zeros(256, dtype=torch.int64)
    slots = torch.zeros(256, dtype=torch.int64)
    logits = torch.empty(256, V)
    f, i32 = torch.ones(256), torch.zeros(256, dtype=torch.int32)
    seeds = torch.zeros(256, dtype=torch.int64)
    with record_variants(run=False) as seen:
        for B in range(1, 257):
            paged_decode_attention_triton(q[:B], k, k, tables[:B], lens[:B])
            qk = qkv[:B, : (Hq + Hkv) * D]
            qr, kr = apply_rotary_triton(
                qk[:, : Hq * D].view(B, Hq, D), qk[:, Hq * D :].view(B, Hkv, D), pos[:B], cos_sin
            )
            store_kv_triton(kr, qkv[:B, (Hq + Hkv) * D :].view(B, Hkv, D), k, k, slots[:B])
            qk_norm_rope_triton(
                qk[:, : Hq * D].view(B, Hq, D), qk[:, Hq * D :].view(B, Hkv, D), qk_w, qk_w, 1e-6, pos[:B], cos_sin
            )
            qs, ks, vs = qkv[:B].split([Hq * D, Hkv * D, Hkv * D], dim=-1)  # the engine's fused path
            qs, ks, vs = qs.view(B, Hq, D), ks.view(B, Hkv, D), vs.view(B, Hkv, D)
            rope_store_kv_triton(qs, ks, vs, k, k, slots[:B], pos[:B], cos_sin)
            rope_store_kv_triton(qs, ks, vs, k, k, slots[:B], pos[:B], cos_sin, qk_w, qk_w, 1e-6)
            rms_norm_triton(x[:B], w, 1e-6)
            rms_norm_triton(x[:B], w, 1e-6, x[:B])
            silu_and_mul_triton(gate_up[:B])
            sample_triton(logits[:B], f[:B], i32[:B], f[:B], f[:B] * 0, seeds[:B])
        cu = torch.tensor([0, 5, 9], dtype=torch.int32)
        for nd in range(8):  # mixed steps: prefill rows after nd decode rows (views at any offset)
            qp = torch.empty(nd + 9, Hq, D, dtype=torch.bfloat16)[nd:]
            paged_prefill_attention_triton(qp, k, k, tables[nd : nd + 2], cu, lens[nd : nd + 2], max_seqlen_q=5)
    counts = {name: len(keys) for name, keys in seen.items()}
    assert counts == {
        "_decode_split_kernel": 1,
        "_decode_merge_kernel": 1,
        "_rotary_kernel": 1,
        "_qk_norm_rope_kernel": 1,
        "_store_kv_kernel": 1,
        "_rope_store_kv_kernel": 2,  # without and with Qwen3's q/k norm
        "_rms_norm_kernel": 2,  # with and without the fused residual
        "_silu_and_mul_kernel": 1,
        "_chunk_stats_kernel": 1,  # batches <= 64: split vocabulary
        "_combine_thresholds_kernel": 1,
        "_chunk_draw_kernel": 1,
        "_combine_draw_kernel": 1,
        "_sample_kernel": 1,  # batches > 64: a program per row
        "_prefill_kernel": 1,
    }, counts


_PTX_SCRIPT = """
import json, re, sys
import torch, triton.compiler
from bench.compile_check import compile_launch  # cwd: the checkout
from bstar.kernels.activation_triton import silu_and_mul_triton
from bstar.kernels.launch import as_gpu, record_variants
from bstar.kernels.norm_rope_triton import apply_rotary_triton, qk_norm_rope_triton
from bstar.kernels.rope_store_triton import rope_store_kv_triton

ptx = {}
compile_ = triton.compiler.compile
def grab(*args, **kwargs):
    k = compile_(*args, **kwargs)
    ptx.setdefault(k.metadata.name, []).append(k.asm["ptx"])
    return k
triton.compiler.compile = grab
T, Hq, Hk, D = 4, 14, 2, 64
q, k, v = torch.empty(T, (Hq + 2 * Hk) * D).split([Hq * D, Hk * D, Hk * D], -1)
q, k, v = q.view(T, Hq, D), k.view(T, Hk, D), v.view(T, Hk, D)
cache, pos, w = torch.empty(8, 16, Hk, D), torch.zeros(T, dtype=torch.int64), torch.ones(D)
launches = []
with as_gpu(), record_variants(run=False, launches=launches):
    rope_store_kv_triton(q, k, v, cache, cache, pos, pos, torch.empty(64, D))
    rope_store_kv_triton(q, k, v, cache, cache, pos, pos, torch.empty(64, D), w, w)
    silu_and_mul_triton(torch.empty(T, 2 * 4864))
    apply_rotary_triton(q, k, pos, torch.empty(64, D))
    qk_norm_rope_triton(q, k, w, w, 1e-6, pos, torch.empty(64, D))
for launch in launches:
    with as_gpu():
        compile_launch(*launch, 90)
count = lambda name, pat: [len(re.findall(pat, p)) for p in ptx[name]]
json.dump({
    "rope_fma": count("_rope_store_kv_kernel", r"fma\\.rn(\\.ftz)?\\.f32"),
    "rope_mul": count("_rope_store_kv_kernel", r"mul(\\.rn)?(\\.ftz)?\\.f32"),
    "silu_fma": count("_silu_and_mul_kernel", r"fma\\.rn(\\.ftz)?\\.f32"),
    "rotary_fma": count("_rotary_kernel", r"fma\\.rn(\\.ftz)?\\.f32"),
    "rotary_mul": count("_rotary_kernel", r"mul(\\.rn)?(\\.ftz)?\\.f32"),
    "qk_norm_fma": count("_qk_norm_rope_kernel", r"fma\\.rn(\\.ftz)?\\.f32"),
    "qk_norm_mul": count("_qk_norm_rope_kernel", r"mul(\\.rn)?(\\.ftz)?\\.f32"),
}, sys.stdout)
"""


def test_float32_kernels_round_as_torch_on_a_gpu(tmp_path):
    """What only a GPU compile shows, read off the sm_90 PTX (no GPU needed): the rotary kernels
    (fused with the KV store, plain, and after Qwen3's q/k norm) keep the reference's roundings in
    float32 (each product rounded, then the difference, and the norm's squares rounded before the
    sum; the compiler would otherwise contract x * cos - y * sin into one FMA, as it did in the
    plain and q/k-norm rotary before they were launched without fp fusion),
    and silu_and_mul takes libdevice's expf (range reduction by FMAs, as torch's kernel) rather
    than tl.exp's bare ex2.approx, several ulps off in float32."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    from triton.backends.nvidia.compiler import get_ptxas

    try:
        if not os.path.exists(get_ptxas(90).path):
            pytest.skip("triton without its bundled ptxas")
    except Exception:
        pytest.skip("triton without its bundled ptxas")
    import json
    import subprocess

    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "BSTAR_KERNELS")}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # the compiler's default, whatever a later Triton picks
    r = subprocess.run(
        [sys.executable, "-c", _PTX_SCRIPT], capture_output=True, text=True, env=env, cwd=REPO, timeout=600
    )
    assert r.returncode == 0, r.stderr[-4000:]
    got = json.loads(r.stdout)
    assert got["rope_fma"] == [0, 0] and min(got["rope_mul"]) > 0, got
    assert got["rotary_fma"] == got["qk_norm_fma"] == [0] and min(got["rotary_mul"] + got["qk_norm_mul"]) > 0, got
    assert min(got["silu_fma"]) > 0, got


class HostSyncInCapture(AssertionError):
    pass


def _index_waits(index, value=None) -> bool:
    """Whether indexing a CUDA tensor with `index` makes the host wait: a Python list (copied to the
    device from pageable memory, a blocking copy) or a boolean mask (nonzero: the result's size is
    read back), except a mask set to a number (index_put_ takes masked_fill then)."""
    items = index if isinstance(index, tuple) else (index,)
    if any(isinstance(i, list) for i in items):
        return True
    masks = [i for i in items if isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)]
    return bool(masks) and not (len(items) == 1 and isinstance(value, (int, float, bool)))


def _to_device_arg(args, kwargs) -> bool:
    """Whether a Tensor.to call names a device (a host<->device copy on a GPU, or a no-op)."""
    first = args[0] if args else None
    return "device" in kwargs or isinstance(first, (str, torch.device))


def _repeats_wait(args, kwargs, at: int) -> bool:
    """Whether repeat_interleave sizes its output from tensor repeats read back (no output_size);
    repeats is args[at] (the one-argument form: args[0])."""
    repeats = args[at] if len(args) > at else kwargs.get("repeats", args[0] if len(args) == 1 else None)
    return "output_size" not in kwargs and isinstance(repeats, torch.Tensor)


# (what, the condition under which the call waits on CUDA; None: always). On CPU each of these is an
# ordinary call, so only its being called in a step gives it away.
_WAITS_ON_CUDA = {
    # host data to a tensor: on a GPU a pageable host-to-device copy (a wait); use kernels.host.to_device
    (torch, "tensor"): None,
    (torch, "as_tensor"): lambda a, k: not isinstance(a[0] if a else k.get("data"), torch.Tensor),
    (torch.Tensor, "to"): lambda a, k: _to_device_arg(a[1:], k),  # (a[0]: the tensor itself)
    # output sizes that depend on values: the size is read back to the host
    (torch, "nonzero"): None,
    (torch.Tensor, "nonzero"): None,
    (torch, "argwhere"): None,
    (torch.Tensor, "argwhere"): None,
    (torch, "unique"): None,
    (torch.Tensor, "unique"): None,
    (torch, "unique_consecutive"): None,
    (torch.Tensor, "unique_consecutive"): None,
    (torch, "masked_select"): None,
    (torch.Tensor, "masked_select"): None,
    (torch, "bincount"): None,
    (torch.Tensor, "bincount"): None,
    (torch, "where"): lambda a, k: len(a) + len(k) == 1,  # where(cond) is nonzero
    (torch, "repeat_interleave"): lambda a, k: _repeats_wait(a, k, 1),
    (torch.Tensor, "repeat_interleave"): lambda a, k: _repeats_wait(a, k, 1),
    # a Python bool or int of a tensor's value
    (torch, "equal"): None,
    (torch.Tensor, "equal"): None,
    (torch, "allclose"): None,
    (torch.Tensor, "allclose"): None,
    (torch.Tensor, "__index__"): None,
    (torch.Tensor, "__getitem__"): lambda a, k: _index_waits(a[1]),
    (torch.Tensor, "__setitem__"): lambda a, k: _index_waits(a[1], a[2]),
    (torch.cuda.Event, "synchronize"): None,
    (torch.cuda.Stream, "synchronize"): None,
}


@contextlib.contextmanager
def no_host_sync(staging: bool = False):
    """Inside: every call that makes the host wait for the device raises, unless called (through
    torch's own Python code) by Triton's interpreter, which reads CPU tensors as numpy arrays:
    the Tensor methods that read values (item, tolist, cpu, numpy, bool/int/float/index of a
    tensor), torch.cuda.synchronize and event/stream waits, and what waits only on a GPU
    (_WAITS_ON_CUDA: host lists made tensors or moved with .to, list or mask indexing, nonzero,
    unique, masked_select, repeat_interleave without output_size, equal...), pinned allocation
    and kernels.host.to_device(_packed). What a CUDA graph capture forbids, checked on CPU. staging: pinned
    staging and to_device(_packed) allowed (outside a capture they do not wait)."""
    import bstar.kernels.host

    def caller() -> str | None:
        """The module of the first caller outside torch; None when Triton's interpreter or numpy."""
        f = sys._getframe(2)
        while f is not None and f.f_globals.get("__name__", "").startswith("torch"):
            f = f.f_back
        name = f.f_globals.get("__name__", "") if f is not None else ""
        return None if f is None or name.startswith(("triton", "numpy")) else name

    def forbid(name, orig, when=None):
        @functools.wraps(orig)
        def wrapped(*args, **kwargs):
            if when is None or when(args, kwargs):
                who = caller()
                if who is not None and not (staging and who == "bstar.kernels.host"):
                    raise HostSyncInCapture(f"{name} inside a captured region (from {who})")
            return orig(*args, **kwargs)

        return wrapped

    targets = {(torch.Tensor, m): None for m in ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__")}
    targets[(torch.cuda, "synchronize")] = None
    targets.update(_WAITS_ON_CUDA)
    if not staging:
        staged = (
            (torch.Tensor, "pin_memory"),
            (bstar.kernels.host, "to_device"),
            (bstar.kernels.host, "to_device_packed"),
            (bstar.kernels.host, "to_device_segments"),
        )
        targets.update(dict.fromkeys(staged))
    saved = [(obj, name, when, obj.__dict__.get(name), getattr(obj, name)) for (obj, name), when in targets.items()]
    try:
        for obj, name, when, _, orig in saved:
            setattr(obj, name, forbid(name, orig, when))
        yield
    finally:
        for obj, name, _, own, _ in saved:
            if own is None:  # inherited (torch.Tensor from TensorBase): uncover it again
                delattr(obj, name)
            else:
                setattr(obj, name, own)


def test_no_host_sync_guard_catches_a_sync():
    """The guard below is live: each forbidden call raises inside it, including those that wait on a
    GPU only (on CPU they are ordinary calls), and all work again after; what never waits passes."""
    t = torch.ones(4)
    i = torch.tensor([0, 2])
    m = t > 0
    bad = [
        lambda: t.sum().item(),
        lambda: bool(t.any()),
        lambda: t.tolist(),
        lambda: print(t),
        lambda: torch.tensor([1, 2]),
        lambda: torch.as_tensor([1, 2]),
        lambda: t.to("cpu"),
        lambda: t.to(device=t.device),
        lambda: t[[0, 2]],
        lambda: t[m],
        lambda: t.__setitem__([0, 1], t[:2]),
        lambda: t.__setitem__(m, t),
        lambda: t.nonzero(),
        lambda: torch.nonzero(t),
        lambda: torch.where(m),
        lambda: t.unique(),
        lambda: torch.masked_select(t, m),
        lambda: i.bincount(),
        lambda: i.repeat_interleave(i),
        lambda: torch.repeat_interleave(i),
        lambda: torch.repeat_interleave(t, i),
        lambda: torch.equal(t, t),
        lambda: range(10)[i[1]],
    ]
    for k, call in enumerate(bad):
        with no_host_sync(staging=True), pytest.raises(HostSyncInCapture):
            call()
            pytest.fail(f"call {k} passed the guard")
    with no_host_sync():
        t[i] = t[i] * 2  # device index tensors, a scalar into a mask, shape arithmetic: no wait
        t[m] = 1.0
        t[1:3].copy_(torch.where(m, t, 0)[:2])
        i.repeat_interleave(i, output_size=2)
        torch.repeat_interleave(t, 2)
        t.repeat_interleave(3)
        t.to(torch.float64)
        torch.as_tensor(t)
    assert t.sum().item() == 4 and torch.tensor([1])[[0]].tolist() == [1] and "__getitem__" not in torch.Tensor.__dict__


@needs_interpreter
def test_captured_decode_forward_has_no_host_sync(tiny, triton_path, monkeypatch):
    """The decode forward a CUDA graph captures (model, Triton kernels, KV store, attention with its
    split count) never makes the host wait, reads a tensor on the host or stages host memory: run
    under no_host_sync() for every bucket replay of a generate (the CPU stand-in runs the same code
    as the capture)."""
    from bstar.engine.runner.gpu.cuda_graphs import DecodeGraphs

    forward = DecodeGraphs._forward

    def guarded(self, bs):
        with no_host_sync():
            forward(self, bs)

    monkeypatch.setattr(DecodeGraphs, "_forward", guarded)
    llm = LLM(tiny["qwen2"], dtype="float32", device="cpu", max_num_seqs=4)
    params = [SamplingParams(temperature=t, max_tokens=n, ignore_eos=True, seed=1) for t, n in ((0, 6), (1.0, 4))]
    llm.generate(_prompts(4, [7, 12]), params, use_tqdm=False)
    assert sum(llm.engine.runner.graphs.replays.values()) >= 5


@needs_interpreter
def test_decode_step_stages_host_memory_twice(tiny, triton_path, monkeypatch):
    """A decode step's host data reaches the device in two pinned copies: the step's inputs (token
    ids, positions, slots, lengths, table rows and entries, in one buffer) and the draw's seeds, with
    one SamplingParams per prompt (seeds apart, as RL loops make them); rows whose filter values
    differ add nothing (they travel with the seeds). Counted at kernels.host's staging functions,
    wherever the engine imported them (on CPU they copy nothing, so calls are what is counted)."""
    import bstar.kernels.host

    staged = []
    for name in ("to_device", "to_device_packed", "to_device_segments"):
        real = getattr(bstar.kernels.host, name)

        def counted(*args, _real=real, **kwargs):
            staged.append(_real.__name__)
            return _real(*args, **kwargs)

        for mod in [m for n, m in sys.modules.items() if n.startswith(("bstar.engine.", "bstar.kernels."))]:
            if getattr(mod, name, None) is real and mod is not bstar.kernels.host:
                monkeypatch.setattr(mod, name, counted)
    llm = LLM(tiny["qwen2"], dtype="float32", device="cpu", max_num_seqs=4)
    eng = llm.engine
    temps = {"shared": [0.8] * 4, "own": [0.5, 0.8, 1.1, 0.0]}
    for case, ts in temps.items():
        for i, (p, t) in enumerate(zip(_prompts(5, [6, 9, 4, 7]), ts)):
            eng.add_request(f"{case}{i}", p, SamplingParams(temperature=t, max_tokens=8, ignore_eos=True, seed=i))
        while eng.scheduler.waiting or any(s.num_computed < len(s) - 1 for s in eng.scheduler.running):
            eng.step()
        staged.clear()
        for _ in range(3):
            eng.step()
        assert len(staged) == 6, (case, staged)  # per step: the inputs, the seeds
        while eng.has_unfinished_requests():
            eng.step()


@needs_interpreter
def test_eager_prefill_and_mixed_steps_have_no_host_sync(tiny, triton_path, monkeypatch):
    """The eager forwards (prefill chunks, steps mixing decode rows and prefill chunks) never make the host
    wait either: the maximum lengths the attention kernels need come from the host (the step's lists), not
    read back from the device (a `.item()` per layer). Every forward of a chunked-prefill generate runs under
    no_host_sync(); prefill-only and mixed steps are among them."""
    from bstar.engine.model.decoder import CausalLM

    forward = CausalLM.forward
    kinds = set()

    def guarded(self, input_ids, positions, cos_sin, kv_caches, meta):
        nd = meta.num_decode
        kinds.add("decode" if nd == input_ids.shape[0] else "mixed" if nd else "prefill")
        with no_host_sync():
            return forward(self, input_ids, positions, cos_sin, kv_caches, meta)

    monkeypatch.setattr(CausalLM, "forward", guarded)
    llm = LLM(tiny["llama"], dtype="float32", device="cpu", max_num_batched_tokens=16, max_num_seqs=4)
    kinds.clear()  # (start-up's warm-up and captures ran their own forwards)
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (6, 3, 2)]
    llm.generate(_prompts(2, [5, 19, 40]), params, use_tqdm=False)
    assert {"prefill", "mixed"} <= kinds
