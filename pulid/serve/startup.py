"""From command-line flags to a loaded pipeline, shared by the app and ``generate.py``.

The model flags keep the official app's names and meanings (``--name``, ``--version``, ``--device``,
``--offload``, ``--aggressive_offload``, ``--fp8``, ``--onnx_provider``, ``--pretrained_model``)
plus this project's (``--vram_budget``, ``--fp8_mode``, ``--compile``, ``--models_dir``,
``--preset``, and ``--dit``/``--t5``/``--clip`` for single files). The memory flags are parsed once,
here, into a :class:`~flux.offload.MemoryPolicy`. Everything that can stop a start (a missing or
mismatched weight file, a flag the machine cannot honour, a budget too small) is a
:class:`~flux.errors.UserError`, whose message is meant for the user as it is:
:func:`load_or_exit` prints it without a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import tempfile
from pathlib import Path

from flux.errors import UserError

logger = logging.getLogger(__name__)

PRESETS = ("tiny-random",)


class ImpliesFp8(argparse.Action):
    """``--fp8_mode MODE`` says how fp8 runs, so it asks for fp8 too (alone it did nothing)."""

    def __call__(self, parser, namespace, values, option_string=None):
        namespace.fp8_mode, namespace.fp8 = values, True


MAX_NAME_BYTES = 255  # one file or folder name (NAME_MAX on Linux, macOS and Windows)
MAX_PATH_CHARS = 4096  # a whole path (PATH_MAX on Linux; macOS and Windows allow less)


class DefaultsFormatter(argparse.HelpFormatter):
    """``--help`` with each flag's default, where its help does not say it already."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        quiet = action.default in (None, False, [], "", argparse.SUPPRESS) or not action.option_strings
        return text if quiet or "default" in text else f"{text} (default: {action.default})"


