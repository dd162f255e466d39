"""Which torch device a flag names, and whether this machine can honour it.

A flag the machine cannot honour (``--device cuda`` on a CPU-only PyTorch, a GPU index that does
not exist, fp8 compute without fp8 matrix units) is a :class:`HardwareError` at start, with one
sentence that says what to change, instead of an assertion deep inside PyTorch later.
"""

from __future__ import annotations

import torch

from flux.errors import UserError

SUPPORTED_TYPES = ("cuda", "cpu")


class HardwareError(UserError, RuntimeError):
    """This machine cannot do what a flag asks; the message says what to change."""


def nvidia_gpu_present() -> bool:
    """Whether ``nvidia-smi`` lists a GPU: told apart from a CPU build of torch on a GPU machine."""
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return False
    try:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return listed.returncode == 0 and "GPU" in listed.stdout


def resolve_device(name: str | torch.device | None) -> torch.device:
    """The device ``name`` names (``None``: the first CUDA GPU if there is one, else the CPU), checked."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise HardwareError(f"--device {name!r} is not a device: use cuda, cuda:N or cpu.") from err
    if device.type not in SUPPORTED_TYPES:
        raise HardwareError(f"--device {name}: this app runs on {' or '.join(SUPPORTED_TYPES)} devices.")
    if device.type == "cuda":
        if torch.version.cuda is None and not nvidia_gpu_present():
            raise HardwareError(
                f"--device {name}: this machine has no NVIDIA GPU (nvidia-smi lists none). Leave out "
                "--device to run on the CPU, or try the app with --preset tiny-random."
            )
        if torch.version.cuda is None:
            raise HardwareError(
                f"--device {name} needs a CUDA build of PyTorch, and this one ({torch.__version__}) is a "
                "CPU build: reinstall it with `bash scripts/setup_env.sh --gpu --force`, or run with "
                "--device cpu."
            )
        if not torch.cuda.is_available():
            raise HardwareError(
                f"--device {name}: PyTorch sees no CUDA GPU (is the NVIDIA driver loaded? does "
                "`nvidia-smi` list one?). Run with --device cpu to use the CPU."
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise HardwareError(
                f"--device {name}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}."
            )
    return device


def describe(device: torch.device) -> str:
    """The device in words, for messages and logs."""
    if device.type != "cuda":
        return str(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    return f"{device} ({torch.cuda.get_device_name(index)}, compute capability {major}.{minor})"
