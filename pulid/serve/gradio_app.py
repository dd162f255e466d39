"""PuLID for FLUX: the Gradio app's flags, its start and its serving.

Started by ``app_flux.py`` (the entry point a Space runs) or the ``pulid-flux`` command:

python app_flux.py                        # FLUX.1-dev + PuLID v0.9.1 on CUDA (downloads or models/)
python app_flux.py --preset tiny-random   # tiny random weights on CPU: noise, but the whole path runs

The page is :mod:`pulid.serve.page`, where each request goes :mod:`pulid.serve.topology`, and
what a request passes on its way in :mod:`pulid.serve.web_guard`. ``--help`` answers before torch
or gradio is imported.
"""

import argparse
import contextlib
import inspect
import logging
import os
import shlex
import sys
import threading
import time
from pathlib import Path

from pulid.limits import (
    MAX_EXTRA_PHOTOS,
    MAX_JSON_BODY_BYTES,
    MAX_QUEUED,
    MAX_QUEUED_PER_VISITOR,
    MAX_UPLOAD_BYTES,
    MAX_UPLOAD_BYTES_PER_HOUR,
    MIN_FREE_DISK_BYTES,
)
from pulid.serve.startup import (
    Parser,
    add_model_arguments,
    path_argument,
)

logger = logging.getLogger(__name__)

# Request bodies larger than JSON needs: a field's photos (or a painted layer) in one upload.
BODY_LIMITS = {"/gradio_api/upload": (MAX_EXTRA_PHOTOS + 1) * MAX_UPLOAD_BYTES + MAX_JSON_BODY_BYTES}
STOP_SECONDS = 1.0  # what Ctrl+C or SIGTERM gives the server to close before the process ends
IN_SPACE = bool(os.environ.get("SPACE_ID"))  # Hugging Face Spaces set it; they need 0.0.0.0:7860
SPACE_KEEP_OUTPUTS = 500  # a Space's disk is small and shared by every visitor
MIN_KEEP_OUTPUTS = 50  # below this a busy server could delete a batch before the visitor sees it


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = Parser(description="PuLID for FLUX.1-dev: put the face from a photo into new images")
    add_model_arguments(parser)
    default_port = int(os.environ.get("GRADIO_SERVER_PORT", 7860 if IN_SPACE else 8080))
    default_host = os.environ.get("GRADIO_SERVER_NAME", "0.0.0.0" if IN_SPACE else "127.0.0.1")
    parser.add_argument("--port", type=PORT, default=default_port, help="port to serve on")
    parser.add_argument(
        "--host", default=default_host, help="interface to bind (0.0.0.0 exposes it to the network)"
    )
    parser.add_argument(
        "--share", action="store_true", help="create a public gradio.live link (off by default)"
    )
    parser.add_argument(
        "--allowed_hosts",
        default=None,
        help="comma-separated host names the app answers to ('*' any, '*.example.org' subdomains); "
        "default: local names when bound to 127.0.0.1, any name when bound to 0.0.0.0 or in a Space",
    )
    parser.add_argument(
        "--behind_proxy",
        action=argparse.BooleanOptionalAction,
        default=IN_SPACE,
        help="count visitors by the proxy's X-Forwarded-For entry (default: on in a Space)",
    )
    parser.add_argument(
        "--outputs_dir",
        type=path_argument,
        default=Path("outputs"),
        help="where images are saved",
    )
    parser.add_argument(
        "--keep_outputs",
        type=keep_count,
        default=SPACE_KEEP_OUTPUTS if IN_SPACE else 0,
        help="keep only the newest N images in --outputs_dir (0: all; default 0, "
        f"{SPACE_KEEP_OUTPUTS} in a Space; at least {MIN_KEEP_OUTPUTS})",
    )
    parser.add_argument(
        "--replicas",
        type=whole_number(1, 64),
        default=1,
        metavar="N",
        help="one whole pipeline on each of N GPUs (cuda:0 ... cuda:N-1): N visitors served at once",
    )
    parser.add_argument(
        "--ray",
        action="store_true",
        help="serve through Ray Serve (pip install -r requirements-serve.txt): --replicas N pipelines, "
        "one per GPU of a local Ray or of the cluster at --ray_address, behind this page and HTTP",
    )
    parser.add_argument(
        "--ray_address", default=None, help="with --ray: a Ray cluster to join ('auto': the local one)"
    )
    parser.add_argument(
        "--ray_http_port",
        type=PORT,
        default=8000,
        help="with --ray: port of the HTTP endpoint POST /generate",
    )
    parser.add_argument(
        "--dev", action="store_true", help="show the aligned and parsed face and CFG start step"
    )
    return parser.parse_args(argv)


def whole_number(low: int, high: int):
    """An argparse type: a whole number from ``low`` to ``high``, else the range in the error."""

    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"a whole number is needed (got {text!r})") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"from {low} to {high} (got {value})")
        return value

    return convert


