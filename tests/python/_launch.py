# SPDX-License-Identifier: Apache-2.0
"""Runs deep_ep_worker.py at N ranks, one process per rank, torch.distributed (gloo) over
localhost. Ranks use GPU rank % device_count, so one GPU runs any rank count."""
import os
import socket
import subprocess
import sys
from pathlib import Path

WORKER = Path(__file__).with_name("deep_ep_worker.py")


def run_ranks(scenario, nranks, timeout=600, extra_env=None):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(nranks):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(nranks), LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NCCL_NVLS_ENABLE="0",
                   **(extra_env or {}))
        procs.append(subprocess.Popen([sys.executable, str(WORKER), scenario], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            p.kill()
            outs.append(p.communicate()[0] + "\n[timed out]")
    text = "\n".join(f"--- rank {r} ---\n{o}" for r, o in enumerate(outs))
    for r, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0 and f"{r}: OK" in out, text
