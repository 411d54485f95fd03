# SPDX-License-Identifier: Apache-2.0
"""2-rank runs of mp_dispatch.py under mpirun (mpi4py and torch.distributed bootstraps). Ranks
take GPU rank % device_count, so one GPU is enough (epcomm allows several ranks per GPU).
Skipped without a GPU, mpirun, mpi4py or torch."""
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import epcomm

MPIRUN = shutil.which("mpirun")
SCRIPT = Path(__file__).with_name("mp_dispatch.py")

pytestmark = pytest.mark.skipif(
    epcomm.device_count() < 1 or MPIRUN is None
    or importlib.util.find_spec("mpi4py") is None or importlib.util.find_spec("torch") is None,
    reason="needs a CUDA device, mpirun, mpi4py and torch")


@pytest.mark.parametrize("bootstrap", ["mpi4py", "torch"])
def test_two_ranks(bootstrap):
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    cmd = [MPIRUN, "-np", "2", "--oversubscribe", sys.executable, str(SCRIPT),
           "--bootstrap", bootstrap]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PASS" in proc.stdout