class Parser(argparse.ArgumentParser):
    """The command line of the app, the CLI and the download tool: a misspelt flag is answered with
    the flag it most likely meant ("--steps: did you mean --num_steps?"), not 30 lines of usage,
    and ``--help`` shows the defaults."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        import difflib

        if not message.startswith("unrecognized arguments: "):
            super().error(message)
        known = sorted({flag for action in self._actions for flag in action.option_strings})
        lines = []
        for word in message.removeprefix("unrecognized arguments: ").split():
            if not word.startswith("-"):
                continue  # the value of a misspelt flag
            flag = word.split("=", 1)[0]
            close = difflib.get_close_matches(flag, known, n=2, cutoff=0.7)
            close = close or [k for k in known if len(flag) > 3 and flag.lstrip("-") in k]
            lines.append(
                f"{flag}: did you mean {' or '.join(close[:2])}?" if close else f"{flag}: no such flag"
            )
        if not lines:  # a stray value: argparse's own message says which
            super().error(message)
        self.exit(2, f"{self.prog}: unknown flag\n  " + "\n  ".join(lines) + "\n(--help lists every flag)\n")


def path_text(text: str) -> str:
    """A path flag's value, refused where no system can hold it: a name over 255 bytes made every
    later ``Path.exists()`` raise "File name too long" as a traceback."""
    if len(text) > MAX_PATH_CHARS:
        raise argparse.ArgumentTypeError(
            f"the path is {len(text):,} characters long; a path has at most {MAX_PATH_CHARS:,}"
        )
    for part in Path(text).parts:
        if len(os.fsencode(part)) > MAX_NAME_BYTES:
            raise argparse.ArgumentTypeError(
                f"the name {part[:20]}...{part[-12:]} is {len(os.fsencode(part)):,} bytes long; a file or "
                f"folder name has at most {MAX_NAME_BYTES}: check the path"
            )
    return text


def path_argument(text: str) -> Path:
    """A path flag as a :class:`~pathlib.Path`, checked by :func:`path_text`."""
    return Path(path_text(text))


def models_folder(text: str) -> str:
    """``--models_dir``: a folder, or a place for one (made on the first download), not a file."""
    path = Path(path_text(text)).expanduser()
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(
            f"{text} is a file: give the folder that holds (or will hold) the weights"
        )
    return text


def add_weight_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that choose which weight files load: the app's, the CLI's and the download command's."""
    from flux.registry import MODELS
    from pulid.catalogue import (
        CLIP_FILES,
        DEFAULT_MODEL,
        DEFAULT_VERSION,
        DIT_FILES,
        FP8_MODES,
        PULID_VERSIONS,
        T5_FILES,
    )

    parser.add_argument("--name", default=DEFAULT_MODEL, choices=sorted(MODELS), help="FLUX model")
    parser.add_argument("--version", default=DEFAULT_VERSION, choices=PULID_VERSIONS, help="PuLID weights")
    parser.add_argument("--fp8", action="store_true", help="run the transformer in fp8 (see --fp8_mode)")
    parser.add_argument(
        "--fp8_mode",
        default="auto",
        choices=FP8_MODES,
        action=ImpliesFp8,
        help="how --fp8 runs (and implies it): native: quantise flux1-dev to fp8 at load and use the "
        "GPU's fp8 units (Ada/Hopper); quanto: XLabs' flux-dev-fp8 checkpoint; auto: native where supported",
    )
    parser.add_argument(
        "--models_dir",
        default=None,
        type=models_folder,
        help="folder with the weight files (default: models/)",
    )
    for kind, table, what in (
        ("dit", DIT_FILES, "the transformer: a GGUF (city96) or fp8 e4m3fn file, kept quantised"),
        ("t5", T5_FILES, "the T5-XXL text encoder as one file (fp16, fp8 or GGUF)"),
        ("clip", CLIP_FILES, "the CLIP-L text encoder as one file"),
    ):
        parser.add_argument(
            f"--{kind}",
            default=None,
            type=path_text,
            metavar="NAME_OR_FILE",
            help=f"{what}: {', '.join(table)} or a path (see README: which files for my card)",
        )


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The model flags shared by the app and the command line."""
    add_weight_arguments(parser)
    parser.add_argument(
        "--device", default=None, help="torch device for the models (default: cuda if present)"
    )
    parser.add_argument(
        "--devices",
        default=None,
        metavar="DEVICES",
        help="several GPUs: 'cuda:0,cuda:1' puts the DiT on the first and the text encoders, the ID "
        "path and the autoencoder on the second; or a map by stage, 'denoise=cuda:0,text=cuda:1,"
        "id=cuda:1,decode=cuda:1' (a stage left out goes with denoise). Memory flags apply per GPU",
    )
    parser.add_argument(
        "--sequence_parallel",
        action="store_true",
        help="denoise each image on several GPUs at once, the DiT's tokens split between them "
        "(Ulysses); start with torchrun --nproc-per-node N, one process per GPU",
    )
    parser.add_argument(
        "--offload", action="store_true", help="keep each model on the GPU only while it is used"
    )
    parser.add_argument(
        "--aggressive_offload",
        action="store_true",
        help="the smallest GPU footprint: stream the DiT's and T5's blocks (about 5 GiB)",
    )
    parser.add_argument(
        "--vram_budget",
        type=gib,
        default=None,
        metavar="GB",
        help="fit the whole app in this many GiB: as much resident as fits, the rest streamed",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the repeated blocks (slower start, faster steps; see BENCHMARKS.md)",
    )
    parser.add_argument(
        "--onnx_provider",
        default="auto",
        choices=["auto", "gpu", "cpu"],
        help="onnxruntime provider of the face detector (auto: gpu when the ID stage is on a CUDA device)",
    )
    parser.add_argument(
        "--pretrained_model", default=None, type=path_text, help="path to a PuLID weight file"
    )
    parser.add_argument(
        "--preset",
        default=None,
        choices=PRESETS,
        help="tiny-random: random tiny models on CPU, no download; produces noise",
    )


def gib(text: str) -> float:
    """A ``--vram_budget`` value: a positive, finite number of GiB."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of GiB") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: the budget must be a positive number of GiB")
    return value


def memory_policy(args: argparse.Namespace):
    """The :class:`~flux.offload.MemoryPolicy` of the flags (``--aggressive_offload`` implies offload)."""
    from flux.offload import MemoryPolicy

    return MemoryPolicy(
        vram_budget_gb=args.vram_budget,
        offload=args.offload or args.aggressive_offload,
        aggressive=args.aggressive_offload,
    )


# Flags that choose or place the real models: the tiny-random preset builds its own, on the CPU.
REAL_MODEL_FLAGS = (
    "name", "version", "fp8", "models_dir", "pretrained_model", "dit", "t5", "clip",
    "device", "devices", "offload", "aggressive_offload", "vram_budget", "compile",
)  # fmt: skip


