"""Where tensors live: the ``device`` setting of every stage (``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``).

``auto`` is the first CUDA device when torch sees one, else the CPU. Autocast runs on the
device's own type, in bf16 where the device supports it (every CPU torch runs; CUDA from
compute capability 8.0). Host batches go to a CUDA device through pinned memory with
``non_blocking=True``, so the copy overlaps the previous step's kernels.
"""

from __future__ import annotations

import re
from contextlib import nullcontext

import torch
from torch import Tensor

DEVICE_SETTINGS = "auto | cpu | cuda | cuda:N"
_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def check_device_setting(value: str) -> str:
    """Validator of a config's ``device`` field: the syntax only (whether it exists is checked when used)."""
    if not isinstance(value, str) or not _PATTERN.match(value):
        raise ValueError(f"device {value!r} is not one of {DEVICE_SETTINGS}")
    return value


def resolve_device(setting: str | torch.device = "auto") -> torch.device:
    """The torch device a setting names; a clear error for a CUDA device this machine lacks."""
    if isinstance(setting, torch.device):
        return setting
    check_device_setting(setting)
    if setting == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(setting)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {setting!r}: torch sees no CUDA device here; use device: cpu (or auto)")
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise ValueError(
                f"device {setting!r}: only {torch.cuda.device_count()} CUDA device(s) here (cuda:0..cuda:{torch.cuda.device_count() - 1})"
            )
    return device


def supports_bf16(device: torch.device) -> bool:
    """Whether bf16 autocast runs natively on ``device``."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu"


def autocast(device: torch.device, enabled: bool = True):
    """bf16 autocast on ``device``'s type when enabled and supported; a no-op context otherwise."""
    if not enabled or not supports_bf16(device):
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def to_device(x: Tensor, device: torch.device) -> Tensor:
    """``x`` on ``device``; a CPU tensor bound for CUDA goes through pinned memory, asynchronously."""
    if x.device == device:
        return x
    if device.type == "cuda" and x.device.type == "cpu":
        if not x.is_pinned():
            x = x.pin_memory()
        return x.to(device, non_blocking=True)
    return x.to(device)


def available_devices() -> list[str]:
    """The devices tests run on: the CPU always, CUDA when torch sees it."""
    return ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


def synchronize(device: torch.device) -> None:
    """Wait for ``device``'s queued kernels (timings; a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
