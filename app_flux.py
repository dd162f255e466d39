"""PuLID for FLUX: the Gradio app. The UI only wires controls to :class:`pulid.pipeline.PuLIDFluxPipeline`.

python app_flux.py                        # FLUX.1-dev + PuLID v0.9.1 on CUDA (downloads or models/)
python app_flux.py --preset tiny-random   # tiny random weights on CPU: noise, but the whole path runs
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import tempfile
from pathlib import Path

from flux.registry import MODELS
from pulid.weights import DEFAULT_VERSION, PULID_VERSIONS

logger = logging.getLogger("app_flux")

MAX_UPLOAD = "20mb"
NEGATIVE_PROMPT = "bad quality, worst quality, text, signature, watermark, extra limbs"
IN_SPACE = bool(os.environ.get("SPACE_ID"))  # Hugging Face Spaces set it; they need 0.0.0.0:7860
EXAMPLE_PHOTO = Path(__file__).resolve().parent / "example_inputs" / "astronaut.png"
TIPS = """
- **timestep to start inserting ID**: smaller keeps the face closer, larger leaves more room for the prompt;
  0-4 works best (4 for photorealistic scenes, 0-1 for stylised ones).
- **true CFG scale**: 1 uses FLUX's distilled guidance (faster, usually best); above 1 runs a second pass
  with the negative prompt (then set guidance near 1).
"""


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The model flags shared by the app and the command line (official names and meanings)."""
    parser.add_argument("--name", default="flux-dev", choices=sorted(MODELS), help="FLUX model")
    parser.add_argument(
        "--version", default=DEFAULT_VERSION, choices=sorted(PULID_VERSIONS), help="PuLID weights"
    )
    parser.add_argument(
        "--device", default=None, help="torch device for the models (default: cuda if present)"
    )
    parser.add_argument(
        "--offload", action="store_true", help="keep each model on the GPU only while it is used"
    )
    parser.add_argument(
        "--aggressive_offload",
        action="store_true",
        help="the smallest GPU footprint: stream the DiT's and T5's blocks (about 10 GB)",
    )
    parser.add_argument(
        "--vram_budget",
        type=float,
        default=None,
        metavar="GB",
        help="fit the whole app in this many GiB: as much resident as fits, the rest streamed",
    )
    parser.add_argument("--fp8", action="store_true", help="run the transformer in fp8 (see --fp8_mode)")
    parser.add_argument(
        "--fp8_mode",
        default="auto",
        choices=["auto", "native", "quanto"],
        help="native: quantise flux1-dev to fp8 at load and use the GPU's fp8 units (Ada/Hopper); "
        "quanto: XLabs' flux-dev-fp8 checkpoint; auto: native where supported",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the repeated blocks (slower start, faster steps; see BENCHMARKS.md)",
    )
    parser.add_argument("--onnx_provider", default="gpu", choices=["gpu", "cpu"], help="onnxruntime provider")
    parser.add_argument("--pretrained_model", default=None, help="path to a PuLID weight file")
    parser.add_argument("--models_dir", default=None, help="folder with the weight files (default: models/)")
    parser.add_argument(
        "--preset",
        default=None,
        choices=["tiny-random"],
        help="tiny-random: random tiny models on CPU, no download; produces noise",
    )


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
        "--dev", action="store_true", help="show the aligned and parsed face and CFG start step"
    )
    args = parser.parse_args(argv)
    if args.aggressive_offload:
        args.offload = True
    return args


def build_pipeline(args: argparse.Namespace):
    if args.preset == "tiny-random":
        from pulid.tiny import tiny_pipeline_with_face_models

        return tiny_pipeline_with_face_models(Path(tempfile.gettempdir()) / "pulid-flux-tiny-random")
    import torch

    from pulid.loading import load_pipeline

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
        if args.device == "cpu":
            logger.warning("No CUDA GPU found: running the full models on the CPU will be very slow.")

    return load_pipeline(
        args.name,
        args.version,
        args.device,
        fp8=args.fp8_mode if args.fp8 else None,
        compile_blocks=args.compile,
        vram_budget_gb=args.vram_budget,
        offload=args.offload,
        aggressive_offload=args.aggressive_offload,
        onnx_provider=args.onnx_provider,
        pretrained_model=args.pretrained_model,
        models_dir=args.models_dir,
    )


