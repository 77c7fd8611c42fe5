"""bstar.vllm: vLLM's import paths, the install() opt-in (module alias and importlib.metadata, this process
only), and the vLLM keywords and handles RL and eval clients (TRL 1.16, lm-eval 0.4.13, OpenRLHF, verl) pass.
install() runs in a subprocess, so the test process never has a `vllm` module."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from packaging.version import Version

from bstar.engine import LLM, SamplingParams, UnsupportedError
from bstar.testing.model_factory import hf_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SRC = str(Path(__file__).resolve().parents[2] / "src")
CPU = dict(device="cpu", dtype="float32")


def _python(code: str, extra_path: str | None = None) -> subprocess.CompletedProcess:
    path = [p for p in (extra_path, SRC, os.environ.get("PYTHONPATH")) if p]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


IMPORTS = """
import importlib.metadata, importlib.util, sys
from packaging.version import Version
try:
    importlib.metadata.version("vllm"); print("BEFORE", "found")
except importlib.metadata.PackageNotFoundError:
    print("BEFORE", "none")
import bstar.vllm
bstar.vllm.install()
bstar.vllm.install()  # idempotent
import vllm
# what TRL 1.16 imports (trl/generation/vllm_generation.py, vllm_client.py)
from vllm import LLM, RequestOutput, SamplingParams
from vllm.sampling_params import StructuredOutputsParams
from vllm.utils.network_utils import get_ip, get_open_port
from vllm.distributed.weight_transfer.nccl_common import trainer_init
from vllm.distributed.weight_transfer.packed_tensor import packed_nccl_broadcast_producer
from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerSendWeightsArgs, NCCLWeightTransferEngine
from vllm.distributed.weight_transfer.base import SparseWeightPatch
# what lm-eval 0.4.13 imports (lm_eval/models/vllm_causallms.py)
from vllm import TokensPrompt
from vllm.lora.request import LoRARequest
from vllm.entrypoints.chat_utils import resolve_hf_chat_template
from vllm.transformers_utils.tokenizer import get_tokenizer
from vllm.engine.arg_utils import EngineArgs
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.utils import random_uuid
assert AsyncLLM is bstar.engine.AsyncLLM and len(random_uuid()) == 32
from vllm.outputs import CompletionOutput
from vllm.inputs import TokensPrompt as TP2
import bstar.engine as E
assert LLM is E.LLM and SamplingParams is E.SamplingParams and RequestOutput is E.RequestOutput
assert vllm is bstar.vllm and TP2 is TokensPrompt
print("VERSION", vllm.__version__, importlib.metadata.version("vllm"))
print("SPEC", importlib.util.find_spec("vllm") is not None)
print("DISTS", "vllm" in importlib.metadata.packages_distributions().get("vllm", []))
for f in (trainer_init, packed_nccl_broadcast_producer, NCCLWeightTransferEngine, SparseWeightPatch):
    try:
        f(1, x=2)
    except NotImplementedError as e:
        print("REFUSED", str(e).count(chr(10)), "NCCL weight transfer" in str(e))
NCCLWeightTransferEngine.trainer_init  # (an attribute, no call: nothing raised)
try:
    import vllm.no_such_module
except ModuleNotFoundError:
    print("MISSING ok")
assert isinstance(get_ip(), str) and get_open_port() > 0
bstar.vllm.uninstall()
try:
    importlib.metadata.version("vllm"); print("AFTER", "found")
except importlib.metadata.PackageNotFoundError:
    print("AFTER", "none")
