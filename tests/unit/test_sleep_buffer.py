"""Level-1 sleep copies the weights into one flat host buffer per engine (ModelRunner.sleep_buffer), made at
the first sleep and reused by the next ones, exactly their size (pinned on CUDA with cudaHostRegister, not
rounded up to a power of two by the caching host allocator); level 2 gives it back. The memory plan counts it
for an engine that sleeps at level 1 in every phase, since it is kept while the engine is awake."""

import torch

from bstar.engine import LLM, SamplingParams
from bstar.kernels.host import HostBuffer, pinned_request_bytes
from bstar.testing.model_factory import make_model

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
PROMPTS = [[5, 17, 33, 9, 41, 8, 77], [3, 4, 5, 6, 7]]


def _tokens(outs):
    return [o.outputs[0].token_ids for o in outs]


def test_one_flat_buffer_reused_across_sleeps(tmp_path):
    path = make_model(str(tmp_path / "m"), "qwen2", seed=2, tokenizer=False)
    llm = LLM(path, dtype="float32", device="cpu")
    runner = llm.engine.runner
    ref = _tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False))
    assert runner.sleep_buffer is None and runner.host_bytes() == 0
    sizes = sorted(
        {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in runner.weight_tensors()}.values()
    )
    llm.sleep(1)
    buf = runner.sleep_buffer.tensor
    want = sum(-(-n // 512) * 512 for n in sizes)
    assert buf.numel() == want == runner.host_bytes()  # exact: no power-of-two rounding
    base = buf.data_ptr()
    backups = [b for _, _, b in runner._slept_weights]
    assert sorted(b.numel() for b in backups) == sizes
    assert all(base <= b.data_ptr() < base + want and (b.data_ptr() - base) % 512 == 0 for b in backups)
    llm.wake_up()
    assert runner.sleep_buffer.tensor.data_ptr() == base  # kept while awake, for the next sleep
    assert _tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == ref
    llm.sleep(1)
    assert runner.sleep_buffer.tensor.data_ptr() == base  # reused, not allocated again
    llm.wake_up()
    assert _tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == ref
    llm.sleep(2)
    assert runner.sleep_buffer is None and runner.host_bytes() == 0


def test_host_buffer_sizes():
    assert [pinned_request_bytes(n) for n in (0, 1, 4096, 4097, 272 << 20)] == [0, 1, 4096, 8192, 512 << 20]
    b = HostBuffer(1000, pin=False)
    assert b.tensor.numel() == 1000 and b.host_bytes == 1000 and not b.registered
    b.close()
    assert b.tensor is None and b.host_bytes == 0


def test_host_buffer_falls_back_to_the_caching_allocator_honestly(monkeypatch):
    """When cudaHostRegister fails, the buffer comes from the caching host allocator, and host_bytes says what
    that holds (a power of two)."""

    class Cudart:
        def cudaHostRegister(self, ptr, n, flags):
            return 1  # an error code

    pinned = []
    real_empty = torch.empty

    def empty(*args, pin_memory=False, **kwargs):
        pinned.append(pin_memory)
        return real_empty(*args, **kwargs)

    monkeypatch.setattr(torch.cuda, "cudart", lambda: Cudart())
    monkeypatch.setattr(torch, "empty", empty)
    b = HostBuffer(3000, pin=True)
    assert pinned == [False, True] and not b.registered and b.host_bytes == 4096 and b.tensor.numel() == 3000
