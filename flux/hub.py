"""Where weight files come from, and one clear error when they cannot be had.

Every weight file the product loads is described by a :class:`WeightFile`. :func:`resolve_weight`
finds it in this order:

1. an explicit path the user gave (a flag such as ``--pretrained_model``);
2. the ``models/`` folder (``PULID_MODELS_DIR`` overrides it), under the file's ``local_name``;
3. a download into the Hugging Face cache (``HF_HOME``), unless downloads are disabled or the
   machine is offline (``HF_HUB_OFFLINE=1``).

When none works the user gets a :class:`WeightsNotFoundError` that names the repo, the file, its
size, the folder to place it in and, for gated repos such as FLUX.1-dev, that the licence must be
accepted and ``HF_TOKEN`` set.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class WeightFile:
    """One downloadable weight file."""

    repo_id: str
    filename: str
    size_bytes: int
    local_name: str
    description: str
    gated: bool = False
    licence_url: str | None = None

    @property
    def url(self) -> str:
        return f"https://huggingface.co/{self.repo_id}/blob/main/{self.filename}"


class WeightsNotFoundError(FileNotFoundError):
    """A weight file is neither on disk nor downloadable; the message says how to get it."""


def default_models_dir() -> Path:
    """The folder the app looks in first: ``$PULID_MODELS_DIR`` or ``<repo>/models``."""
    return Path(os.environ.get("PULID_MODELS_DIR", REPO_ROOT / "models"))


def format_size(num_bytes: int) -> str:
    """Human-readable size in decimal units, as the hub shows them."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.1f} {unit}"
    return f"{num_bytes} B"


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` forbids reaching the hub."""
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def how_to_get(spec: WeightFile, models_dir: Path, reason: str) -> str:
    """The user-facing explanation of where a missing file comes from and where it goes."""
    target = models_dir / spec.local_name
    lines = [
        f"Cannot find {spec.description} ({spec.filename}, {format_size(spec.size_bytes)}): {reason}",
        f"  - download it from {spec.url}",
        f"  - and place it at {target}",
    ]
    if spec.gated:
        lines.append(
            f"  - {spec.repo_id} is a gated repo: accept its licence at "
            f"{spec.licence_url or 'https://huggingface.co/' + spec.repo_id} while logged in, then set "
            "HF_TOKEN (or run `hf auth login`) so the app can download it"
        )
    lines.append("  - or pass its path explicitly, or unset HF_HUB_OFFLINE to let the app download it")
    return "\n".join(lines)


def resolve_weight(
    spec: WeightFile,
    explicit_path: str | os.PathLike | None = None,
    models_dir: str | os.PathLike | None = None,
    allow_download: bool = True,
) -> Path:
    """Return a local path to ``spec``: explicit path, then ``models/``, then the HF cache."""
    models_dir = Path(models_dir) if models_dir is not None else default_models_dir()
    if explicit_path is not None:
        path = Path(explicit_path).expanduser()
        if not path.is_file():
            raise WeightsNotFoundError(how_to_get(spec, models_dir, f"the given path {path} is not a file."))
        return path
    local = models_dir / spec.local_name
    if local.is_file():
        return local
    if not allow_download:
        raise WeightsNotFoundError(how_to_get(spec, models_dir, "it is not in the models folder."))
    if hub_offline():
        raise WeightsNotFoundError(
            how_to_get(spec, models_dir, "it is not in the models folder and HF_HUB_OFFLINE is set.")
        )
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError

    logger.info("Downloading %s from %s (%s)", spec.filename, spec.repo_id, format_size(spec.size_bytes))
    try:
        return Path(hf_hub_download(spec.repo_id, spec.filename))
    except GatedRepoError as err:
        raise WeightsNotFoundError(
            how_to_get(
                spec,
                models_dir,
                "the hub refused the download (gated repo, licence not accepted or HF_TOKEN not set).",
            )
        ) from err
    except LocalEntryNotFoundError as err:
        raise WeightsNotFoundError(
            how_to_get(spec, models_dir, "the hub cannot be reached (offline?) and it is not in the cache.")
        ) from err
    except (HfHubHTTPError, OSError) as err:
        raise WeightsNotFoundError(how_to_get(spec, models_dir, f"the download failed: {err}")) from err
