# SPDX-License-Identifier: Apache-2.0
"""Gradients of the example MoE layer (examples/python/moe_layer.py, epcomm.autograd through
epcomm.deep_ep) at 2 and 4 ranks against a single-process float64 reference: x, the expert
weights and the router weights (deep_ep_worker.py autograd). Skipped without a GPU or torch."""
import importlib.util

import pytest

import epcomm
from _launch import run_ranks

pytestmark = pytest.mark.skipif(
    epcomm.device_count() < 1 or importlib.util.find_spec("torch") is None,
    reason="needs a CUDA device and torch")


@pytest.mark.parametrize("nranks", [2, 4])
def test_moe_layer_gradients(nranks):
    run_ranks("autograd", nranks)