PORT = whole_number(1, 65535)


def keep_count(text: str) -> int:
    """``--keep_outputs``: 0 (keep all) or enough that a finished batch is not deleted before it
    is shown."""
    try:
        count = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a whole number is needed (got {text!r})") from None
    if count != 0 and not MIN_KEEP_OUTPUTS <= count <= 10**7:
        raise argparse.ArgumentTypeError(f"0 (keep all) or from {MIN_KEEP_OUTPUTS} (got {count})")
    return count


def make_service(pipeline, output_dir=None, keep_outputs: int = 0, runner=None):
    """The service under the app: file inputs are read only from gradio's upload folder, the
    line for the GPU is bounded, per visitor too, and the outputs folder keeps ``keep_outputs``
    images (0: all). ``runner``: where the GPU work runs (default: in this process)."""
    from gradio.utils import get_upload_folder

    from pulid.serve.service import GenerationService

    return GenerationService(
        pipeline,
        output_dir,
        upload_roots=[get_upload_folder()],
        listed_loras_only=True,
        max_waiting=MAX_QUEUED,
        max_per_client=MAX_QUEUED_PER_VISITOR,
        keep_outputs=keep_outputs,
        runner=runner,
    )


def launch(demo, args: argparse.Namespace, **options) -> None:
    """Serve ``demo`` with the app's limits and its host-name check (:mod:`pulid.serve.web_guard`)."""
    from gradio.utils import get_upload_folder
    from starlette.middleware import Middleware

    from pulid.serve.page import CLOCK_SCRIPT
    from pulid.serve.web_guard import BodyLimit, HostCheck, PayloadCheck, UploadQuota, allowed_hosts

    hosts = allowed_hosts(args.host, args.share, IN_SPACE, args.allowed_hosts)
    logger.info("answering to host names: %s", ", ".join(hosts))
    if not args.behind_proxy:  # uvicorn would take X-Forwarded-For from any local peer as the client
        os.environ.setdefault("FORWARDED_ALLOW_IPS", "")
    options = {"server_name": args.host, "server_port": args.port, "share": args.share, **options}
    middleware = [
        Middleware(HostCheck, patterns=hosts),
        Middleware(BodyLimit, default=MAX_JSON_BODY_BYTES, by_route=BODY_LIMITS),
        Middleware(
            UploadQuota,
            folder=get_upload_folder(),
            min_free=MIN_FREE_DISK_BYTES,
            per_visitor=MAX_UPLOAD_BYTES_PER_HOUR,
            largest=BODY_LIMITS["/gradio_api/upload"],
            behind_proxy=args.behind_proxy,
        ),
        Middleware(PayloadCheck, events=event_inputs(demo), upload_folder=get_upload_folder()),
    ]
    held = options.pop("prevent_thread_lock", False)  # tests serve from a thread and go on
    options.pop("quiet", None)  # always quiet: the app says where it serves
    try:
        demo.launch(
            head=CLOCK_SCRIPT,  # the status line's clock
            # in bytes: gradio's "20mb" would be 20 MiB, not the service's limit
            max_file_size=MAX_UPLOAD_BYTES,
            app_kwargs={"middleware": middleware},
            prevent_thread_lock=True,
            quiet=True,  # its hint to set share=True in launch() is not this app's flag; said below
            **options,
        )
    except OSError as err:  # the port was free at the start check, and taken while the models loaded
        raise SystemExit(
            f"\nCannot start: port {options['server_port']} on {options['server_name']} was taken while "
            f"the models loaded ({err.strerror or 'in use'}): stop what listens there, or pass --port "
            "with another.\n"
        ) from None
    public = f", and at {demo.share_url}" if demo.share_url else " (--share makes a public link)"
    print(f"Serving at {demo.local_url}{public}. Ctrl+C stops it.", flush=True)
    if not held:
        serve_until_stopped(demo)


def serve_until_stopped(demo, close_seconds: float = STOP_SECONDS) -> None:
    """Wait for Ctrl+C or SIGTERM, then close the server, giving it ``close_seconds`` at most:
    gradio's own wait closed open streams one by one and took 8-22 s. Raises KeyboardInterrupt,
    which the entry point turns into one line."""
    import io

    def close() -> None:
        with contextlib.redirect_stdout(io.StringIO()):  # gradio's "Closing server running on port"
            demo.close()

    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        closing = threading.Thread(target=close, name="closing", daemon=True)
        closing.start()
        closing.join(close_seconds)
        raise


def event_inputs(demo):
    """For :class:`pulid.serve.web_guard.PayloadCheck`: the input names of the event a request names (by
    ``fn_index`` or API name), in the order the payload sends them; None for one it does not name."""

    def names(route) -> list[str] | None:
        for fn in demo.fns.values():
            if route not in (fn._id, fn.api_name) or isinstance(route, bool):
                continue
            count = len(fn.inputs)
            parameters = list(inspect.signature(fn.fn).parameters) if fn.fn is not None else []
            if len(parameters) >= count:  # the inputs come first, then gr.Request and the like
                return parameters[:count]
            return [getattr(block, "label", None) or f"input {i + 1}" for i, block in enumerate(fn.inputs)]
        return None

    return names


