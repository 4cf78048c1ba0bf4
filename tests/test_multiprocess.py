"""Multi-process without SLURM: 2 processes x 4 CPU devices, joined through jax.distributed on
localhost (launch.main's --coordinator_address / --num_processes / --process_id, gloo collectives),
train to the same losses and parameters as 1 process x 8 devices; one process writes the files."""
import csv
import os
import socket
import subprocess
import sys

import grain.python as grain
import jax
import numpy as np
import pytest
from conftest import REPO

from mema_jax.data.pipeline import GlobalBatchSampler

STEPS = 6


class Order:  # a stand-in record order: position -> record key = position * 10
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, g):
        if not 0 <= g < self.n:
            raise IndexError(g)
        return grain.RecordMetadata(index=g, record_key=10 * g, rng=None)


@pytest.mark.parametrize("drop_remainder", [True, False])
def test_the_processes_rows_of_each_global_batch_are_the_one_process_batch(drop_remainder):
    total, batch, processes = 53, 8, 2
    one = GlobalBatchSampler(Order(total), batch, 0, 1, drop_remainder)
    single = [one[q].record_key for q in range(len(one))]
    local = batch // processes
    parts = []
    for p in range(processes):
        s = GlobalBatchSampler(Order(total), batch, p, processes, drop_remainder)
        keys = [s[q].record_key for q in range(p, len(s), processes)]  # what grain's DataLoader asks process p
        parts.append([keys[i:i + local] for i in range(0, len(keys), local)])
    assert len(parts[0]) == len(parts[1])  # every process yields as many batches: no collective waits forever
    merged = [k for b0, b1 in zip(*parts) for k in b0 + b1]
    full = total // batch * batch
    if drop_remainder:
        assert merged == single[:full] and len(single) == full
    else:  # the last, partial batch split evenly: 5 left -> 2 per process, one record left out
        assert merged[:full] == single[:full] and sorted(merged[full:]) == [10 * g for g in (48, 49, 50, 51)]
    with pytest.raises(IndexError):
        GlobalBatchSampler(Order(total), batch, 1, processes, drop_remainder)[0]  # position 0 is process 0's


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def command(workdir, data_root, *extra):
    return [sys.executable, "-m", "launch.main", "--config=configs/quickstart.py:tiny", f"--workdir={workdir}",
            f"--config.data.root={data_root}", f"--config.total_steps={STEPS}", "--config.checkpoint_every=3",
            "--config.log_every=1", "--config.eval_every=3", "--config.mesh.data=2", "--config.mesh.fsdp=4", *extra]


def env_with(devices: int):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    env.pop("JAX_COORDINATOR_ADDRESS", None)
    return env


def losses(workdir):
    with open(workdir / "metrics.csv", newline="") as f:
        return {(int(r["step"]), r["name"]): float(r["value"]) for r in csv.DictReader(f)
                if r["name"] in ("train/loss", "eval/accuracy", "eval/loss")}


def final_params(workdir):
    import orbax.checkpoint as ocp

    path = workdir / "checkpoints" / str(STEPS) / "state"
    checkpointer = ocp.StandardCheckpointer()
    one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])  # saved over 8 devices, read onto one
    metadata = checkpointer.metadata(path)
    metadata = getattr(metadata, "item_metadata", metadata)
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one_device), metadata)
    restored = checkpointer.restore(path, target)
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(restored["params"])[0]:
        flat[jax.tree_util.keystr(path)] = np.asarray(leaf)
    return flat


@pytest.mark.slow
def test_two_processes_of_four_devices_train_like_one_process_of_eight(tmp_path, synth_dataset_32):
    one = tmp_path / "one"
    single = subprocess.run(command(one, synth_dataset_32.root), cwd=REPO, env=env_with(8), capture_output=True,
                            text=True, timeout=900)
    assert single.returncode == 0, single.stderr[-3000:]

    two = tmp_path / "two"
    port = free_port()
    procs = [subprocess.Popen(command(two, synth_dataset_32.root, f"--coordinator_address=localhost:{port}",
                                      "--num_processes=2", f"--process_id={i}"),
                              cwd=REPO, env=env_with(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outputs = [p.communicate(timeout=900) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    assert "done: 6 steps" in outputs[0][0] and "done: 6 steps" in outputs[1][0]

    # fp32 on both sides; the gradient all-reduce sums in another order across processes (gloo) than
    # within one (XLA), so values agree to rounding, not bit for bit: relative 1e-5 over 6 steps.
    a, b = losses(one), losses(two)
    assert a.keys() == b.keys() and len([k for k in a if k[1] == "train/loss"]) == STEPS
    for key in a:
        assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key
    pa, pb = final_params(one), final_params(two)
    assert pa.keys() == pb.keys()
    for name in pa:
        scale = max(float(np.abs(pa[name]).max()), 1e-6)
        assert float(np.abs(pa[name] - pb[name]).max()) / scale < 1e-5, name
    # One writer: the metrics table and config exist once, written by process 0 (no interleaved rows).
    assert sorted(p.name for p in two.iterdir() if p.suffix in (".csv", ".json")) == sorted(
        p.name for p in one.iterdir() if p.suffix in (".csv", ".json"))
