"""Where weight files come from: on disk, in the Hugging Face cache, or downloaded, and one clear error.

A :class:`HubWeights` names one entry of a weight catalogue: a file of a hub repo, or a folder of
files (a transformers model). This module only knows how to find and fetch such entries; which
entries a product needs is the catalogue's business (``pulid.catalogue``).

:func:`find_local` looks, without touching the network, in this order:

1. an explicit path the user gave (a flag such as ``--pretrained_model``);
2. the models folder the caller gives (the product's default: ``pulid.catalogue.default_models_dir``),
   under the entry's ``local_name``;
3. the Hugging Face cache (``HF_HOME``), where an earlier download put it.

:func:`hub_reachable` decides once per process, within a few seconds, whether downloading is
possible at all, so a machine without network learns everything that is missing at once instead
of after minutes of retries. :func:`download` fetches an entry (with huggingface_hub's progress
bars and resume) into the models folder or the cache, and turns a refused gated download into the
message that says what to do.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from flux.errors import UserError

logger = logging.getLogger(__name__)

REACHABILITY_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class HubWeights:
    """One catalogue entry: a file of a hub repo, or (``folder=True``) a folder of its files.

    ``files`` are paths inside the repo; ``local_name`` is where the entry lives under the models
    folder: the file itself, or the folder that holds ``files`` under their repo names.
    """

    repo_id: str
    files: tuple[str, ...]
    size_bytes: int
    local_name: str
    description: str
    folder: bool = False
    gated: bool = False
    licence_url: str | None = None
    optional: bool = False  # the product works without it (a default replaces it)

    def __post_init__(self) -> None:
        if not self.files or (not self.folder and len(self.files) != 1):
            raise ValueError(f"{self.local_name}: a file entry has one file, a folder entry at least one")

    @property
    def filename(self) -> str:
        """The repo file of a file entry (for a folder: its first file)."""
        return self.files[0]

    @property
    def url(self) -> str:
        path = "tree/main" if self.folder else f"blob/main/{self.filename}"
        return f"https://huggingface.co/{self.repo_id}/{path}"

    def local_path(self, models_dir: Path) -> Path:
        return Path(models_dir) / self.local_name


class WeightsNotFoundError(UserError, FileNotFoundError):
    """Weight files are neither on disk nor downloadable; the message says how to get each one."""


def format_size(num_bytes: int) -> str:
    """Human-readable size in decimal units, as the hub shows them."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.1f} {unit}"
    return f"{num_bytes} B"


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` forbids reaching the hub."""
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in ("1", "true", "yes", "on")


_reachable: dict[str, bool] = {}
_reachable_lock = threading.Lock()


def hub_reachable(timeout: float = REACHABILITY_TIMEOUT_S) -> bool:
    """Whether the hub answers an HTTP request within ``timeout`` seconds (asked once per endpoint).

    ``HF_HUB_OFFLINE=1`` answers False at once. Otherwise one HEAD request goes to the endpoint
    (``HF_ENDPOINT``, default huggingface.co) and must get a success or redirect: a refused or
    silent connection, a failed name lookup or a proxy that answers with an error all mean
    "offline". The request runs in a daemon thread, so a resolver that hangs cannot hold the
    caller longer than ``timeout`` either.
    """
    if hub_offline():
        return False
    from huggingface_hub import constants

    endpoint = constants.ENDPOINT
    with _reachable_lock:
        if endpoint in _reachable:
            return _reachable[endpoint]
        answer: list[bool] = []

        def probe() -> None:
            import httpx

            try:
                response = httpx.head(endpoint, timeout=timeout, follow_redirects=False)
                answer.append(response.status_code < 400)
            except (httpx.HTTPError, OSError):
                answer.append(False)

        thread = threading.Thread(target=probe, daemon=True, name="hub-probe")
        thread.start()
        thread.join(timeout + 0.5)
        _reachable[endpoint] = bool(answer and answer[0])
        if not _reachable[endpoint]:
            logger.info("The hub (%s) does not answer: nothing will be downloaded", endpoint)
        return _reachable[endpoint]


def download_blocked() -> str | None:
    """Why nothing can be downloaded now (``HF_HUB_OFFLINE``, an unreachable hub), or None."""
    if hub_offline():
        return "HF_HUB_OFFLINE is set, so nothing is downloaded"
    if not hub_reachable():
        return "the Hugging Face hub cannot be reached (no network?), so nothing can be downloaded"
    return None


def _cached(entry: HubWeights) -> Path | None:
    """The entry's path in the Hugging Face cache, if every one of its files is there."""
    from huggingface_hub import try_to_load_from_cache

    found = []
    for name in entry.files:
        path = try_to_load_from_cache(entry.repo_id, name)
        if not isinstance(path, str):  # None, or the "known not to exist" sentinel
            return None
        found.append(Path(path))
    if not entry.folder:
        return found[0]
    return found[0].parents[len(Path(entry.files[0]).parts) - 1]  # the snapshot folder


def local_problem(entry: HubWeights, path: Path) -> str | None:
    """Why what is at ``path`` is not ``entry`` though something is there: a folder in a file's
    place (or a file in a folder's), or an empty file (a download that was cut off at once). None
    when it looks whole, or nothing is there. (A file cut off later is found by its loader, which
    reads its header; the catalogue's sizes are the hub's, to three figures, and not a check.)"""
    if not path.exists():
        return None
    if entry.folder:
        if not path.is_dir():
            return f"{path} is a file where a folder belongs: remove it"
        for name in entry.files:
            inner = path / name
            if inner.is_dir():
                return f"{inner} is a folder where a file belongs: remove it"
            if inner.is_file() and inner.stat().st_size == 0:
                return f"{inner} is empty (a download that was cut off?)"
        return None
    if path.is_dir():
        return f"{path} is a folder where the file belongs: remove it"
    if path.stat().st_size == 0:
        return f"{path} is empty (a download that was cut off?)"
    return None


def _complete(entry: HubWeights, path: Path) -> bool:
    if local_problem(entry, path) is not None:
        return False
    if entry.folder:
        return path.is_dir() and all((path / name).is_file() for name in entry.files)
    return path.is_file()


def find_local(
    entry: HubWeights, models_dir: Path, explicit_path: str | os.PathLike | None = None
) -> Path | None:
    """Where ``entry`` is on this machine (explicit path, models folder, HF cache), or None.

    An explicit path that does not exist is an error (the user asked for that very file).
    """
    if explicit_path is not None:
        path = Path(explicit_path).expanduser()
        if problem := local_problem(entry, path):
            raise WeightsNotFoundError(f"{entry.description}: {problem}.")
        if not _complete(entry, path):
            kind = "folder with " + ", ".join(entry.files) if entry.folder else "file"
            raise WeightsNotFoundError(f"{entry.description}: the given path {path} is not a {kind}.")
        return path
    local = entry.local_path(models_dir)
    if _complete(entry, local):
        return local
    return _cached(entry)


def how_to_get(entry: HubWeights, models_dir: Path) -> str:
    """One missing entry, for a list of them: what, how large, from where, to where."""
    what = (
        f"{entry.repo_id} ({len(entry.files)} files)" if entry.folder else f"{entry.repo_id}/{entry.filename}"
    )
    target = entry.local_path(models_dir)
    lines = [
        f"- {entry.description}: {format_size(entry.size_bytes)}",
        f"    from {what}",
        f"    to   {target}{'/' if entry.folder else ''}",
    ]
    if problem := local_problem(entry, target):
        lines.append(f"    now: {problem}")
    if entry.gated:
        lines.append(
            f"    gated: accept the licence at {entry.licence_url or entry.url} while logged in, then set "
            "HF_TOKEN (or run `hf auth login`)"
        )
    return "\n".join(lines)


def missing_report(
    missing: Sequence[HubWeights], models_dir: Path, reason: str, command: str | None = None
) -> str:
    """The message for every missing entry at once, with the total size and what to run."""
    total = sum(entry.size_bytes for entry in missing)
    lines = [f"{len(missing)} weight file(s) are missing ({format_size(total)} in all): {reason}"]
    lines += [how_to_get(entry, models_dir) for entry in missing]
    if command:
        lines.append(f"Download them all with:\n    {command}")
    return "\n".join(lines)


def _download_error(entry: HubWeights, err: Exception) -> str:
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    if isinstance(err, GatedRepoError):
        return (
            f"{entry.repo_id} is gated and refused the download: accept its licence at "
            f"{entry.licence_url or entry.url} while logged in, then set HF_TOKEN (or run `hf auth login`)."
        )
    if isinstance(err, RepositoryNotFoundError):
        return f"{entry.repo_id} was not found on the hub (or needs a token): {err}"
    return f"the download of {entry.repo_id} failed: {type(err).__name__}: {err}"


def download(entry: HubWeights, models_dir: Path | None = None) -> Path:
    """Fetch ``entry`` with huggingface_hub (progress bars, resume of partial files).

    ``models_dir=None`` downloads into the Hugging Face cache; otherwise the entry lands at its
    place under ``models_dir``. Errors become :class:`WeightsNotFoundError` with what to do.
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    logger.info(
        "Downloading %s from %s (%s)", entry.description, entry.repo_id, format_size(entry.size_bytes)
    )
    try:
        if models_dir is None:
            paths = [Path(hf_hub_download(entry.repo_id, name)) for name in entry.files]
            return paths[0].parents[len(Path(entry.files[0]).parts) - 1] if entry.folder else paths[0]
        target = entry.local_path(models_dir)
        if (problem := local_problem(entry, target)) and problem.endswith("remove it"):
            raise WeightsNotFoundError(f"Cannot download {entry.description}: {problem}.")
        if entry.folder:
            for name in entry.files:
                hf_hub_download(entry.repo_id, name, local_dir=target)
            return target
        # Stage under models/.download/<repo> (huggingface_hub keeps its resume data there), then move
        # the finished file to its catalogue name, which may differ from the repo's.
        staging = Path(models_dir) / ".download" / entry.repo_id.replace("/", "--")
        fetched = Path(hf_hub_download(entry.repo_id, entry.filename, local_dir=staging))
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(fetched), target)
        return target
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as err:
        raise WeightsNotFoundError(
            f"Cannot download {entry.description}: {_download_error(entry, err)}"
        ) from err
