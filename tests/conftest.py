"""Shared pytest set-up and fixtures. Other fixtures may be added here by others.

Without CUDA, Triton kernels run under the interpreter on CPU tensors; the variable must be set
before triton is first imported, which is why it lives here (conftest loads before test modules).

Tests by kind: `unit/` (one module or function against a reference: scheduler, block manager, sampler, memory
plan, kernels, selection, metrics, ...), `integration/` (the engine against transformers end to end, the loop, the
CLI, the trainer, faults, the server) and `compat/` (the vLLM surface and real clients: TRL, lm-eval). Beside them:
the torchrun workers (fsdp_worker.py, dist_worker.py), bench_scripts.py (loads bench/ scripts by path) and
reference_selection.py (a naive selection the search and loop tests compare with); this folder is on sys.path.

Fixtures: `shared_data` (the GSM8K / MATH500 files beside the project), `free_port` (for torchrun
tests), `one_torch_thread`, and tiny checkpoints built once per session by model_factory.py
(`llama_dir`, `qwen2_dir`, `prm_dir`; read-only: tests write their outputs elsewhere). Every test runs
with $BSTAR_CACHE in a temp dir, so nothing is built under ~/.cache.
"""

import os
import socket
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist (`pytest -n 2`, as CI runs the suite) each worker takes one core: one torch thread, and one for
# the processes tests start (torchrun ranks, CLI runs); two threads per worker on 2 cores spin against each other
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

from bstar.testing.model_factory import make_model  # noqa: E402 (imports triton, after TRITON_INTERPRET is set)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def _cache_in_tmp(tmp_path_factory):
    """Embedded builds (and anything else honouring $BSTAR_CACHE, subprocesses included) write here."""
    old = os.environ.get("BSTAR_CACHE")
    os.environ["BSTAR_CACHE"] = str(tmp_path_factory.mktemp("bstar-cache"))
    yield
    if old is None:
        os.environ.pop("BSTAR_CACHE", None)
    else:
        os.environ["BSTAR_CACHE"] = old


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """`shared/data` beside the checkout ($BSTAR_SHARED_DATA overrides; a git worktree nested one level
    deeper finds it too). Read-only: tests never write there."""
    env = os.environ.get("BSTAR_SHARED_DATA")
    candidates = [Path(env)] if env else [p / "shared" / "data" for p in REPO.parents]
    for d in candidates:
        if (d / "gsm8k_test.jsonl").is_file():
            return d
    pytest.fail(f"shared data not found (looked in {', '.join(map(str, candidates[:3]))}); set BSTAR_SHARED_DATA")


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module's tests (`pytestmark = pytest.mark.usefixtures("one_torch_thread")`):
    for tiny models it is as fast, results do not depend on what earlier tests set, they match torchrun
    ranks (OMP_NUM_THREADS=1), and 2 threads on a busy 2-core machine spin (~15x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def free_port() -> int:
    """A TCP port nobody listens on now (for torchrun's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> Path:
    """Tiny random Llama (1024 positions, for GSM8K prompts): the trainer's model and the loop's policy."""
    return Path(make_model(str(tmp_path_factory.mktemp("llama")), "llama", seed=1, max_position_embeddings=1024))


@pytest.fixture(scope="session")
def qwen2_dir(tmp_path_factory) -> Path:
    """Tiny random Qwen2 with tied embeddings (biases on q/k/v)."""
    return Path(make_model(str(tmp_path_factory.mktemp("qwen2")), "qwen2", seed=1, tie_word_embeddings=True))


@pytest.fixture(scope="session")
def prm_dir(tmp_path_factory) -> Path:
    """Tiny random LM-style PRM: a Llama whose tokenizer has the step tag "ки"."""
    d = tmp_path_factory.mktemp("prm")
    return Path(make_model(str(d), "llama", seed=2, max_position_embeddings=1024, extra_tokens=("ки",)))
