"""Running under ``torchrun`` for sequence parallelism: joining the group, and keeping ranks in step.

``torchrun --nproc-per-node 2 generate.py --sequence_parallel ...`` starts one process per GPU.
Every rank loads the whole pipeline on its own GPU and every rank must run the same requests in the
same order, because each denoising step is a collective (:mod:`flux.parallel`):

- the command line: every rank parses the same flags, so every rank has the same batch; rank 0
  writes the files and prints;
- the app: rank 0 serves the page and hands each request to the other ranks before running it
  (:class:`SequenceParallelRunner`); they wait in :func:`follow`. A cancel on rank 0 stops every
  rank at the same point: the pipeline agrees on it at each step, stage and finished image.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from flux.devices import HardwareError
from flux.errors import UserError
from flux.sampling import GenerationCancelled, StepInfo
from pulid.pipeline import GeneratedImage, PuLIDFluxPipeline
from pulid.request import GenerationRequest
from pulid.serve.service import LocalRunner, Runner

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Rank:
    """This process's place in the group: ``rank`` of ``world``, on ``device``."""

    rank: int
    world: int
    device: torch.device

    @property
    def leads(self) -> bool:
        """Rank 0 writes files, prints and serves the app."""
        return self.rank == 0


def join_torchrun(backend: str | None = None, minimum: int = 2) -> Rank:
    """Join the group ``torchrun`` set up (its RANK, WORLD_SIZE, LOCAL_RANK variables), on GPU
    ``cuda:LOCAL_RANK`` with NCCL, or on the CPU with gloo where there is no GPU. Fewer than
    ``minimum`` processes is refused (a benchmark may run the parallel path on one)."""
    missing = [name for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK") if name not in os.environ]
    if missing:
        raise HardwareError(
            "--sequence_parallel splits each image over several GPUs, one process each: start it "
            "with torchrun, e.g. `torchrun --nproc-per-node 2 generate.py --sequence_parallel ...`"
        )
    world, local = int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if world < minimum:
        raise HardwareError("--sequence_parallel needs at least two processes: torchrun --nproc-per-node 2")
    if torch.cuda.is_available():
        if local >= torch.cuda.device_count():
            raise HardwareError(
                f"torchrun started {world} processes on this host and it has {torch.cuda.device_count()} "
                "GPU(s): use --nproc-per-node at most that"
            )
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    if not dist.is_initialized():
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    return Rank(dist.get_rank(), dist.get_world_size(), device)


def leave_group() -> None:
    """Leave torchrun's group at exit, where one was joined (NCCL's resources go with it)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def leads() -> bool:
    """Whether this process writes files and serves: always, unless it is a rank other than 0."""
    return not dist.is_initialized() or dist.get_rank() == 0


def _share(request: GenerationRequest | None) -> GenerationRequest | None:
    """Rank 0's request (None: stop) on every rank."""
    box = [request]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class SequenceParallelRunner(Runner):
    """Rank 0's runner under the app (:class:`pulid.serve.service.Runner`): each request goes to the
    other ranks first, then every rank generates it together."""

    def __init__(self, pipeline: PuLIDFluxPipeline):
        self.pipeline = pipeline

    def admit(self, request: GenerationRequest) -> None:
        self.pipeline.check_sharding(request)

    def generate(
        self,
        request: GenerationRequest,
        report: Callable[[StepInfo | str], None],
        on_image: Callable[[GeneratedImage], None],
    ) -> list[np.ndarray]:
        _share(request)
        return LocalRunner(self.pipeline).generate(request, report, on_image)

    def close(self) -> None:
        """Let the other ranks' :func:`follow` return."""
        _share(None)


def follow(pipeline: PuLIDFluxPipeline) -> None:
    """The loop of every rank but 0 under the app: run each request rank 0 shares, until it shares
    None. What rank 0 reports to its user, these ranks only log."""
    while (request := _share(None)) is not None:
        try:
            pipeline.generate(request)
        except GenerationCancelled:
            logger.info("the request was cancelled on rank 0")
        except UserError as err:
            logger.info("the request was refused: %s", err)
        except torch.OutOfMemoryError:  # rank 0 told its visitor; every rank serves the next one
            logger.warning("the request ran out of GPU memory")
            torch.cuda.empty_cache()
        except Exception:  # rank 0 met the same error and answered its visitor: go on with the next
            logger.exception("the request failed on this rank")
