"""PuLID for FLUX: the Gradio app. The UI only wires controls to :class:`pulid.service.GenerationService`.

python app_flux.py                        # FLUX.1-dev + PuLID v0.9.1 on CUDA (downloads or models/)
python app_flux.py --preset tiny-random   # tiny random weights on CPU: noise, but the whole path runs

The controls are made from the declared generation settings (:mod:`pulid.request`). No
``from __future__ import annotations`` here: gradio finds the ``gr.Request`` parameter of a handler
by its annotation, which must be the class itself, or every visitor would share one session.
"""

import argparse
import asyncio
import inspect
import logging
import os
import shlex
import sys
from pathlib import Path

from pulid.limits import MAX_EXTRA_PHOTOS, MAX_QUEUED, MAX_QUEUED_PER_VISITOR, MAX_UPLOAD_BYTES
from pulid.startup import add_model_arguments, load_or_exit

logger = logging.getLogger("app_flux")

MAX_UPLOAD = f"{MAX_UPLOAD_BYTES // 10**6}mb"  # gradio refuses larger files at the upload route
POLL_SECONDS = 0.5  # how often a job's handler yields while it runs or waits, so a cancel is noticed
UPLOAD_CACHE = (600, 3600)  # every 10 minutes, delete uploads and outputs older than an hour
IN_SPACE = bool(os.environ.get("SPACE_ID"))  # Hugging Face Spaces set it; they need 0.0.0.0:7860
EXAMPLE_PHOTO = Path(__file__).resolve().parent / "example_inputs" / "astronaut.png"
TIPS = """
- **timestep to start inserting ID**: smaller keeps the face closer, larger leaves more room for the prompt;
  0-4 works best (4 for photorealistic scenes, 0-1 for stylised ones).
- **true CFG scale**: 1 uses FLUX's distilled guidance (faster, usually best); above 1 runs a second pass
  with the negative prompt (then set guidance near 1).
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="PuLID for FLUX.1-dev: put the face from a photo into new images"
    )
    add_model_arguments(parser)
    default_port = int(os.environ.get("GRADIO_SERVER_PORT", 7860 if IN_SPACE else 8080))
    default_host = os.environ.get("GRADIO_SERVER_NAME", "0.0.0.0" if IN_SPACE else "127.0.0.1")
    parser.add_argument("--port", type=int, default=default_port, help="port to serve on")
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
        "--dev", action="store_true", help="show the aligned and parsed face and CFG start step"
    )
    return parser.parse_args(argv)


def control(setting, gr, visible: bool = True):
    """The Gradio control of one declared setting."""
    if setting.widget == "textbox":
        return gr.Textbox(
            value=str(setting.default),
            label=setting.label,
            info=setting.help or None,
            max_length=setting.max_length,
            visible=visible,
        )
    low, high = (
        (min(setting.choices), max(setting.choices))
        if setting.choices
        else (setting.minimum, setting.maximum)
    )
    return gr.Slider(
        low,
        high,
        value=setting.default,
        step=setting.step,
        label=setting.label,
        info=setting.help or None,
        visible=visible,
    )


def with_signature(handler, names: list[str], gr):
    """The async generator ``handler(values, request, progress)`` as a function of the named inputs.

    Gradio reads the parameter names (the API's argument names) and finds ``gr.Request`` and
    ``gr.Progress`` from the signature; the values arrive as one dict in input order.
    """
    parameters = [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD) for name in names]
    parameters += [
        inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=gr.Request),
        inspect.Parameter("progress", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=gr.Progress()),
    ]
    signature = inspect.Signature(parameters)

    async def wired(*args, **kwargs):  # an async generator, as the handler: gradio can close it
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        values = {name: bound.arguments.get(name) for name in names}
        arguments = bound.arguments
        async for item in handler(values, arguments.get("request"), arguments.get("progress")):
            yield item

    wired.__signature__ = signature
    wired.__annotations__ = {"request": gr.Request}  # how gradio recognises the parameter to fill
    wired.__name__ = handler.__name__
    return wired


def create_demo(args: argparse.Namespace, service):
    """The UI: controls wired to :meth:`pulid.service.GenerationService.run`, nothing else."""
    import gradio as gr

    from pulid.request import generation_settings
    from pulid.service import ServiceError
    from pulid.uploads import UploadError, check_upload

    def uploaded(payload) -> None:
        """Refuse, before gradio opens anything, a file input that is not an upload of this app."""
        path = getattr(payload, "path", None)
        if path is None:
            raise gr.Error("Upload the photo itself (links and paths on the server are not read).")
        try:
            check_upload(path, service.upload_roots)
        except UploadError as err:
            raise gr.Error(str(err)) from None

    class IDImage(gr.Image):
        """An image input that takes only uploads. It hands on the uploaded file, not pixels: the
        service checks its header at once and decodes it when the job's turn comes, so requests
        waiting in line hold no decoded images."""

        is_template = True  # rendered by the front end's own Image component

        def preprocess(self, payload):
            if payload is None:
                return None
            uploaded(payload)
            return payload.path

    class Photos(gr.File):
        """Extra photos: uploads of this app only (gradio would fetch a URL or read any path)."""

        is_template = True

        def preprocess(self, payload):
            items = payload.root if hasattr(payload, "root") else [payload] if payload is not None else []
            for item in items:
                uploaded(item)
            return super().preprocess(payload)

    settings = {s.name: s for s in generation_settings()}
    controls: dict = {}

    async def generate(values: dict, request: gr.Request, progress: gr.Progress):
        """Runs the job in the service's worker thread and yields while it waits and runs (holding
        no server thread): when the visitor cancels or leaves, gradio closes this generator, and
        the ``finally`` stops the work or takes the job out of the line."""
        photo, extra = values.pop("id_image"), values.pop("extra_images")
        photos = ([] if photo is None else [photo]) + list(extra or [])

        def show(info) -> None:
            if isinstance(info, str):
                progress(None, desc=info)
            else:
                progress((info.step + 1, info.total), desc="denoising")

        try:
            generation = service.build_request(None, None, **values)
            visitor = visitor_of(request, args.behind_proxy)
            job = service.start(generation, _session(request), show, client=visitor, photos=photos)
        except ServiceError as err:
            raise gr.Error(str(err)) from None
        try:
            while not job.wait(0):
                await asyncio.sleep(POLL_SECONDS)
                yield WAITING
            try:
                result = job.result()
            except ServiceError as err:
                raise gr.Error(str(err)) from None
            yield str(result.path), str(result.seed), str(result.path), result.debug_images
        finally:
            job.cancel()  # nothing if it finished; otherwise the visitor cancelled or disconnected

    def cancel(request: gr.Request):
        service.cancel(_session(request))

    WAITING = (gr.skip(),) * 4  # a keep-alive while the job runs: no output changes

    with gr.Blocks(title="PuLID for FLUX", delete_cache=UPLOAD_CACHE) as demo:
        gr.Markdown("# PuLID for FLUX\nPut the face from a photo into new FLUX.1-dev images.")
        if args.preset == "tiny-random":
            gr.Markdown(
                "**tiny-random preset: random tiny models, the images are noise.** Use it to try the UI."
            )
        gr.Markdown(TIPS)
        with gr.Row():
            with gr.Column():
                controls["prompt"] = control(settings["prompt"], gr)
                controls["id_image"] = IDImage(label="ID image", type="filepath")
                controls["extra_images"] = Photos(
                    label=f"More photos of the same person (optional, up to {MAX_EXTRA_PHOTOS})",
                    file_count="multiple",
                    file_types=["image"],
                    type="filepath",
                )
                for setting in settings.values():
                    if setting.group == "main" and setting.name != "prompt":
                        controls[setting.name] = control(setting, gr)
                with gr.Accordion("Advanced: true CFG (1 = distilled guidance only)", open=False):
                    for setting in settings.values():
                        if setting.group in ("advanced", "dev"):
                            controls[setting.name] = control(setting, gr, setting.group != "dev" or args.dev)
                with gr.Row():
                    generate_button = gr.Button("Generate", variant="primary")
                    cancel_button = gr.Button("Cancel")
            with gr.Column():
                output_image = gr.Image(
                    label="Generated image", type="filepath", format="png", elem_id="output-image"
                )
                used_seed = gr.Textbox(label="Used seed")
                output_file = gr.File(label="PNG with prompt, seed and settings")
                debug_gallery = gr.Gallery(label="Detected, aligned and parsed face", visible=args.dev)
        if EXAMPLE_PHOTO.is_file():
            example_inputs = ["prompt", "id_image", "start_step", "guidance", "seed", "true_cfg"]
            gr.Examples(
                [["portrait, color, cinematic", str(EXAMPLE_PHOTO), 0, 4.0, "42", 1.0]],
                inputs=[controls[name] for name in example_inputs],
            )
        names = list(controls)
        event = generate_button.click(
            with_signature(generate, names, gr),
            inputs=[controls[name] for name in names],
            outputs=[output_image, used_seed, output_file, debug_gallery],
            api_name="generate",
            # Every admitted request enters its handler at once and waits in the service's line,
            # which bounds each visitor's share; gradio's own queue only holds the overflow.
            concurrency_limit=MAX_QUEUED + 1,
        )
        cancel_button.click(cancel, None, None, cancels=[event], api_name="cancel", queue=False)
    return demo.queue(default_concurrency_limit=1, max_size=MAX_QUEUED)


def make_service(pipeline, output_dir=None):
    """The service under the app: file inputs are read only from gradio's upload folder, and the
    line for the GPU is bounded, per visitor too."""
    from gradio.utils import get_upload_folder

    from pulid.service import GenerationService

    return GenerationService(
        pipeline,
        output_dir,
        upload_roots=[get_upload_folder()],
        max_waiting=MAX_QUEUED,
        max_per_client=MAX_QUEUED_PER_VISITOR,
    )


def launch(demo, args: argparse.Namespace, **options) -> None:
    """Serve ``demo`` with the app's limits and its host-name check (:mod:`pulid.web_guard`)."""
    from starlette.middleware import Middleware

    from pulid.web_guard import HostCheck, allowed_hosts

    hosts = allowed_hosts(args.host, args.share, IN_SPACE, args.allowed_hosts)
    logger.info("answering to host names: %s", ", ".join(hosts))
    options = {"server_name": args.host, "server_port": args.port, "share": args.share, **options}
    demo.launch(
        max_file_size=MAX_UPLOAD,
        app_kwargs={"middleware": [Middleware(HostCheck, patterns=hosts)]},
        **options,
    )


