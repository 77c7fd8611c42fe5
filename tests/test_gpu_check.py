"""bench/gpu_check.py --dry-run: the prepared GPU check runs end to end on CPU (tiny sizes, Triton
interpreter), so the script a GPU session runs first cannot rot between GPU sessions."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {k: v for k, v in os.environ.items() if k not in ("BSTAR_KERNELS", "OUT")}
    env["OMP_NUM_THREADS"] = "1"
    r = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu_check.py"), "--dry-run", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert report["meta"]["dry_run"] and {1, 2, 3, 4, 5} <= {row["step"] for row in rows}
    bad = [row for row in rows if row["status"] == "FAIL"]
    assert not bad, bad
    assert (tmp_path / "memory_check.json").exists()  # step 5 ran bench/memory_check.py beside it
    assert "| step | check | value | target | status | note |" in r.stdout  # the table for RESULTS.md
