"""A writer that test_lease.py starts in its own pid namespace and drives through pipes.

    unshare --pid --fork --kill-child --map-root-user python helpers_lease_child.py ROOT

Opens a CheckpointManager on ROOT and prints ``OPEN pid owner`` (its pid, 1 in a new pid
namespace, and the owner id of its lease), or ``ERROR type message`` (one line) and exits 0.
Then obeys stdin lines: ``save N`` prints ``COMMITTED N``, ``close`` prints ``CLOSED`` and exits.
"""

from __future__ import annotations

import os
import sys

import torch

from asyncckpt import CheckpointManager, TrainState


def main() -> int:
    try:
        mgr = CheckpointManager(sys.argv[1], lease_heartbeat_s=0.2, lease_timeout_s=30.0)
    except Exception as e:  # noqa: BLE001 - reported to the parent
        print(f"ERROR {type(e).__name__} {e}".replace("\n", " "), flush=True)
        return 0
    print(f"OPEN {os.getpid()} {mgr._guard.lease.holder.owner}", flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if cmd[:1] == ["save"]:
            step = int(cmd[1])
            mgr.save(step, TrainState(model=torch.nn.Linear(4, 4)), blocking=True)
            print(f"COMMITTED {step}", flush=True)
        elif cmd == ["close"]:
            mgr.close()
            print("CLOSED", flush=True)
            return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())