def problems_before_loading(args: argparse.Namespace) -> list[str]:
    """What would stop the app only after its models loaded: the address to serve on, the outputs
    folder, Ray for ``--ray``. Found in a second instead of after minutes of loading."""
    from pulid.outputs import writable_folder_problem

    problems = []
    ports = [("--port", args.port)] + ([("--ray_http_port", args.ray_http_port)] if args.ray else [])
    for flag, port in ports:
        if (problem := address_problem(args.host, port, flag)) and problem not in problems:
            problems.append(problem)
    if problem := writable_folder_problem(args.outputs_dir, "--outputs_dir"):
        problems.append(problem)
    if args.ray:
        try:
            import ray  # noqa: F401
            from ray import serve  # noqa: F401
        except ImportError:
            problems.append("--ray needs Ray Serve, an optional extra: pip install -r requirements-serve.txt")
    return problems


def address_problem(host: str, port: int, flag: str) -> str | None:
    """Whether ``host``:``port`` can be listened on (bound and released at once, as the server will)."""
    import errno
    import socket

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError):
        return f"--host {host!r} is not a name or address this machine can serve on."
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                return (
                    f"port {port} on {host} is in use: stop what listens there, or pass {flag} with another."
                )
            if err.errno == errno.EADDRNOTAVAIL:
                return f"--host {host} is not an address of this machine: use 127.0.0.1, or 0.0.0.0 for all."
            return f"cannot listen on {host}:{port} ({err.strerror or err}): check --host and {flag}."
    return None


def configure_space() -> None:
    """On a Hugging Face Space: keep downloads on the persistent disk when there is one, unless
    the build already put the weights in the default cache (README's ``preload_from_hub``)."""
    if IN_SPACE and Path("/data").is_dir() and "HF_HOME" not in os.environ and not preloaded():
        os.environ["HF_HOME"] = "/data/.huggingface"
        logger.info("Space with persistent storage: caching weights in %s", os.environ["HF_HOME"])


def preloaded() -> bool:
    """Whether the default flags' FLUX.1-dev transformer is already on this machine (the Space's
    build put it in the default Hugging Face cache), as the loader will look for it."""
    from flux.hub import find_local
    from pulid.catalogue import DEFAULT_MODEL, DEFAULT_VERSION, default_models_dir, required_weights

    dit = required_weights(DEFAULT_MODEL, DEFAULT_VERSION, None, {})["dit"]
    return find_local(dit.weights, default_models_dir()) is not None


def stop_on_sigterm() -> None:
    """SIGTERM (``docker stop``, systemd, ``kill``) stops the app as Ctrl+C does: the server closes
    and temporary folders go, where the default would end the process at once."""
    import signal

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, interrupt)


def main(argv: list[str] | None = None) -> None:
    if argv is None:  # a Space cannot pass flags: PULID_FLUX_ARGS="--offload --fp8" does it instead
        argv = sys.argv[1:] + shlex.split(os.environ.get("PULID_FLUX_ARGS", ""))
    args = parse_args(argv)  # before torch is imported: --help and a mistyped flag answer at once
    # Then: on ZeroGPU, importing ``spaces`` patches torch before anything starts CUDA.
    import pulid.serve.zerogpu  # noqa: F401 (before torch)
    from pulid.serve.page import EXAMPLE_PHOTO, create_demo
    from pulid.serve.topology import serving_for

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # gradio's own start-up requests, one line each
    # Before CUDA starts: keeps the allocator's reserved memory near what is in use, which the
    # memory budgets count on (measured in BENCHMARKS.md).
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    configure_space()
    stop_on_sigterm()
    if problems := problems_before_loading(args):
        raise SystemExit("\nCannot start:\n- " + "\n- ".join(problems) + "\n")
    serving = serving_for(args, argv, EXAMPLE_PHOTO, IN_SPACE)  # the one place the topology is chosen
    if not serving.serves:
        return
    service = make_service(serving.pipeline, args.outputs_dir, args.keep_outputs, serving.runner)
    try:
        launch(create_demo(args, service), args)
    finally:
        serving.close()


def exit_now(code: int) -> None:
    """End the process once its exit hooks have run (the temporary folders go), without waiting
    for the libraries' threads and pools to wind down, which took seconds after a SIGTERM."""
    import atexit

    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run() -> None:
    """:func:`main` as a command: Ctrl+C or SIGTERM, while loading or serving, is one line."""
    try:
        main()
    except KeyboardInterrupt:
        print("\nStopped.", file=sys.stderr)
        exit_now(130)
