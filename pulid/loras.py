"""Where a request's LoRAs come from: ``models/loras/``, a path, a hub reference, or a speed LoRA's name.

:class:`LoRALibrary` turns a :class:`LoRAChoice` (a source and a strength) into a checked
:class:`flux.lora.LoRAFile` for the loaded DiT, keeping the last few in memory so that the next
request with the same LoRA reads nothing. Sources, tried in this order:

1. a speed LoRA's name (:data:`pulid.catalogue.SPEED_LORAS`): from ``models/loras/``, the hub
   cache, or downloaded;
2. a file under ``models/loras/`` by its name there (``my-style.safetensors``, ``people/anna.safetensors``);
3. a path on this machine;
4. a hub reference ``owner/repo/file.safetensors``, downloaded through huggingface_hub into its cache.

In the web app a visitor may choose only what :meth:`LoRALibrary.names` lists (files already in
``models/loras/`` and the speed LoRAs), never a path on the server or an arbitrary download: the
service checks each request against that list before it takes a place in the line
(:class:`pulid.serve.service.GenerationService`, ``listed_loras_only``).
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from pathlib import Path

from flux.hub import HubWeights, WeightsNotFoundError, download, download_blocked, find_local, how_to_get
from flux.lora import LoRAError, LoRAFile, Target, check_lora_suffix, read_lora
from pulid.catalogue import SPEED_LORAS
from pulid.request import LoRAChoice

logger = logging.getLogger(__name__)

LORA_SUFFIX = ".safetensors"
CACHED_LORAS = 3  # LoRA files kept read (float32 on the host: a rank-64 full-DiT LoRA is about 1.4 GB)


def parse_lora_option(text: str) -> LoRAChoice:
    """``FILE_OR_REPO[:STRENGTH]`` (the CLI's ``--lora``): the strength is what follows the last
    colon, unless that is part of a path, so Windows paths (``C:\\loras\\x.safetensors``) keep their
    colon. A strength that is not a number is a :class:`LoRAError`, not part of the file name."""
    source, _, last = text.rpartition(":")
    if source and not any(mark in last for mark in ("/", "\\")):
        try:
            return LoRAChoice(source.strip(), float(last))
        except ValueError:
            raise LoRAError(
                f"--lora {text}: the strength {last!r} is not a number (FILE:STRENGTH)."
            ) from None
    return LoRAChoice(text.strip(), 1.0)


def locate_lora(source: str, folder: str | os.PathLike) -> Path | HubWeights:
    """Where ``source`` is, without fetching anything: a local file (in ``folder`` or a path), or
    the hub entry of a speed LoRA or an ``owner/repo/file.safetensors`` reference. A source that is
    none of these, or a local file that is not safetensors, is a :class:`LoRAError`."""
    if not isinstance(source, str) or not source.strip():
        raise LoRAError("A LoRA was chosen without a name: pick one from the list or give a file.")
    source = source.strip()
    if source in SPEED_LORAS:
        return SPEED_LORAS[source].entry.weights
    path = (
        _in_folder(Path(folder), source)
        or _in_folder(Path(folder), source + LORA_SUFFIX)  # the name images record: no suffix
        or Path(source).expanduser()
    )
    if path.is_file():
        check_lora_suffix(path)
        return path
    parts = source.split("/")
    if len(parts) >= 3 and source.endswith(LORA_SUFFIX) and not path.is_absolute():
        repo, file = "/".join(parts[:2]), "/".join(parts[2:])
        return HubWeights(repo, (file,), 0, f"loras/{parts[-1]}", f"the LoRA {source}")
    raise LoRAError(
        f"LoRA {source!r} was not found: not a file in {folder}, not a path on this machine, "
        f"not a speed LoRA ({', '.join(SPEED_LORAS)}) and not a hub reference "
        "owner/repo/file.safetensors."
    )


def check_lora_for(path: Path, model_name: str) -> None:
    """Read and check the LoRA file at ``path`` against the layers of ``model_name``'s DiT, built on
    the meta device (no weights): a LoRA for another model, or a broken file, is a
    :class:`LoRAError` before minutes of loading rather than after them."""
    import torch

    from flux.lora import lora_targets, read_lora
    from flux.model import Flux
    from flux.registry import get_model_spec

    with torch.device("meta"):
        layout = Flux(get_model_spec(model_name).params)
    read_lora(path, lora_targets(layout))


def check_fetchable_lora(source: str, weights: HubWeights, models_dir: Path) -> None:
    """A LoRA from the hub is on this machine already or can be downloaded now; else a
    :class:`LoRAError` with how to get it (said before loading, not when its request runs)."""
    if find_local(weights, models_dir) is not None:
        return
    if (blocked := download_blocked()) is not None:
        command = f"python -m pulid.serve.download --speed_lora {source}" if source in SPEED_LORAS else None
        raise LoRAError(
            f"LoRA {source} is not on this machine, and {blocked}. Get it here:\n"
            f"{how_to_get(weights, models_dir)}" + (f"\nor with: {command}" if command else "")
        )


def _in_folder(folder: Path, name: str) -> Path | None:
    """``name`` as a file under ``folder``: a relative name without ``..``. A link the folder holds
    (a shared LoRA store linked file by file) is followed, as :meth:`LoRALibrary.names` lists it."""
    relative = Path(name)
    if relative.is_absolute() or relative.drive or ".." in relative.parts:
        return None
    candidate = folder / relative
    return candidate if candidate.is_file() else None


class LoRALibrary:
    """Finds, downloads, reads and caches LoRA files for one model (its :func:`flux.lora.lora_targets`)."""

    def __init__(
        self,
        folder: str | os.PathLike,
        targets: dict[str, Target],
        *,
        models_dir: str | os.PathLike | None = None,
        allow_download: bool = True,
    ):
        self.folder = Path(folder)
        self.models_dir = Path(models_dir) if models_dir is not None else self.folder.parent
        self.targets = targets
        self.allow_download = allow_download
        self._cache: OrderedDict[tuple, LoRAFile] = OrderedDict()
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        """What a visitor may pick: the speed LoRAs that can be used (on this machine, or
        downloadable now), then the other files under the LoRA folder. A speed LoRA that could
        only fail is not offered: its message would be the server's business, not the visitor's."""
        speed_files = {f"{name}{LORA_SUFFIX}" for name in SPEED_LORAS}
        files = []
        if self.folder.is_dir():
            files = sorted(
                path.relative_to(self.folder).as_posix()
                for path in self.folder.rglob(f"*{LORA_SUFFIX}")
                if path.is_file() and not path.name.startswith(".")
            )
        speed = [name for name in SPEED_LORAS if self._usable(SPEED_LORAS[name].entry.weights)]
        return speed + [name for name in files if name not in speed_files]

    def _usable(self, weights: HubWeights) -> bool:
        """On this machine, or fetchable now (downloads allowed and the hub reachable)."""
        try:
            if find_local(weights, self.models_dir) is not None:
                return True
        except WeightsNotFoundError:
            return False
        return self.allow_download and download_blocked() is None

    def resolve(self, source: str) -> Path:
        """The local file of ``source`` (:func:`locate_lora`), downloading a speed LoRA (into the
        models folder) or a hub reference (into the hub cache) when allowed."""
        found = locate_lora(source, self.folder)
        if isinstance(found, Path):
            return found
        speed = source.strip() in SPEED_LORAS
        return self._fetch(found, self.models_dir if speed else None)

    def load(self, choice: LoRAChoice) -> LoRAFile:
        """The checked LoRA of ``choice`` (its strength is applied later, per request). Messages
        name the LoRA folder as such, never by its place on the server (visitors read them)."""
        try:
            return self._load(choice)
        except LoRAError as err:
            message = str(err)
            for folder in {str(self.folder.resolve()), str(self.folder)}:
                message = message.replace(folder, "the LoRA folder")
            raise LoRAError(message) from None

    def _load(self, choice: LoRAChoice) -> LoRAFile:
        path = self.resolve(choice.source)
        stat = path.stat()
        key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        lora = read_lora(path, self.targets, name=_display_name(choice.source))
        if lora.ignored:
            logger.warning(
                "LoRA %s: text-encoder layers ignored (%s): %s",
                lora.name,
                lora.ignored_summary(),
                ", ".join(name for names in lora.ignored.values() for name in names),
            )
        logger.info(
            "LoRA %s: %d layers, rank up to %d, %s layout, sha256 %s",
            lora.name,
            len(lora.layers),
            lora.rank,
            "+".join(lora.layouts),
            lora.short_hash,
        )
        with self._lock:
            self._cache[key] = lora
            while len(self._cache) > CACHED_LORAS:
                self._cache.popitem(last=False)
        return lora

    def _fetch(self, weights: HubWeights, models_dir: Path | None) -> Path:
        try:
            found = find_local(weights, self.models_dir)
        except WeightsNotFoundError as err:
            raise LoRAError(str(err)) from None
        if found is not None:
            return found
        reason = "downloads are disabled" if not self.allow_download else download_blocked()
        if reason is not None:
            raise LoRAError(
                f"LoRA {weights.repo_id}/{weights.filename} is not on this machine and {reason}. "
                f"Get it here:\n{how_to_get(weights, self.models_dir)}"
            )
        try:
            return download(weights, models_dir)
        except WeightsNotFoundError as err:
            raise LoRAError(str(err)) from None


def _display_name(source: str) -> str:
    """The LoRA's name in logs and metadata: the file name without the suffix, or the speed LoRA's."""
    name = source.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    return name[: -len(LORA_SUFFIX)] if name.endswith(LORA_SUFFIX) else name
