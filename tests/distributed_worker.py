"""One process of a multi-process CPU run (started by test_sharding.py): a few train steps, losses to JSON.

    python -m tests.distributed_worker PROCESS_ID NUM_PROCESSES PORT OUT.json
"""

import json
import sys

import jax


def main(process_id: int, num_processes: int, port: int, out: str) -> None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    from tests.support import SHARDED, run_steps, tiny_config

    cfg = tiny_config(**SHARDED)
    cfg.mesh.coordinator_address = f"127.0.0.1:{port}"
    cfg.mesh.num_processes, cfg.mesh.process_id = num_processes, process_id
    from comoe_jax import sharding as shd

    shd.init_distributed(cfg.mesh)
    assert jax.process_count() == num_processes, jax.process_count()
    losses = run_steps(cfg, jax.devices())
    if process_id == 0:
        with open(out, "w") as f:
            json.dump({"losses": losses, "devices": jax.device_count()}, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