def create_demo(args: argparse.Namespace, service):
    """The UI: controls wired to :meth:`pulid.service.GenerationService.run`, nothing else."""
    import gradio as gr

    from pulid.service import UNREADABLE_IMAGE, ServiceError

    class IDImage(gr.Image):
        """An image input that answers an unreadable upload with a message, not a server error."""

        is_template = True  # rendered by the front end's own Image component

        def preprocess(self, payload):
            try:
                return super().preprocess(payload)
            except (OSError, ValueError, SyntaxError) as err:
                raise gr.Error(UNREADABLE_IMAGE.format(name="the ID image")) from err

    def generate(
        prompt,
        id_image,
        extra_images,
        id_weight,
        width,
        height,
        num_steps,
        start_step,
        guidance,
        seed,
        max_sequence_length,
        neg_prompt,
        true_cfg,
        cfg_start_step,
        request: gr.Request,
        progress=gr.Progress(),  # noqa: B008 (gradio injects the tracker through this default)
    ):
        try:
            generation = service.build_request(
                prompt,
                id_image,
                extra_images,
                id_weight=id_weight,
                width=width,
                height=height,
                num_steps=num_steps,
                start_step=start_step,
                guidance=guidance,
                seed=seed,
                max_sequence_length=max_sequence_length,
                neg_prompt=neg_prompt,
                true_cfg=true_cfg,
                cfg_start_step=cfg_start_step,
            )
            result = service.run(
                generation,
                session=_session(request),
                progress=lambda info: progress((info.step + 1, info.total), desc="denoising"),
            )
        except ServiceError as err:
            raise gr.Error(str(err)) from None
        return str(result.path), str(result.seed), str(result.path), result.debug_images

    def cancel(request: gr.Request):
        service.cancel(_session(request))

    with gr.Blocks(title="PuLID for FLUX") as demo:
        gr.Markdown("# PuLID for FLUX\nPut the face from a photo into new FLUX.1-dev images.")
        if args.preset == "tiny-random":
            gr.Markdown(
                "**tiny-random preset: random tiny models, the images are noise.** Use it to try the UI."
            )
        gr.Markdown(TIPS)
        with gr.Row():
            with gr.Column():
                prompt = gr.Textbox(label="Prompt", value="portrait, color, cinematic", max_length=2000)
                id_image = IDImage(label="ID image", type="numpy", image_mode="RGB")
                extra_images = gr.File(
                    label="More photos of the same person (optional)",
                    file_count="multiple",
                    file_types=["image"],
                    type="filepath",
                )
                id_weight = gr.Slider(0.0, 3.0, 1.0, step=0.05, label="ID weight")
                width = gr.Slider(256, 1536, 896, step=16, label="Width")
                height = gr.Slider(256, 1536, 1152, step=16, label="Height")
                num_steps = gr.Slider(1, 50, 20, step=1, label="Number of steps")
                start_step = gr.Slider(0, 10, 0, step=1, label="Timestep to start inserting ID")
                guidance = gr.Slider(1.0, 10.0, 4.0, step=0.1, label="Guidance")
                seed = gr.Textbox("-1", label="Seed (-1 for random)")
                max_sequence_length = gr.Slider(128, 512, 128, step=128, label="T5 max sequence length")
                with gr.Accordion("Advanced: true CFG (1 = distilled guidance only)", open=False):
                    neg_prompt = gr.Textbox(label="Negative prompt", value=NEGATIVE_PROMPT)
                    true_cfg = gr.Slider(1.0, 10.0, 1.0, step=0.1, label="True CFG scale")
                    cfg_start_step = gr.Slider(
                        0, 20, 1, step=1, label="Timestep to start CFG", visible=args.dev
                    )
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
            gr.Examples(
                [["portrait, color, cinematic", str(EXAMPLE_PHOTO), 0, 4.0, "42", 1.0]],
                inputs=[prompt, id_image, start_step, guidance, seed, true_cfg],
            )
        event = generate_button.click(
            generate,
            inputs=[
                prompt,
                id_image,
                extra_images,
                id_weight,
                width,
                height,
                num_steps,
                start_step,
                guidance,
                seed,
                max_sequence_length,
                neg_prompt,
                true_cfg,
                cfg_start_step,
            ],
            outputs=[output_image, used_seed, output_file, debug_gallery],
            api_name="generate",
            concurrency_limit=1,
        )
        cancel_button.click(cancel, None, None, cancels=[event], api_name="cancel", queue=False)
    return demo.queue(default_concurrency_limit=1, max_size=32)


def _session(request) -> str:
    return getattr(request, "session_hash", None) or "default"


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
    from flux.checkpoint import CheckpointError
    from flux.hub import WeightsNotFoundError
    from pulid.service import GenerationService

    try:
        pipeline = build_pipeline(args)
    except (WeightsNotFoundError, CheckpointError) as err:  # the message says what to do; no traceback
        raise SystemExit(f"\n{err}\n") from None
    demo = create_demo(args, GenerationService(pipeline))
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, max_file_size=MAX_UPLOAD)


if __name__ == "__main__":
    main()
