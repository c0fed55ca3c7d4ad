"""Which torch device a stage runs on, from its ``device`` param."""
from __future__ import annotations

import torch


def resolve_device(name: str, key: str = "device") -> torch.device:
    """``auto`` -> the first CUDA device if there is one, else the CPU. A named CUDA device that
    is absent is an error naming the param ``key`` (e.g. ``train.device``) and the value."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"{key} = {name!r}: {torch.cuda.device_count()} CUDA device(s) here; "
                         "use 'cpu', 'auto' or an existing 'cuda:N'")
    return device
