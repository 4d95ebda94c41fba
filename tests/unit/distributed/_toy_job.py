"""A tiny job run under real torchrun by the launcher tests: ``-m tests.unit.distributed._toy_job MODE OUT``.

Modes: ``allreduce`` (each rank writes the all-reduced sum of rank+1), ``nonfinite_rank1`` (rank 1
raises NonFiniteLoss, rank 0 waits in a barrier), ``config_error``, ``sigkill`` (the last rank
kills itself), ``hang`` (every rank records its pid, rank 0 also starts a child process, then all
hang; the last rank ignores SIGTERM so only SIGKILL ends it), ``checkpoint`` (every rank saves
and reloads one checkpoint and records a random draw after each).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from opensora_core.distributed.dist import all_reduce_sum, barrier, init_distributed
from opensora_core.errors import ConfigError, NonFiniteLoss
from opensora_core.jobs.common import job_entrypoint


@job_entrypoint
def main() -> None:
    mode, out = sys.argv[1], Path(sys.argv[2])
    info = init_distributed(timeout_s=60)
    last = info.rank == info.world_size - 1
    if mode == "allreduce":
        total = all_reduce_sum(torch.tensor([float(info.rank + 1)]))
        print(f"toy job rank {info.rank} of {info.world_size}: sum {total.item():g}", flush=True)
        (out / f"rank-{info.rank}.json").write_text(
            json.dumps({"rank": info.rank, "world_size": info.world_size, "sum": total.item()})
        )
    elif mode == "nonfinite_rank1":
        if info.rank == 1:
            raise NonFiniteLoss("loss is nan at step 3")
        barrier()
    elif mode == "config_error":
        raise ConfigError("unknown key 'vae_train.nope'")
    elif mode == "sigkill":
        if last:
            os.kill(os.getpid(), signal.SIGKILL)
        barrier()
    elif mode == "hang":
        if last and info.world_size > 1:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        pids = [os.getpid()]
        if info.rank == 0:
            child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", str(out)])
            pids.append(child.pid)
        (out / f"pids-{info.rank}.json").write_text(json.dumps(pids))
        while True:
            time.sleep(1)
    elif mode == "checkpoint":
        from opensora_core.distributed.dist import set_seed
        from opensora_core.training.checkpoint import load_checkpoint, save_checkpoint

        set_seed(0, info.rank)
        model = torch.nn.Linear(2, 2)
        path = save_checkpoint(out / "ckpt", 1, model=model, config={"toy": True})
        after_save = torch.rand(2).tolist()
        torch.manual_seed(1234)  # lose the stream; loading must bring it back
        load_checkpoint(path, model=model)
        after_load = torch.rand(2).tolist()
        (out / f"draws-{info.rank}.json").write_text(json.dumps({"save": after_save, "load": after_load}))
    else:
        raise ConfigError(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main()