def visitor_of(request, behind_proxy: bool) -> str:
    """Who sent the request (:func:`pulid.web_guard.visitor`): their share of the line counts by it."""
    from pulid.web_guard import visitor

    client = getattr(request, "client", None)
    headers = getattr(request, "headers", None) or {}
    forwarded = headers.get("x-forwarded-for")
    return visitor(getattr(client, "host", None), forwarded, behind_proxy, _session(request))


def _session(request) -> str:
    """The caller's session: cancel flags are kept per session, so a visitor stops only their own job."""
    session = getattr(request, "session_hash", None)
    if not session:
        raise RuntimeError("gradio gave no session for this request: cancelling would reach other users")
    return session


def configure_space() -> None:
    """On a Hugging Face Space: keep downloads on the persistent disk when there is one."""
    if IN_SPACE and Path("/data").is_dir() and "HF_HOME" not in os.environ:
        os.environ["HF_HOME"] = "/data/.huggingface"
        logger.info("Space with persistent storage: caching weights in %s", os.environ["HF_HOME"])


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # Before CUDA starts: keeps the allocator's reserved memory near what is in use, which the
    # memory budgets count on (measured in BENCHMARKS.md).
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    configure_space()
    if argv is None:  # a Space cannot pass flags: PULID_FLUX_ARGS="--offload --fp8" does it instead
        argv = sys.argv[1:] + shlex.split(os.environ.get("PULID_FLUX_ARGS", ""))
    args = parse_args(argv)
    pipeline = load_or_exit(args)
    demo = create_demo(args, make_service(pipeline))
    launch(demo, args)


if __name__ == "__main__":
    main()
