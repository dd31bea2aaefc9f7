"""Multi-host runs end to end: train.py in 2 processes x 2 CPU devices joined by jax.distributed on 127.0.0.1.

The whole run (per-host data, checkpoints, evaluation on the mesh, adapter export) equals a 1-process
4-device run; a run preempted (SIGTERM to one process), or with one process killed (SIGKILL: the other is
stopped by jax.distributed), and restarted resumes to the same adapters bit for bit.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import train
from comoe_jax.constants import EXIT_INTERRUPTED

ROOT = Path(__file__).resolve().parents[1]
# Big enough that a step takes a while on two processes (so signals land mid-run), small enough to compile fast.
RUN = ["--config", str(ROOT / "configs" / "tiny.py"), "train.steps=24", "train.save_every=4", "train.log_every=4",
       "train.batch_size=8", "adapter.rank=4", "data.seq_len=96", "data.train=builtin:add+antonym+reverse",
       'model.random_arch={"vocab_size": 320, "hidden_size": 128, "intermediate_size": 256, '
       '"num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2}',
       "eval.before_training=false", "eval.after_training=true", "eval.sources=builtin:add+antonym",
       "eval.max_per_task=4", "eval.max_new_tokens=3", "eval.batch_size=4"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(out: Path, *extra: str) -> list[subprocess.Popen]:
    """train.py in 2 processes of 2 CPU devices each (what every host of a pod runs, with its process id)."""
    port = _free_port()
    flags = "--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0"  # as conftest.py
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags, PYTHONPATH=str(ROOT))
    return [subprocess.Popen([sys.executable, str(ROOT / "train.py"), *RUN, f"train.output_dir={out}",
                              f"mesh.coordinator_address=127.0.0.1:{port}", "mesh.num_processes=2",
                              f"mesh.process_id={i}", *extra], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True) for i in range(2)]


def _wait(procs: list[subprocess.Popen], timeout: float = 600) -> tuple[list[int], str]:
    logs = [p.communicate(timeout=timeout)[0] for p in procs]
    return [p.returncode for p in procs], "\n\n".join(log[-4000:] for log in logs)


def _when(condition, procs, timeout: float = 300) -> None:
    """Wait until ``condition()`` holds (polling), failing if the processes end first."""
    end = time.time() + timeout
    while not condition():
        if any(p.poll() is not None for p in procs):
            pytest.fail("the run ended before the signal could be sent: " + _wait(procs)[1])
        if time.time() > end:
            pytest.fail("timed out waiting for the run")
        time.sleep(0.02)


def _steps_saved(run: Path) -> list[int]:
    folder = run / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.exists() else []


def _adapters(run: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def _losses(run: Path) -> dict[int, tuple[float, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: (r["loss"], r["ce"]) for r in rows}


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("mh") / "run"
    codes, log = _wait(_launch(run))
    assert codes == [0, 0], log
    return run


def test_two_processes_equal_one_process_on_four_devices(two_process_run, tmp_path):
    # mesh.reduction=auto adds the devices' gradients (and logged values) in device order on CPU (gloo's
    # all-reduce would add them in another order than the in-process collectives): the same bits.
    single = tmp_path / "single"
    assert train.main([*RUN, f"train.output_dir={single}", "mesh.num_devices=4"]) == 0
    got, want = _losses(two_process_run), _losses(single)
    assert sorted(got) == sorted(want) == list(range(1, 25))
    assert got == want
    got, want = _adapters(two_process_run), _adapters(single)
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    # evaluation ran on the 4-device mesh, each process scoring its share: the same predictions
    predictions = [[p["prediction"] for p in json.loads((r / "eval_after.json").read_text())["predictions"]]
                   for r in (two_process_run, single)]
    assert predictions[0] == predictions[1] and len(predictions[0]) == 8
    assert _steps_saved(two_process_run) == [16, 20, 24]  # one checkpoint set, written once for both processes


def test_preempted_then_killed_runs_resume_on_both_hosts_bit_for_bit(two_process_run, tmp_path):
    run = tmp_path / "interrupted"
    # evaluation keys may change on resume; the adapters are compared. A dead host is declared so after 15 s.
    quiet = ["eval.after_training=false", "mesh.heartbeat_timeout=15"]
    # 1. A preemption notice (SIGTERM) reaches one host only: both save the same step and stop, exit 75.
    procs = _launch(run, *quiet)
    _when(lambda: 4 in _steps_saved(run), procs)
    procs[1].send_signal(signal.SIGTERM)
    codes, log = _wait(procs)
    assert codes == [EXIT_INTERRUPTED, EXIT_INTERRUPTED], log
    stopped = max(_losses(run))
    assert stopped < 24 and _steps_saved(run)[-1] == stopped, (stopped, _steps_saved(run))
    assert "SIGTERM (preemption): step" in log
    # 2. Restarted on both hosts, then one host dies (SIGKILL): the other, left waiting in a collective, is
    # stopped by jax.distributed once the dead one's heartbeats are missed (mesh.heartbeat_timeout).
    procs = _launch(run, *quiet)
    _when(lambda: _steps_saved(run)[-1] > stopped, procs)
    procs[1].send_signal(signal.SIGKILL)
    codes, log = _wait(procs, timeout=180)
    assert codes[1] == -signal.SIGKILL and codes[0] != 0, (codes, log)
    killed = _steps_saved(run)[-1]
    assert killed < 24, f"the run was not interrupted: {_steps_saved(run)}"
    # 3. Restarted again: it finishes with the adapters of the uninterrupted run, bit for bit.
    codes, log = _wait(_launch(run, *quiet))
    assert codes == [0, 0], log
    assert f"resumed from step {killed}" in log
    want = _adapters(two_process_run)
    for name, value in _adapters(run).items():
        np.testing.assert_array_equal(value, want[name], err_msg=name)
