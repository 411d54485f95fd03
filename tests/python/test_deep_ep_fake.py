# SPDX-License-Identifier: Apache-2.0
"""The deep_ep facade, the autograd functions and the example MoE layer on the CPU, over
fake_core.py (a torch stand-in for the core Buffer with the documented semantics): the same
scenarios as the GPU tests (deep_ep_worker.py) at 1, 2 and 4 ranks. They check the Python
plumbing on any machine with torch; the GPU tests check the library itself."""
import importlib.util

import pytest

from _launch import run_ranks

pytestmark = pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="needs torch")


@pytest.mark.parametrize("nranks", [1, 2, 4])
@pytest.mark.parametrize("scenario", ["intranode", "low_latency", "autograd"])
def test_fake_core(scenario, nranks):
    run_ranks(scenario, nranks, timeout=300, extra_env={"EPCOMM_FAKE_CORE": "1"})
