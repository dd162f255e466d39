"""The official checkpoints' key layouts, kept in ``tests/data/checkpoints`` (see its README)."""

import json
from pathlib import Path

MANIFESTS = Path(__file__).resolve().parent / "data" / "checkpoints"


def read_manifest(name: str) -> dict:
    """The whole manifest (``tensors``, ``total_bytes_in_tensors``, ...) of ``name``."""
    return json.loads((MANIFESTS / name).read_text())