def ignored_by_preset(args: argparse.Namespace) -> list[str]:
    """The real-model flags given with ``--preset`` (differing from their defaults): the preset
    cannot honour them, and a run that seems to accept them would give false confidence."""
    if args.preset is None:
        return []
    defaults = argparse.ArgumentParser()
    add_model_arguments(defaults)
    default = defaults.parse_args([])
    return [
        f"--{flag}" for flag in REAL_MODEL_FLAGS if getattr(args, flag, None) != getattr(default, flag, None)
    ]


def tiny_random_folder() -> Path:
    """Where the tiny-random preset keeps its files (shared by the processes that use it)."""
    return Path(tempfile.gettempdir()) / "pulid-flux-tiny-random"


def lora_folder(args: argparse.Namespace) -> Path:
    """The folder of LoRA files by name (``models/loras/``) of the real models these flags load."""
    from pulid.catalogue import default_models_dir

    return Path(args.models_dir or default_models_dir()) / "loras"


def build_pipeline(args: argparse.Namespace):
    """The pipeline the flags ask for (the tiny-random preset, or the real models)."""
    from transformers.utils import logging as transformers_logging

    # transformers draws a bar for each model it loads or writes, at every start: noise in a server's
    # console (the download tool keeps the hub's own bars, which matter there)
    transformers_logging.disable_progress_bar()

    if args.preset == "tiny-random":
        from tiny_random.pipeline import tiny_pipeline_with_face_models

        if ignored := ignored_by_preset(args):
            logger.warning(
                "--preset tiny-random builds tiny random models on the CPU; it ignores %s", ", ".join(ignored)
            )

        folder = tiny_random_folder()
        if not args.sequence_parallel:
            return tiny_pipeline_with_face_models(folder)
        import torch.distributed as dist

        from flux.parallel import SequenceParallelFlux
        from pulid.serve.ranks import join_torchrun

        first = join_torchrun().leads  # rank 0 writes the tiny files; the others read them after
        if not first:
            dist.barrier()
        pipeline = tiny_pipeline_with_face_models(folder)
        if first:
            dist.barrier()
        return pipeline.with_options(parallel=SequenceParallelFlux(pipeline.dit))
    from pulid.loading import load_pipeline

    config = pipeline_config(args)
    if args.sequence_parallel:  # the device is the rank's (flag_conflicts refuses a --device)
        from pulid.serve.ranks import join_torchrun

        config = dataclasses.replace(config, device=join_torchrun().device)
    return load_pipeline(config)


def pipeline_config(args: argparse.Namespace):
    """The :class:`~pulid.loading.PipelineConfig` of the model flags."""
    from pulid.loading import PipelineConfig

    return PipelineConfig(
        args.name,
        args.version,
        args.device,
        fp8=args.fp8_mode if args.fp8 else None,
        compiled=args.compile,
        memory=memory_policy(args),
        onnx_provider=args.onnx_provider,
        pretrained_model=args.pretrained_model,
        models_dir=args.models_dir,
        dit=args.dit,
        t5=args.t5,
        clip=args.clip,
        devices=args.devices,
        sequence_parallel=args.sequence_parallel,
    )


def flag_conflicts(args: argparse.Namespace, on_zero_gpu: bool = False) -> list[str]:
    """Every rule between the start's flags, in one place: what cannot go together, each with what
    to drop (empty: nothing). The pipeline's own rules (:meth:`~pulid.loading.PipelineConfig.conflicts`:
    devices, single files) come first, then those of the serving topology, then, in a ZeroGPU
    Space, those of a GPU lent per call. Rules that need the machine (fp8 matrix units, a CUDA
    device for a memory budget, enough GPUs) are checked when the pipeline loads."""
    found = [] if args.preset is not None else pipeline_config(args).conflicts()
    if args.sequence_parallel and args.device is not None:
        found.append("--sequence_parallel gives each rank its own GPU (cuda:LOCAL_RANK): drop --device")
    replicas, ray = getattr(args, "replicas", 1), getattr(args, "ray", False)
    placed = args.device is not None or args.devices is not None or args.sequence_parallel
    if (replicas > 1 or ray) and placed:
        flag = "--ray" if ray else "--replicas"
        found.append(
            f"{flag} puts one whole pipeline on each GPU: drop --device, --devices and --sequence_parallel"
        )
    if on_zero_gpu:
        found += zero_gpu_conflicts(args, replicas, ray)
    return found


