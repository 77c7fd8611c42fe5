"""What a new user's install gives: one top-level name of ours that nothing else ships, every source file in
the installed package, the public API importable and generating without triton (CPU-only macOS / Windows),
`python -m bstar`, and transformers' own imports working in the same process."""

import importlib.metadata as md
import subprocess
import sys
from pathlib import Path

import pytest

import bstar

SRC = Path(__file__).resolve().parents[2] / "src"
DIST = "bstar-engine"


def _run(code: str, cwd=None, timeout=600) -> str:
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_our_only_top_level_name_is_bstar_and_no_other_distribution_ships_it():
    """Hugging Face's `kernels` (installed by transformers >= 5.2x) once shadowed ours: a name of ours that
    another installed distribution ships breaks one of the two for every user who has both."""
    names = {n for n, dists in md.packages_distributions().items() if DIST in dists}
    assert names == {"bstar"}, names
    assert set(md.packages_distributions()["bstar"]) == {DIST}  # (an editable install may list it twice)


def _files(root: Path) -> set[Path]:
    return {p.relative_to(root) for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts}


def test_installed_package_holds_every_source_file():
    """The tests import the installed package (src layout: the checkout's root has nothing to import). Where it
    is a regular install, as CI and users make it, every file under src/bstar must have been installed: a file
    the package data forgets fails here (an editable install maps src/ itself: nothing to compare)."""
    here = Path(bstar.__file__).resolve().parent
    if here == SRC / "bstar":
        pytest.skip("editable install: the package is src/ itself")
    want = {
        p.relative_to(SRC / "bstar") for p in (SRC / "bstar").rglob("*") if p.is_file() and "__pycache__" not in p.parts
    }
    have = {p.relative_to(here) for p in here.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert want - have == set(), f"not installed: {sorted(map(str, want - have))}"


def test_public_api_generates_without_triton(tmp_path, llama_dir):
    """CPU-only users never need triton: the public API imports and generates (greedy, equal to transformers')
    with triton made unimportable, from a directory outside the checkout."""
    code = f"""
import sys
sys.modules["triton"] = None
import torch
from bstar import LLM, SamplingParams
out = LLM({str(llama_dir)!r}, dtype="float32", seed=0).generate(
    [[5, 9, 13, 17]], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0].outputs[0].token_ids
assert not any(m == "triton" or m.startswith("triton.") for m in sys.modules if sys.modules[m] is not None)
from transformers import AutoModelForCausalLM
hf = AutoModelForCausalLM.from_pretrained({str(llama_dir)!r}, dtype=torch.float32).eval()
ref = hf.generate(torch.tensor([[5, 9, 13, 17]]), max_new_tokens=8, min_new_tokens=8, do_sample=False)[0, 4:].tolist()
assert list(out) == ref, (out, ref)
print("ok")
"""
    assert _run(code, cwd=tmp_path).strip().endswith("ok")


def test_transformers_and_hub_kernels_import_beside_us(tmp_path):
    """transformers' hub-kernels integration imports Hugging Face's `kernels` (when installed): it must be theirs,
    with ours imported first in the same process."""
    code = """
import bstar, bstar.kernels, bstar.engine.model.decoder
import transformers
from transformers import AutoModelForCausalLM  # noqa: F401
try:
    import transformers.integrations.hub_kernels  # noqa: F401
except ImportError as e:
    if "bstar" in str(e):
        raise
import importlib.util
spec = importlib.util.find_spec("kernels")
assert spec is None or "bstar" not in (spec.origin or ""), spec.origin
print("ok")
"""
    assert _run(code, cwd=tmp_path).strip() == "ok"


def test_python_dash_m_bstar_runs_the_cli(tmp_path):
    r = subprocess.run([sys.executable, "-m", "bstar", "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0 and "run" in r.stdout and "sft" in r.stdout, r.stderr


def test_public_names_are_the_engines():
    import bstar.engine

    assert sorted(bstar.__all__) == sorted(bstar.engine.__all__)
    for name in bstar.__all__:
        assert getattr(bstar, name) is getattr(bstar.engine, name)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        bstar.nope  # noqa: B018
