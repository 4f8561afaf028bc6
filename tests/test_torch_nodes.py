"""``--num-nodes``: a run spread over two "nodes" of one process each gets what two processes on
one node get (``--devices 2 --strategy ddp``): the same history, test metrics and final weights.

The two nodes are two launches on this machine that meet over loopback (127.0.0.1 only), as
separate machines would over their network, in both ways the README describes: Lightning's own
environment variables (``MASTER_ADDR``, ``MASTER_PORT``, ``NODE_RANK``, ``WORLD_SIZE``, what a
cluster without a launcher sets on each node) and ``torchrun --nnodes 2 --node-rank ...``. Both
nodes write to one output folder, as nodes sharing a file system do: the first process alone
locks and writes it.

Run: ``TL_PARITY_CACHE=/tmp/tlcache python -m pytest tests/test_torch_nodes.py -q``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
#: Images per split and class: two batches of 4 per process and epoch with two processes.
PER_CLASS = {"train": {"cats": 8, "dogs": 8}, "validation": {"cats": 4, "dogs": 6}}
TIMEOUT_S = 600
#: One intra-op thread per process in both layouts: the same kernels' reduction order, so that
#: the two layouts can be compared bit for bit (the gradients' all-reduce over two processes
#: adds the same two numbers in either).
THREADS = "1"


def make_image_folder(root: Path) -> Path:
    rng = np.random.default_rng(1)
    for split, classes in PER_CLASS.items():
        for name, count in classes.items():
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{name[:-1]}.{i}.jpg")
    return root


def train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--data-dir", str(data), "--weights", "demo", "--image-size", "32",
            "--batch-size", "4", "--initial-epochs", "1", "--fine-tune-epochs", "1",
            "--limit-batches", "2", "--seed", "5", "--accelerator", "cpu", "--strategy", "ddp",
            "--output-dir", str(out), *extra]


def run_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=THREADS, **extra)
    for name in ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "WORLD_SIZE", "MASTER_ADDR",
                 "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_JOB_NAME"):
        if name not in extra:
            env.pop(name, None)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def outcome(out: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    doc = json.loads((out / "metrics.json").read_text())
    state = torch.load(out / "model.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    return doc, state


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def one_node(data, demo_weights, tmp_path_factory) -> tuple[dict, dict[str, torch.Tensor]]:
    """Two processes on one node: the layout the two-node runs must reproduce."""
    out = tmp_path_factory.mktemp("one-node")
    result = subprocess.run([sys.executable, "-m", "tl_torch.train",
                             *train_args(data, out, "--devices", "2")], cwd=REPO, env=run_env(),
                            capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-3000:]
    return outcome(out)


def node_command(launcher: str, node: int, port: int, args: list[str]) -> tuple[list[str], dict]:
    """The command and environment of one node's launch."""
    if launcher == "torchrun":
        return ([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
                 "--nproc-per-node", "1", "--node-rank", str(node), "--master-addr", "127.0.0.1",
                 "--master-port", str(port), "-m", "tl_torch.train", *args], run_env())
    return ([sys.executable, "-m", "tl_torch.train", *args],
            run_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NODE_RANK=str(node),
                    WORLD_SIZE="2"))


@pytest.mark.long
@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["lightning", "torchrun"])
def test_two_nodes_equal_two_devices(launcher, data, one_node, tmp_path) -> None:
    out, port = tmp_path / "two-nodes", free_port()
    args = train_args(data, out, "--devices", "1", "--num-nodes", "2")
    logs = []
    procs = []
    for node in (0, 1):
        argv, env = node_command(launcher, node, port, args)
        log = open(tmp_path / f"node{node}.log", "w")
        logs.append(log)
        procs.append(subprocess.Popen(argv, cwd=REPO, env=env, stdout=log,
                                      stderr=subprocess.STDOUT))
    try:
        codes = [p.wait(timeout=TIMEOUT_S) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for log in logs:
            log.close()
    texts = [(tmp_path / f"node{node}.log").read_text() for node in (0, 1)]
    assert codes == [0, 0], [t[-3000:] for t in texts]
    assert [t.count("outputs in ") for t in texts] == [1, 0]  # node 0's first process writes

    doc, state = outcome(out)
    expected_doc, expected_state = one_node
    assert doc["settings"]["num_nodes"] == 2 and expected_doc["settings"]["num_nodes"] == 1
    assert doc["history"] == expected_doc["history"]
    assert doc["test"] == expected_doc["test"]
    assert state.keys() == expected_state.keys()
    different = [k for k in state if not torch.equal(state[k], expected_state[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:5]}"
    # Not vacuous: both phases trained, from the same demo weights in both layouts.
    assert [h["phase"] for h in doc["history"]] == ["feature_extraction", "fine_tuning"]
    assert not (out / "run.lock").exists()
