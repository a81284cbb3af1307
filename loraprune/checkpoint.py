"""Checkpoint files: the LoRA factors and the pruner's state in one safetensors file with its settings
as JSON metadata, shared by :class:`~loraprune.run.PruningRun` and the ``Trainer`` callback."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from loraprune.nn import lora_modules
from loraprune.pruner import LoraPruner

CHECKPOINT_FORMAT = 1


def pruning_state(pruner: LoraPruner) -> dict[str, torch.Tensor]:
    """The LoRA factors (``lora.<path>.lora_A|lora_B``) and the pruner's masks and moving averages
    (``pruner.<key>``): what a checkpoint holds besides the optimizer's state."""
    tensors = {
        f"lora.{path}.{name}": getattr(module, name).detach()
        for path, module in lora_modules(pruner.model).items()
        if module.lora_A is not None
        for name in ("lora_A", "lora_B")
    }
    tensors.update({f"pruner.{k}": v for k, v in pruner.state_dict().items()})
    return tensors


def load_pruning_state(pruner: LoraPruner, tensors: dict[str, torch.Tensor], device: torch.device) -> None:
    """Restore :func:`pruning_state` in place (the LoRA factors stay the same Parameter objects, so an
    optimizer built over them keeps them)."""
    # first: with rank pruning this narrows the adapters to the saved components
    pruner.load_state_dict(
        {k.removeprefix("pruner."): v.to(device) for k, v in tensors.items() if k.startswith("pruner.")}
    )
    with torch.no_grad():
        for path, module in lora_modules(pruner.model).items():
            if module.lora_A is not None:
                for name in ("lora_A", "lora_B"):
                    getattr(module, name).copy_(tensors[f"lora.{path}.{name}"])


def write_checkpoint_file(path: Path, tensors: dict[str, torch.Tensor], metadata: dict) -> None:
    """One safetensors file (``metadata`` as JSON, with the format), replaced atomically."""
    tensors = {k: v.contiguous().cpu() for k, v in tensors.items()}
    metadata = {"format": CHECKPOINT_FORMAT, **metadata}
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata={"loraprune": json.dumps(metadata)})
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_checkpoint_file(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The metadata and tensors of a file written by :func:`write_checkpoint_file`."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = json.loads(handle.metadata()["loraprune"])
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not a dict)
    if metadata.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(
            f"resume: {path} has checkpoint format {metadata.get('format')}, expected {CHECKPOINT_FORMAT}"
        )
    return metadata, tensors


def check_same_settings(saved: dict, current: dict, defaults: dict[str, dict]) -> None:
    """Raise unless a checkpoint's settings are the current ones. The sections named in ``defaults``
    are compared key by key (a key missing from ``saved`` passes at its default: added since); every
    other key as a whole."""
    differences = []
    for section, section_defaults in defaults.items():
        for key in sorted(set(saved[section]) | set(current[section])):
            before, now = saved[section].get(key), current[section].get(key)
            if key not in saved[section] and json.dumps(now) == json.dumps(section_defaults.get(key)):
                continue  # a setting added since the checkpoint was written, at its default
            if json.dumps(before) != json.dumps(now):
                differences.append(f"{key}: {before!r} then, {now!r} now")
    for key in sorted((set(saved) | set(current)) - set(defaults)):
        if saved.get(key) != current.get(key):
            differences.append(f"{key}: {saved.get(key)!r} then, {current.get(key)!r} now")
    if differences:
        raise ValueError(
            "resume: the checkpoint was made with other settings (" + "; ".join(differences) + ")"
        )
