"""Two real processes training one run with torch.distributed (gloo on CPU), for the DDP tests."""
import os
import socket
from pathlib import Path

import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, config: dict, out: str, result_dir: str) -> None:
    from hear_msm import training

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    result = training.train(training.TrainConfig.from_dict(config), out)
    torch.save(result.model.state_dict(), Path(result_dir) / f"rank{rank}.pt")


def train_on_two_ranks(config, out: Path, result_dir: Path) -> list[dict]:
    """Run `config` (a TrainConfig) on 2 ranks into `out`; each rank's final state dict."""
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(2, free_port(), config.to_dict(), str(out), str(result_dir)), nprocs=2, join=True)
    return [torch.load(Path(result_dir) / f"rank{rank}.pt") for rank in range(2)]
