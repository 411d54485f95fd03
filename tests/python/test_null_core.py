# SPDX-License-Identifier: Apache-2.0
"""Smoke test of the null-core benchmark (null_core.py): every deep_ep path runs over the no-op
core, results are fresh tensors, and the JSON lists every path. In a subprocess: null_core's
install() replaces torch.cuda functions for the whole process. No timing is asserted (CI
machines are shared); the numbers are for docs/perf-notes.md."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="needs torch")


def test_null_core_benchmark_runs_every_path():
    script = Path(__file__).with_name("null_core.py")
    out = subprocess.run([sys.executable, str(script), "--iters", "3", "--repeat", "1", "--json",
                          "--check"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    rows = {r["op"]: r["python_us"] for r in json.loads(out.stdout)["results"]}
    for name in ("dispatch (top-k)", "dispatch (cached)", "combine", "LL dispatch+combine"):
        assert rows[f"deep_ep {name}"] > 0
    assert any(k.startswith("binding:") for k in rows)


def test_alloc_costs_runs():
    script = Path(__file__).with_name("null_core.py")
    out = subprocess.run([sys.executable, str(script), "--alloc-costs", "--iters", "3",
                          "--repeat", "1"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    rows = {r["op"]: r["python_us"] for r in json.loads(out.stdout)["results"]}
    assert len(rows) == 4 and all(v > 0 for v in rows.values())