def zero_gpu_conflicts(args: argparse.Namespace, replicas: int, ray: bool) -> list[str]:
    """The flags a ZeroGPU Space refuses. The models must be placed on the one GPU at start-up:
    ``spaces`` moves all of them into each worker, so memory modes would only slow every call down."""
    found = []
    if args.offload or args.aggressive_offload or args.vram_budget is not None:
        found.append(
            "--offload, --aggressive_offload and --vram_budget do nothing useful on ZeroGPU, whose "
            "slice (about 70 GB) holds the whole app: remove them from PULID_FLUX_ARGS."
        )
    if args.device not in (None, "cuda", "cuda:0") or args.devices is not None:
        given = f"--devices {args.devices}" if args.devices is not None else f"--device {args.device}"
        found.append(f"{given}: a ZeroGPU Space has one GPU, cuda: remove it.")
    if ray:
        found.append("--ray: a ZeroGPU Space schedules its own GPU slices; remove it.")
    if replicas > 1:
        found.append("--replicas: ZeroGPU gives each call its own GPU slice already; remove it.")
    if args.sequence_parallel:
        found.append("--sequence_parallel needs several GPUs under torchrun: remove it on ZeroGPU.")
    if args.preset is not None:
        found.append(f"--preset {args.preset} runs on the CPU: remove it on a ZeroGPU Space.")
    return found


def exit_on_conflicts(args: argparse.Namespace, on_zero_gpu: bool = False) -> None:
    """Stop the start, before anything loads, with every :func:`flag_conflicts` found."""
    if problems := flag_conflicts(args, on_zero_gpu):
        where = " on ZeroGPU" if on_zero_gpu else ""
        raise SystemExit(f"\nCannot start{where}:\n- " + "\n- ".join(problems) + "\n")


def build_replicas(args: argparse.Namespace, count: int) -> list:
    """``count`` pipelines, one per GPU (cuda:0, cuda:1, ...; the tiny preset: on the CPU), each
    with the memory flags for its own GPU."""
    from flux.devices import HardwareError

    if count < 1:
        raise HardwareError(f"--replicas {count}: give at least one")
    if count == 1:
        return [build_pipeline(args)]
    if args.preset is None:
        import torch

        found = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count > found:
            raise HardwareError(f"--replicas {count} needs {count} GPUs and this machine has {found}")
    replicas = []
    for index in range(count):
        one = argparse.Namespace(**vars(args))
        if args.preset is None:
            one.device = f"cuda:{index}"
        replicas.append(build_pipeline(one))
    return replicas


def load_or_exit(args: argparse.Namespace, replicas: int | None = None):
    """:func:`build_pipeline` (or, with ``replicas``, :func:`build_replicas`'s list), or exit with
    status 1 and the reason when the start cannot go on."""
    try:
        return build_pipeline(args) if replicas is None else build_replicas(args, replicas)
    except UserError as err:
        logger.debug("start-up failed", exc_info=True)
        raise SystemExit(f"\n{before_the_weights_list(args, err)}Cannot start: {err}\n") from None


def before_the_weights_list(args: argparse.Namespace, err: Exception) -> str:
    """What to know before a list of weights to download: a --models_dir that does not exist (a
    misspelt one read as an empty folder), and, on a machine without a CUDA GPU, what the real
    models need and the preset that runs there (a CPU user went straight to 38 GB of downloads)."""
    import torch

    from flux.hub import WeightsNotFoundError

    if not isinstance(err, WeightsNotFoundError):
        return ""
    notes = ""
    if args.models_dir is not None and not Path(args.models_dir).expanduser().exists():
        notes += (
            f"--models_dir {args.models_dir} does not exist (a typo?): the files below would be "
            "downloaded into it.\n\n"
        )
    if args.device not in (None, "cpu") or torch.cuda.is_available():
        return notes
    return notes + (
        "This machine has no CUDA GPU. The real models want an NVIDIA GPU (8 GB at least with the "
        "small-card files; README, Weights); on a CPU they take tens of GB of memory and many "
        "minutes per image. To try the app here first, with nothing to download:\n"
        "    python app_flux.py --preset tiny-random\n\n"
    )
