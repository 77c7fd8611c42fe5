"""bench/host_step.py runs, and its two ways (incremental penalties and stop strings; the old rebuilt counts
and full decodes, kept there as the peer) agree on logits and stop decisions at every step."""

import importlib.util
from pathlib import Path


def test_host_step_bench_quick(capsys):
    spec = importlib.util.spec_from_file_location("host_step", Path(__file__).parents[2] / "bench" / "host_step.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert "new" in out and "old" in out and "long/short" in out
