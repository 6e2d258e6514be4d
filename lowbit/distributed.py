"""Several workers for one study: PyTorch's own torch.distributed, started by `torchrun`.

Why this engine: it is already in every environment lowbit runs in (no wheel to carry; Ray's is ~79 MB), `torchrun`
starts one process per GPU on a host and, with `--nnodes`, on several hosts, and gives them one key-value store
(torch.distributed.TCPStore) to meet at. A study's expensive pieces are independent (one quantize-and-score per
scheme, one fine-tune per scheme), so they are dealt out to the workers by index and each result lands in the
study's stage cache, the same files a one-process run writes; rank 0 then reads them all and alone writes the
report and times the artifacts (timing never shares the machine with other work). With several hosts the run
folder must be on a filesystem every host sees.

The workers meet through the store only, never through a default process group: ModelOpt all-reduces calibration
ranges and auto_quantize scores over the default group whenever one exists, which would mix different schemes'
ranges (each scheme is calibrated whole on one worker, so its ranges are exactly a one-process run's) and
deadlock where only rank 0 works (the sensitivity stage).

Without `torchrun` (no WORLD_SIZE in the environment) everything is one process, as before.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
from datetime import timedelta
from typing import Any, TypeVar

T = TypeVar("T")

WAIT = timedelta(hours=48)  # a worker may wait that long for rank 0's sensitivity stage or another's schemes


@dataclasses.dataclass
class Workers:
    rank: int = 0
    world: int = 1
    device: str = "cpu"
    store: Any = None  # torch.distributed.Store shared by the workers
    _n: int = 0  # collectives so far (each gets its own keys)

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def share(self, items: list[T]) -> list[T]:
        """This worker's part of `items` (every world-th, from its rank)."""
        return items[self.rank::self.world]

    def _gather(self, obj: Any) -> list[Any]:
        self._n += 1
        keys = [f"g{self._n}/{r}" for r in range(self.world)]
        self.store.set(keys[self.rank], pickle.dumps(obj))
        self.store.wait(keys, WAIT)
        return [pickle.loads(self.store.get(k)) for k in keys]

    def barrier(self) -> None:
        if self.world > 1:
            self._gather(None)

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every worker (any picklable object)."""
        if self.world == 1:
            return obj
        self._n += 1
        key = f"b{self._n}"
        if self.leader:
            self.store.set(key, pickle.dumps(obj))
        self.store.wait([key], WAIT)
        return pickle.loads(self.store.get(key))

    def sum(self, counts: dict[str, int]) -> dict[str, int]:
        """`counts` added up over the workers."""
        if self.world == 1:
            return counts
        got = self._gather(counts)
        return {k: sum(c.get(k, 0) for c in got) for k in counts}


def start(device: str = "cpu") -> Workers:
    """This process's place among the workers `torchrun` started (one worker when not started by it). On GPUs
    each worker takes the GPU of its local rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Workers(device=device)
    import torch
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(local)
    # torchrun's agent hosts the store the workers meet at; started without it, rank 0 hosts one
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=rank == 0 and not agent, timeout=WAIT)
    run = os.environ.get("TORCHELASTIC_RUN_ID", "local")
    return Workers(rank=rank, world=world, device=f"cuda:{local}" if cuda else device,
                   store=dist.PrefixStore(f"lowbit/{run}", store))


def stop(workers: Workers) -> None:
    """Every worker leaves together, and rank 0 last: where it hosts the store, the others' last reads of it
    must be over before it exits."""
    if workers.world == 1:
        return
    workers.barrier()
    workers.store.set(f"left/{workers.rank}", b"1")
    if workers.leader:
        workers.store.wait([f"left/{r}" for r in range(workers.world)], WAIT)
