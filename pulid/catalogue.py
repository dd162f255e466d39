"""Every weight file the product can load, in one place: where it comes from, its size, where it goes.

Each :class:`CatalogueEntry` is a :class:`flux.hub.HubWeights` (hub repo, file or folder of files,
size, place under ``models/``) plus a role and the flags that need it. :func:`required_weights`
says which entries a set of flags needs; the loader (:mod:`pulid.loading`), the download command
(``python -m pulid.serve.download``) and the README's table (:func:`markdown_table`, kept in step by a
test) all come from here.

Sizes are the files' tensor bytes from the checkpoint manifests (the files add a small header), or
the hub's listed sizes where no manifest exists (the text encoders, the face models).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from flux.errors import UserError
from flux.hub import HubWeights, format_size

CHECKOUT = Path(__file__).resolve().parent.parent  # the source checkout, when run from one


def default_models_dir() -> Path:
    """``$PULID_MODELS_DIR``; else ``models/`` of the source checkout; else ``./models`` (installed)."""
    if os.environ.get("PULID_MODELS_DIR"):
        return Path(os.environ["PULID_MODELS_DIR"]).expanduser()
    if (CHECKOUT / "pyproject.toml").is_file():
        return CHECKOUT / "models"
    return Path.cwd() / "models"


DEFAULT_MODEL = "flux-dev"  # --name
DEFAULT_VERSION = "v0.9.1"  # --version
PULID_VERSIONS = ("v0.9.0", "v0.9.1")
FP8_MODES = ("auto", "native", "quanto")

FLUX_DEV_LICENCE = "https://huggingface.co/black-forest-labs/FLUX.1-dev/blob/main/LICENSE.md"
FLUX_KREA_LICENCE = "https://huggingface.co/black-forest-labs/FLUX.1-Krea-dev/blob/main/LICENSE.md"
INSIGHTFACE_LICENCE = "https://github.com/deepinsight/insightface#license"

FLUX_DIT_BYTES = 23_802_816_640  # 11,901,408,320 bf16 parameters
AE_BYTES = 335_278_732  # float32
FP8_DIT_BYTES = 11_910_628_048  # fp8 weights, bf16 scales and biases
PULID_BYTES = 1_142_067_200  # 571,033,600 bf16 parameters
# google/t5-v1_1-xxl encoder in bf16 (two shards) and its tokenizer files, as the hub lists them.
T5_XXL_FILES = (
    "config.json",
    "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors",
    "model.safetensors.index.json",
    "spiece.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)
T5_XXL_BYTES = 9_525_486_640  # about: the shards 4,994,582,224 + 4,530,066,360 and small files
# The CLIP ViT-L/14 repo holds four copies of the weights (PyTorch, safetensors, TF, Flax): only
# the safetensors one is fetched, with the config and the tokenizer files.
CLIP_L_FILES = (
    "config.json",
    "model.safetensors",
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
CLIP_L_BYTES = 1_712_032_155  # model.safetensors 1,710,540,580 and small files


class WeightChoiceError(UserError, ValueError):
    """Flags that choose weight files which cannot go together, or a name that is not in the catalogue."""


@dataclass(frozen=True)
class CatalogueEntry:
    """One weight file (or folder) of the product: its role, its source, and the flags that need it."""

    role: str  # what the loader uses it as: "dit", "ae", "t5", "clip", "pulid", "eva", ...
    weights: HubWeights
    needed_by: str  # for people: the flags that make the app load it


def _flux(name: str, repo: str, licence: str, dit_file: str, ae_local: str) -> tuple[CatalogueEntry, ...]:
    model = repo.split("/")[1]
    return (
        CatalogueEntry(
            "dit",
            HubWeights(
                repo,
                (dit_file,),
                FLUX_DIT_BYTES,
                dit_file,
                f"the {model} transformer",
                gated=True,
                licence_url=licence,
            ),
            f"`--name {name}`"
            + (" (default)" if name == DEFAULT_MODEL else "")
            + ", unless `--fp8_mode quanto`",
        ),
        CatalogueEntry(
            "ae",
            HubWeights(
                repo,
                ("ae.safetensors",),
                AE_BYTES,
                ae_local,
                f"the {model} autoencoder",
                gated=True,
                licence_url=licence,
            ),
            f"`--name {name}`" + (" (default)" if name == DEFAULT_MODEL else ""),
        ),
    )


FLUX_WEIGHTS: dict[str, tuple[CatalogueEntry, ...]] = {
    "flux-dev": _flux(
        "flux-dev",
        "black-forest-labs/FLUX.1-dev",
        FLUX_DEV_LICENCE,
        "flux1-dev.safetensors",
        "ae.safetensors",
    ),
    "flux-krea-dev": _flux(
        "flux-krea-dev",
        "black-forest-labs/FLUX.1-Krea-dev",
        FLUX_KREA_LICENCE,
        "flux1-krea-dev.safetensors",
        "krea-ae.safetensors",
    ),
}
FP8_DIT = CatalogueEntry(
    "dit",
    HubWeights(
        "XLabs-AI/flux-dev-fp8",
        ("flux-dev-fp8.safetensors",),
        FP8_DIT_BYTES,
        "flux-dev-fp8.safetensors",
        "the FLUX.1-dev transformer in fp8 (XLabs, optimum-quanto)",
    ),
    "`--fp8 --fp8_mode quanto` (or `--fp8` on GPUs without fp8 units), flux-dev only",
)
FP8_MAP = CatalogueEntry(
    "fp8_map",
    HubWeights(
        "XLabs-AI/flux-dev-fp8",
        ("flux_dev_quantization_map.json",),
        26_537,
        "flux_dev_quantization_map.json",
        "the quantization map of XLabs' fp8 transformer",
        optional=True,
    ),
    "as the fp8 file (optional: the built-in map is the same)",
)
TEXT_ENCODERS = (
    CatalogueEntry(
        "t5",
        HubWeights(
            "xlabs-ai/xflux_text_encoders",
            T5_XXL_FILES,
            T5_XXL_BYTES,
            "xflux_text_encoders",
            "the T5-XXL text encoder (bf16)",
            folder=True,
        ),
        "always",
    ),
    CatalogueEntry(
        "clip",
        HubWeights(
            "openai/clip-vit-large-patch14",
            CLIP_L_FILES,
            CLIP_L_BYTES,
            "clip-vit-large-patch14",
            "the CLIP ViT-L/14 text encoder",
            folder=True,
        ),
        "always",
    ),
)


# Single files for small cards (sizes as the hub lists them). City96's GGUF files keep the official
# key names; Kijai's fp8 file is the transformer alone in float8_e4m3fn.
def _single(role: str, repo: str, file: str, size: int, what: str, needed: str) -> CatalogueEntry:
    return CatalogueEntry(role, HubWeights(repo, (file,), size, file, what), needed)


CITY96_FLUX = "city96/FLUX.1-dev-gguf"
CITY96_T5 = "city96/t5-v1_1-xxl-encoder-gguf"
COMFY_TEXT = "comfyanonymous/flux_text_encoders"
DIT_FILES: dict[str, CatalogueEntry] = {
    name: _single("dit", repo, file, size, what, f"`--dit {name}`")
    for name, repo, file, size, what in (
        (
            "flux-dev-fp8",
            "Kijai/flux-fp8",
            "flux1-dev-fp8-e4m3fn.safetensors",
            11_900_000_000,
            "the FLUX.1-dev transformer in fp8 e4m3fn (Kijai, one file)",
        ),
        (
            "flux-dev-Q8_0",
            CITY96_FLUX,
            "flux1-dev-Q8_0.gguf",
            12_700_000_000,
            "the FLUX.1-dev transformer, GGUF Q8_0 (city96)",
        ),
        (
            "flux-dev-Q6_K",
            CITY96_FLUX,
            "flux1-dev-Q6_K.gguf",
            9_860_000_000,
            "the FLUX.1-dev transformer, GGUF Q6_K (city96)",
        ),
        (
            "flux-dev-Q5_K_S",
            CITY96_FLUX,
            "flux1-dev-Q5_K_S.gguf",
            8_290_000_000,
            "the FLUX.1-dev transformer, GGUF Q5_K_S (city96)",
        ),
        (
            "flux-dev-Q4_K_S",
            CITY96_FLUX,
            "flux1-dev-Q4_K_S.gguf",
            6_810_000_000,
            "the FLUX.1-dev transformer, GGUF Q4_K_S (city96)",
        ),
    )
}
T5_FILES: dict[str, CatalogueEntry] = {
    name: _single("t5", repo, file, size, what, f"`--t5 {name}`")
    for name, repo, file, size, what in (
        ("t5xxl-fp16", COMFY_TEXT, "t5xxl_fp16.safetensors", 9_790_000_000, "T5-XXL in fp16 (one file)"),
        (
            "t5xxl-fp8",
            COMFY_TEXT,
            "t5xxl_fp8_e4m3fn.safetensors",
            4_890_000_000,
            "T5-XXL in fp8 e4m3fn (one file)",
        ),
        (
            "t5xxl-Q8_0",
            CITY96_T5,
            "t5-v1_1-xxl-encoder-Q8_0.gguf",
            5_060_000_000,
            "T5-XXL encoder, GGUF Q8_0",
        ),
        (
            "t5xxl-Q5_K_M",
            CITY96_T5,
            "t5-v1_1-xxl-encoder-Q5_K_M.gguf",
            3_390_000_000,
            "T5-XXL encoder, GGUF Q5_K_M",
        ),
        (
            "t5xxl-Q4_K_M",
            CITY96_T5,
            "t5-v1_1-xxl-encoder-Q4_K_M.gguf",
            2_900_000_000,
            "T5-XXL encoder, GGUF Q4_K_M",
        ),
    )
}
CLIP_FILES: dict[str, CatalogueEntry] = {
    "clip-l": _single(
        "clip",
        COMFY_TEXT,
        "clip_l.safetensors",
        246_144_152,
        "CLIP-L text encoder (one file)",
        "`--clip clip-l`",
    )
}
# The tokenizers of single-file text encoders: the small files of the repos the folders come from.
TOKENIZERS = {
    "t5_tokenizer": CatalogueEntry(
        "t5_tokenizer",
        HubWeights(
            "xlabs-ai/xflux_text_encoders",
            ("spiece.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"),
            800_000,
            "t5-tokenizer",
            "the T5 tokenizer (for single-file T5)",
            folder=True,
        ),
        "`--t5 FILE_OR_NAME`",
    ),
    "clip_tokenizer": CatalogueEntry(
        "clip_tokenizer",
        HubWeights(
            "openai/clip-vit-large-patch14",
            ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"),
            1_600_000,
            "clip-tokenizer",
            "the CLIP tokenizer (for single-file CLIP-L)",
            folder=True,
        ),
        "`--clip FILE_OR_NAME`",
    ),
}
SINGLE_FILE_CHOICES = {"dit": DIT_FILES, "t5": T5_FILES, "clip": CLIP_FILES}
# The loader's role for each choice (the role of every entry in that table).
SINGLE_FILE_ROLES = {kind: next(iter(table.values())).role for kind, table in SINGLE_FILE_CHOICES.items()}


PULID_WEIGHTS: dict[str, CatalogueEntry] = {
    version: CatalogueEntry(
        "pulid",
        HubWeights(
            "guozinan/PuLID",
            (f"pulid_flux_{version}.safetensors",),
            PULID_BYTES,
            f"pulid_flux_{version}.safetensors",
            f"the PuLID-FLUX {version} weights",
        ),
        f"`--version {version}`" + (" (default)" if version == DEFAULT_VERSION else ""),
    )
    for version in PULID_VERSIONS
}
ID_MODELS = (
    CatalogueEntry(
        "eva",
        HubWeights(
            "QuanSun/EVA-CLIP",
            ("EVA02_CLIP_L_336_psz14_s6B.pt",),
            # 428,083,137 parameters of the full CLIP in fp16, plus pickle overhead (approximate)
            856_200_000,
            "EVA02_CLIP_L_336_psz14_s6B.pt",
            "the EVA02-CLIP-L-14-336 checkpoint (face features)",
        ),
        "always",
    ),
    CatalogueEntry(
        "detector",
        HubWeights(
            "DIAMONIK7777/antelopev2",
            ("scrfd_10g_bnkps.onnx",),
            16_923_827,
            "antelopev2/scrfd_10g_bnkps.onnx",
            "the insightface antelopev2 face detector (SCRFD-10GF)",
            licence_url=INSIGHTFACE_LICENCE,
        ),
        "always",
    ),
    CatalogueEntry(
        "recognizer",
        HubWeights(
            "DIAMONIK7777/antelopev2",
            ("glintr100.onnx",),
            260_665_334,
            "antelopev2/glintr100.onnx",
            "the insightface antelopev2 ArcFace recogniser (glintr100)",
            licence_url=INSIGHTFACE_LICENCE,
        ),
        "always",
    ),
    # facexlib publishes these as GitHub release assets (v0.1.0/detection_Resnet50_Final.pth,
    # v0.2.0/parsing_bisenet.pth, v0.2.2/parsing_parsenet.pth under
    # https://github.com/xinntao/facexlib/releases/download), not on the
    # hub; leonelhs/facexlib mirrors them.
    CatalogueEntry(
        "retinaface",
        HubWeights(
            "leonelhs/facexlib",
            ("detection_Resnet50_Final.pth",),
            109_497_761,
            "facexlib/detection_Resnet50_Final.pth",
            "facexlib's RetinaFace-ResNet50 face detector",
        ),
        "always",
    ),
    CatalogueEntry(
        "bisenet",
        HubWeights(
            "leonelhs/facexlib",
            ("parsing_bisenet.pth",),
            53_289_463,
            "facexlib/parsing_bisenet.pth",
            "facexlib's BiSeNet face parser",
        ),
        "always",
    ),
    CatalogueEntry(
        "parsenet",
        HubWeights(
            "leonelhs/facexlib",
            ("parsing_parsenet.pth",),
            85_331_193,
            "facexlib/parsing_parsenet.pth",
            "facexlib's ParseNet face parser (its helper loads it; PuLID uses BiSeNet)",
        ),
        "always",
    ),
)
FACE_MODEL_ROLES = ("detector", "recognizer", "retinaface", "bisenet", "parsenet")
FACEXLIB_ROLES = ("retinaface", "parsenet", "bisenet")  # one folder, as facexlib's model_rootpath
# The files facexlib reads from that folder, under the names it looks for.
FACEXLIB_FILES = tuple(
    Path(entry.weights.local_name).name for entry in ID_MODELS if entry.role in FACEXLIB_ROLES
)


@dataclass(frozen=True)
class SpeedLoRA:
    """A LoRA distilled for few steps, known by name, with the settings its authors recommend."""

    name: str
    entry: CatalogueEntry
    steps: int
    guidance: float
    strength: float
    source_note: str  # where the recommendation comes from


def _speed_lora(
    name: str, repo: str, file: str, size: int, steps: int, guidance: float, strength: float, note: str
) -> SpeedLoRA:
    entry = CatalogueEntry(
        "lora",
        HubWeights(repo, (file,), size, f"loras/{name}.safetensors", f"the {name} speed LoRA", optional=True),
        f"`--speed_lora {name}` or the UI's {steps}-step preset",
    )
    return SpeedLoRA(name, entry, steps, guidance, strength, note)


# Sizes as the hub lists them. Recommended settings from the model cards: Hyper-SD's FLUX example
# fuses the LoRA at scale 0.125 with 8 steps and guidance 3.5; FLUX.1-Turbo-Alpha's card gives
# guidance_scale 3.5, lora_scale 1 and 8 steps.
SPEED_LORAS: dict[str, SpeedLoRA] = {
    lora.name: lora
    for lora in (
        _speed_lora(
            "Hyper-FLUX.1-dev-8steps",
            "ByteDance/Hyper-SD",
            "Hyper-FLUX.1-dev-8steps-lora.safetensors",
            1_390_000_000,
            8,
            3.5,
            0.125,
            "ByteDance/Hyper-SD model card",
        ),
        _speed_lora(
            "FLUX.1-Turbo-Alpha",
            "alimama-creative/FLUX.1-Turbo-Alpha",
            "diffusion_pytorch_model.safetensors",
            694_000_000,
            8,
            3.5,
            1.0,
            "alimama-creative/FLUX.1-Turbo-Alpha model card",
        ),
    )
}

CATALOGUE: tuple[CatalogueEntry, ...] = (
    *(entry for entries in FLUX_WEIGHTS.values() for entry in entries),
    FP8_DIT,
    FP8_MAP,
    *DIT_FILES.values(),
    *TEXT_ENCODERS,
    *T5_FILES.values(),
    *CLIP_FILES.values(),
    *TOKENIZERS.values(),
    *PULID_WEIGHTS.values(),
    *ID_MODELS,
    *(lora.entry for lora in SPEED_LORAS.values()),
)


def check_choice(model: str, version: str, fp8: str | None) -> None:
    """Raise ValueError naming the allowed values when a flag is not one of them."""
    if model not in FLUX_WEIGHTS:
        raise WeightChoiceError(f"Unknown model {model!r}; choose one of {', '.join(FLUX_WEIGHTS)}")
    if version not in PULID_WEIGHTS:
        versions = ", ".join(PULID_WEIGHTS)
        raise WeightChoiceError(f"Unknown PuLID version {version!r}; choose one of {versions}")
    if fp8 not in (None, "native", "quanto"):
        raise ValueError(f"fp8 must be None, 'native' or 'quanto' once resolved, not {fp8!r}")
    if fp8 == "quanto" and model != "flux-dev":
        raise WeightChoiceError(
            f"There is no fp8 (quanto) checkpoint for {model}, and --fp8 uses one here (--fp8_mode auto "
            "picks quanto without fp8 matrix units). Run it without --fp8, or with --fp8_mode native on "
            "a GPU that has them (Ada, Hopper, Blackwell)."
        )


def single_file_conflicts(model: str, fp8: str | None, files: Mapping[str, str | None]) -> list[str]:
    """The single-file choices that cannot go with the other flags, each with what to do instead."""
    found = []
    dit = files.get("dit")
    if dit is not None and fp8 is not None:
        found.append(
            "--fp8 quantises the bf16 checkpoint as it loads, --dit chooses a file that is already "
            "quantised: pass one of them."
        )
    if dit in DIT_FILES and model != "flux-dev":
        found.append(
            f"--dit {dit} is a FLUX.1-dev file; with --name {model} give a path to a file of that model."
        )
    return found


def check_single_files(model: str, fp8: str | None, files: Mapping[str, str | None]) -> None:
    """Raise :class:`WeightChoiceError` for :func:`single_file_conflicts`."""
    if found := single_file_conflicts(model, fp8, files):
        raise WeightChoiceError(" ".join(found))


def is_path_choice(kind: str, value: str | None) -> bool:
    """Whether a --dit/--t5/--clip value is a file path rather than a catalogue name."""
    return value is not None and value not in SINGLE_FILE_CHOICES[kind]


def check_single_file_name(kind: str, value: str | None) -> None:
    """Raise :class:`WeightChoiceError` for a value that is neither a catalogue name nor a .gguf or
    .safetensors path."""
    if value is None or value in SINGLE_FILE_CHOICES[kind]:
        return
    if not value.endswith((".gguf", ".safetensors")):
        names = ", ".join(SINGLE_FILE_CHOICES[kind])
        raise WeightChoiceError(f"--{kind} {value!r} is neither one of {names} nor a .gguf/.safetensors file")


def required_weights(
    model: str = DEFAULT_MODEL,
    version: str = DEFAULT_VERSION,
    fp8: str | None = None,
    files: Mapping[str, str | None] | None = None,
) -> dict[str, CatalogueEntry]:
    """Role -> entry for what these flags load (``fp8``: None, "native" or "quanto", resolved).

    ``files`` are the single-file choices (``dit``, ``t5``, ``clip``: a catalogue name or a path).
    A path keeps an entry of the same kind in the table (for messages); the loader is given the path.
    """
    files = dict(files or {})
    check_choice(model, version, fp8)
    check_single_files(model, fp8, files)
    for kind, value in files.items():
        check_single_file_name(kind, value)
    dit, ae = FLUX_WEIGHTS[model]
    t5, clip = TEXT_ENCODERS
    if files.get("dit") is not None:
        dit = DIT_FILES.get(files["dit"], dit)
    entries = [FP8_DIT, FP8_MAP] if fp8 == "quanto" else [dit]
    if files.get("t5") is not None:
        entries += [T5_FILES.get(files["t5"], T5_FILES["t5xxl-fp16"]), TOKENIZERS["t5_tokenizer"]]
    else:
        entries.append(t5)
    if files.get("clip") is not None:
        entries += [CLIP_FILES.get(files["clip"], CLIP_FILES["clip-l"]), TOKENIZERS["clip_tokenizer"]]
    else:
        entries.append(clip)
    entries += [ae, PULID_WEIGHTS[version], *ID_MODELS]
    return {entry.role: entry for entry in entries}


def markdown_table(entries: Iterable[CatalogueEntry] = CATALOGUE) -> str:
    """The README's table of weight files (a test keeps README in step with it)."""
    lines = [
        "| what | needed for | hub repo | file(s) | size | place it at |",
        "|---|---|---|---|---|---|",
    ]
    for entry in entries:
        weights = entry.weights
        files = ", ".join(f"`{name}`" for name in weights.files)
        gated = " (gated: accept the licence, set `HF_TOKEN`)" if weights.gated else ""
        where = f"`models/{weights.local_name}{'/' if weights.folder else ''}`"
        lines.append(
            f"| {weights.description}{gated} | {entry.needed_by} | `{weights.repo_id}` | {files} | "
            f"{format_size(weights.size_bytes)} | {where} |"
        )
    return "\n".join(lines)