"""


def test_install_mirrors_the_clients_imports_and_metadata():
    r = _python(IMPORTS)
    assert r.returncode == 0, r.stderr
    out = dict(line.split(" ", 1) for line in r.stdout.splitlines() if " " in line)
    assert out["BEFORE"] == "none" and out["AFTER"] == "none"  # the metadata answers in the opted-in process only
    from bstar.vllm import VLLM_API_VERSION

    assert out["VERSION"] == f"{VLLM_API_VERSION} {VLLM_API_VERSION}"
    assert out["SPEC"] == "True" and out["DISTS"] == "True"
    assert r.stdout.count("REFUSED 0 True") == 4
    assert out["MISSING"] == "ok"


def test_version_is_inside_the_clients_accepted_ranges():
    from bstar.vllm import VLLM_API_VERSION, __version__

    v = Version(VLLM_API_VERSION)
    assert __version__ == VLLM_API_VERSION
    assert Version("0.22.0") <= v <= Version("0.31.0")  # TRL 1.16's is_vllm_available
    assert v >= Version("0.28.0")  # TRL then imports nccl_common / packed_tensor (mirrored here)
    assert v >= Version("0.9.0")  # lm-eval passes model_config to resolve_hf_chat_template


def test_install_refuses_a_real_vllm(tmp_path):
    fake = tmp_path / "site" / "vllm"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("__version__ = '0.99.0'\n")
    r = _python("import bstar.vllm; bstar.vllm.install()", extra_path=str(tmp_path / "site"))
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert "UnsupportedError" in last and "a real vLLM is installed" in last


def test_no_op_keywords_accepted(llama_dir):
    """lm-eval's LLM(...) keywords: max_lora_rank without LoRA, max_num_seqs=None (vLLM's default), and
    trust_remote_code=True for a checkpoint without remote code (OpenRLHF always passes it)."""
    llm = LLM(
        model=str(llama_dir),
        **CPU,
        revision=None,
        tokenizer=None,
        tokenizer_mode="auto",
        tokenizer_revision=None,
        trust_remote_code=True,
        tensor_parallel_size=1,
        max_model_len=None,
        max_num_seqs=None,
        quantization=None,
        seed=1234,
        enable_lora=False,
        max_lora_rank=16,
    )
    assert llm.llm_engine.ecfg.max_num_seqs == 256
    assert llm.llm_engine.get_num_unfinished_requests() == 0
    llm.llm_engine.add_request("a", [1, 2, 3], SamplingParams(max_tokens=2))
    assert llm.llm_engine.get_num_unfinished_requests() == 1
    llm.llm_engine.abort_request("a")
    assert llm.llm_engine.get_num_unfinished_requests() == 0


def test_trust_remote_code_refused_only_with_remote_code(llama_dir, tmp_path):
    d = tmp_path / "remote"
    shutil.copytree(llama_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedError, match="auto_map") as e:
        LLM(str(d), **CPU, trust_remote_code=True)
    assert "\n" not in str(e.value)
    LLM(str(d), **CPU, trust_remote_code=False)  # the built-in architecture, no code run


def test_load_weights_keyword_and_reload_weights(llama_dir):
    """LLM.load_weights(weights=...) (vLLM's parameter name); collective_rpc("reload_weights") re-reads the
    checkpoint as vLLM's."""
    llm = LLM(str(llama_dir), **CPU)
    prompts = [[1, 5, 9, 13], [1, 40, 41]]
    greedy = SamplingParams(temperature=0, max_tokens=6)
    before = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
    trainer = hf_model(str(llama_dir))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in trainer.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=g))
    named = dict(trainer.named_parameters())
    assert llm.load_weights(weights=[(n, p.data) for n, p in named.items()]) == set(named)
    changed = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
    assert changed != before
    assert llm.collective_rpc("reload_weights") == [None]
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)] == before


def test_get_tokenizer_and_chat_template(llama_dir):
    from bstar.vllm.entrypoints.chat_utils import resolve_hf_chat_template
    from bstar.vllm.transformers_utils.tokenizer import get_tokenizer

    llm = LLM(str(llama_dir), **CPU)
    tok = get_tokenizer(str(llama_dir), tokenizer_mode="auto", trust_remote_code=False, revision=None)
    for text in ("hello world", "the cat sat on the mat 12"):
        assert tok.encode(text) == llm.llm_engine.tokenizer.encode(text)
    assert resolve_hf_chat_template(tok, None, None, model_config=llm.llm_engine.model_config) == tok.chat_template
    assert resolve_hf_chat_template(tok, "{{ x }}", None) == "{{ x }}"
    with pytest.raises(UnsupportedError, match="revision"):
        get_tokenizer(str(llama_dir), revision="main")
