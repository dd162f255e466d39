"""Where the app's generations run, chosen in one place from the flags.

One pipeline in this process (the default), one per GPU of this host (``--replicas``), Ray Serve
replicas on a cluster (``--ray``: the pipelines live there, this process serves the page), a
ZeroGPU Space (a GPU lent per request), or several ranks denoising each image together under
torchrun (``--sequence_parallel``: rank 0 serves, the others follow it).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Serving:
    """What :func:`serving_for` chose: the pipeline of this process (None when the pipelines live
    elsewhere), the runner of its jobs (None: in this process, one at a time), whether this
    process serves the page (a torchrun rank other than 0 follows rank 0 and returns), and what
    to close when the page stops."""

    pipeline: object | None
    runner: object | None = None
    serves: bool = True
    close: Callable[[], None] = field(default=lambda: None)


def serving_for(args: argparse.Namespace, argv: list[str], example_photo: Path, in_space: bool) -> Serving:
    """Load or reach the pipelines the flags ask for, and the runner that drives them. A start
    that cannot go on raises SystemExit with the reason (nothing is loaded before the checks)."""
    from pulid.serve.startup import exit_on_conflicts, load_or_exit
    from pulid.serve.zerogpu import ON_ZERO_GPU, ZeroGPURunner

    exit_on_conflicts(args, ON_ZERO_GPU)
    ahead_of_time = False
    if ON_ZERO_GPU:
        args.onnx_provider = "cpu"  # the app process has no GPU; the face stage is small (BENCHMARKS.md)
        ahead_of_time, args.compile = args.compile, False  # compiled ahead of time below, not at load
    if args.ray:  # the pipelines live in Ray Serve replicas; this process serves the page
        from pulid.serve.ray_serve import RayRunner, start
        from pulid.serve.web_guard import allowed_hosts

        handle = start(
            argv,
            args.replicas,
            on_gpus=args.preset is None,
            address=args.ray_address,
            http_host=args.host,
            http_port=args.ray_http_port,
            hosts=allowed_hosts(args.host, args.share, in_space, args.allowed_hosts),
        )
        return Serving(None, RayRunner(handle, args.replicas))
    if args.replicas > 1:  # one pipeline per GPU, a job on each at once
        from pulid.serve.service import ReplicaRunner

        pipelines = load_or_exit(args, args.replicas)
        return Serving(pipelines[0], ReplicaRunner(pipelines))
    pipeline = load_or_exit(args)  # on ZeroGPU: placed on cuda now, moved into each GPU worker by spaces
    if ON_ZERO_GPU:
        if ahead_of_time:
            from pulid.serve.uploads import load_upload
            from pulid.serve.zerogpu import prepare_ahead_of_time

            prepare_ahead_of_time(pipeline, load_upload(example_photo))
        return Serving(pipeline, ZeroGPURunner(pipeline))
    if args.sequence_parallel:  # torchrun: rank 0 serves and shares each request with the others
        from pulid.serve.ranks import SequenceParallelRunner, follow, leads, leave_group

        if not leads():
            follow(pipeline)
            leave_group()
            return Serving(pipeline, serves=False)
        runner = SequenceParallelRunner(pipeline)

        def close() -> None:
            runner.close()
            leave_group()

        return Serving(pipeline, runner, close=close)
    return Serving(pipeline)
