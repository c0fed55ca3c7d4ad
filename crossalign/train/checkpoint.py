"""Resumable training checkpoints without pickle: tensors in safetensors, scalars in JSON.

A checkpoint directory (replaced atomically each epoch) holds

    model.safetensors      current weights
    best.safetensors       weights of the best validation epoch so far
    optimizer.safetensors  AdamW per-parameter state tensors, keyed ``<param index>.<name>``
    rng.safetensors        torch CPU (and CUDA) generator states
    state.json             epoch, step, early-stopping counters, history, optimiser param
                           groups, config fingerprint, MLflow run id

so a run killed at any point restarts from the end of its last finished epoch and, because every
source of randomness is restored, ends with the same weights as a run never interrupted.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from crossalign.io import atomic_dir, read_json

STATE = "state.json"


def state_tensors(module: nn.Module) -> dict[str, Tensor]:
    """A detached CPU copy of a module's state dict (safetensors wants contiguous, unshared)."""
    return {k: v.detach().cpu().clone().contiguous() for k, v in module.state_dict().items()}


def optimizer_to_flat(opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], list[dict[str, Any]]]:
    """Optimizer state -> (tensors keyed ``<index>.<name>``, JSON-able param groups)."""
    sd = opt.state_dict()
    tensors: dict[str, Tensor] = {}
    for index, per_param in sd["state"].items():
        for name, value in per_param.items():
            t = value if isinstance(value, Tensor) else torch.tensor(value)
            tensors[f"{index}.{name}"] = t.detach().cpu().clone().contiguous()
    return tensors, sd["param_groups"]


def optimizer_from_flat(opt: torch.optim.Optimizer, tensors: dict[str, Tensor],
                        groups: list[dict[str, Any]]) -> None:
    """Inverse of :func:`optimizer_to_flat`; loads into ``opt`` in place."""
    state: dict[int, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": groups})


def rng_tensors() -> dict[str, Tensor]:
    out = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"torch_cuda_{i}"] = s
    return out


def restore_rng(tensors: dict[str, Tensor]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def save_checkpoint(directory: str | Path, model: nn.Module, best: dict[str, Tensor],
                    opt: torch.optim.Optimizer, state: dict[str, Any]) -> Path:
    """Write a checkpoint (atomically replacing ``directory``)."""
    opt_tensors, groups = optimizer_to_flat(opt)
    with atomic_dir(directory) as tmp:
        save_file(state_tensors(model), str(tmp / "model.safetensors"))
        save_file(best, str(tmp / "best.safetensors"))
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        save_file(rng_tensors(), str(tmp / "rng.safetensors"))
        (tmp / STATE).write_text(json.dumps({**state, "param_groups": groups}, indent=2) + "\n")
    return Path(directory)


def read_state(directory: str | Path) -> dict[str, Any] | None:
    """The checkpoint's ``state.json``, or None when there is no complete checkpoint."""
    path = Path(directory) / STATE
    return read_json(path) if path.exists() else None


def load_checkpoint(directory: str | Path, model: nn.Module, opt: torch.optim.Optimizer,
                    device: torch.device) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Restore model, optimizer and RNG from ``directory`` -> (state, best weights on CPU)."""
    directory = Path(directory)
    state = read_json(directory / STATE)
    model.load_state_dict({k: v.to(device) for k, v in load_file(str(directory / "model.safetensors")).items()})
    optimizer_from_flat(opt, {k: v.to(device) if not k.endswith(".step") else v
                              for k, v in load_file(str(directory / "optimizer.safetensors")).items()},
                        state.pop("param_groups"))
    restore_rng(load_file(str(directory / "rng.safetensors")))
    return state, load_file(str(directory / "best.safetensors"))
