"""Trainer <-> engine: a saved checkpoint loads in the engine with transformers' logits, and weights
handed to a live engine (no disk) give the same logits as the engine reloading the checkpoint."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from bstar.engine import LLM
from bstar.testing.model_factory import make_model, make_records
from bstar.train import SFTConfig, SFTTrainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models; robust on a busy machine


def _llm(path):
    return LLM(str(path), dtype="float32", device="cpu", seed=0)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_checkpoint_and_handoff_match_in_engine(arch, tmp_path):
    base = make_model(str(tmp_path / "base"), arch, seed=3, tie_word_embeddings=arch == "qwen2")
    t = SFTTrainer(base, SFTConfig(lr=3e-3, batch_examples=4, micro_batch_tokens=256, max_seq_len=256, progress=False))
    ids = [list(x.input_ids) for x in t.load_data(make_records(3, seed=21))]

    live = _llm(base)
    before = live.compute_logits(ids)
    t.train(make_records(12, seed=20))
    ck = t.save(tmp_path / "ck")

    live.load_weights(t.named_weights())  # in-process hand-off, nothing read from disk
    handed = live.compute_logits(ids)
    reloaded = _llm(ck).compute_logits(ids)
    hf = AutoModelForCausalLM.from_pretrained(ck, dtype=torch.float32).eval()
    for h, r, b, x in zip(handed, reloaded, before, ids):
        assert h.shape == (len(x), r.shape[-1])
        torch.testing.assert_close(h, r, rtol=0, atol=1e-6)
        with torch.no_grad():
            ref = hf(torch.tensor([x])).logits[0]
        torch.testing.assert_close(r, ref, rtol=1e-4, atol=1e-4)
        assert (h - b).abs().max() > 1e-3  # the hand-off really changed the engine's weights
