"""LoRA for the FLUX DiT: files in the common layouts (:mod:`.layouts`, :mod:`.files`) applied as a
low-rank side path that never writes the model's weights (:mod:`.adapters`)."""

from flux.lora.adapters import ActiveLoRA, LoRAAdapters
from flux.lora.files import LoRAFile, check_lora_suffix, read_lora
from flux.lora.layouts import LoRAError, LowRank, ParsedLoRA, Target, lora_targets, parse_lora

__all__ = [
    "ActiveLoRA",
    "LoRAAdapters",
    "LoRAError",
    "LoRAFile",
    "LowRank",
    "ParsedLoRA",
    "Target",
    "check_lora_suffix",
    "lora_targets",
    "parse_lora",
    "read_lora",
]
