"""Real clients, unchanged, on the engine (the `compat` marker; skipped unless trl / lm_eval are installed:
`pip install -e '.[compat]'`): TRL's GRPOTrainer for 2 steps in colocate mode through bstar.vllm.install()
(sleep mode off and on, and TRL's structured-outputs regex), and lm-evaluation-harness's `vllm` and
`local-completions` (against the server) backends each against its `hf` backend on one tiny checkpoint.
Each client runs in a subprocess (tests/compat/clients/): 2 min 14 s in all on 2 busy CPU cores, so the
default selection leaves them out (pyproject addopts).

Run: pytest -m compat tests/compat/test_vllm_clients.py"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.compat

HERE = Path(__file__).resolve().parent
SRC = str(HERE.parent / "src")


def _run(script: str, *args) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (SRC, os.environ.get("PYTHONPATH")) if p))
    r = subprocess.run(
        [sys.executable, str(HERE / "clients" / script), *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    lines = {k: json.loads(v) for k, _, v in (line.partition(" ") for line in r.stdout.splitlines()) if k.isupper()}
    return lines


def _need(*mods):
    for m in mods:
        if importlib.util.find_spec(m) is None:
            pytest.skip(f"{m} is not installed (pip install -e '.[compat]')")


@pytest.mark.parametrize("mode", ["plain", "sleep", "regex"])
def test_trl_grpo_colocate_two_steps(tmp_path, mode):
    _need("trl", "datasets")
    r = _run("trl_grpo.py", tmp_path, mode)["RESULT"]
    assert r["is_bstar"] and r["steps"] == 2 and r["completions"] == 8
    assert r["changed"] == r["n_params"]  # the trainer stepped
    if mode == "regex":  # the grammar's mask is not in the trainer's logprobs (as with vLLM)
        assert r["regex_ok"] is True
    else:  # the engine's processed logprobs are the trainer's (TRL's own metric)
        assert r["logp_diff_max"] < 1e-4


def test_lm_eval_vllm_and_local_completions_equal_hf(tmp_path):
    _need("lm_eval", "tenacity", "uvicorn")
    from bstar.testing.model_factory import make_model

    path = make_model(str(tmp_path / "m"), "llama", seed=5)
    out = _run("lm_eval_backends.py", path)
    for name in ("RESULT", "SERVER"):
        r = out[name]
        assert r["ll_max_diff"] < 1e-4 and r["rolling_max_diff"] < 1e-3, (name, r)
        assert r["greedy_equal"] == 32 and r["gen_equal"] == 8, (name, r)
    assert out["RESULT"]["is_bstar"]
