"""The device and precision policy, in one place for training and inference alike: which device
"auto" means, what each precision does, and how a uint8 batch becomes the network's float input."""

from __future__ import annotations

import contextlib

import torch

from restorer.base.errors import UsageError

DEVICES = ("auto", "cuda", "cpu")  # auto: CUDA when there is a device, else the CPU
# training (train.precision): bf16 and fp16 are autocast, fp16 with a GradScaler; inference (restore,
# evaluate) offers fp32 and bf16: fp16 has no scaler there and overflows in networks trained in fp32
TRAIN_PRECISIONS = ("fp32", "bf16", "fp16")
INFERENCE_PRECISIONS = ("fp32", "bf16")


def resolve_device(device: str | torch.device | None, what: str = "device") -> torch.device:
    """"auto" (or None): cuda when available, else cpu; "cuda" where there is none is one line that
    names `what` asked for it (train.device, --device)."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"{what} is cuda, but no CUDA device is available")
    return device


def autocast(device: torch.device, precision: str):
    """fp32: nothing; bf16 / fp16: torch.autocast on the device."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def to_float(batch: torch.Tensor, device: torch.device, channels_last: bool = False) -> torch.Tensor:
    """uint8 N x C x H x W -> float in [0, 1] on the device (copied there if it is not yet)."""
    x = batch.to(device, non_blocking=True).float().div_(255)
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
