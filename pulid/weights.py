"""The PuLID-FLUX weight files (``--version``)."""

from __future__ import annotations

from flux.hub import WeightFile

# 571,033,600 bf16 parameters (the manifest in shared/checkpoints), plus a small header.
PULID_BYTES = 1_142_067_200

PULID_VERSIONS: dict[str, WeightFile] = {
    version: WeightFile(
        repo_id="guozinan/PuLID",
        filename=f"pulid_flux_{version}.safetensors",
        size_bytes=PULID_BYTES,
        local_name=f"pulid_flux_{version}.safetensors",
        description=f"the PuLID-FLUX {version} weights",
    )
    for version in ("v0.9.0", "v0.9.1")
}
DEFAULT_VERSION = "v0.9.1"


def pulid_weight_file(version: str) -> WeightFile:
    try:
        return PULID_VERSIONS[version]
    except KeyError:
        raise ValueError(
            f"Unknown PuLID version {version!r}; choose one of {', '.join(PULID_VERSIONS)}"
        ) from None
