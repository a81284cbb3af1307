"""Models over several devices: transformers/accelerate big-model dispatch (``--device-map``).

``auto`` / ``balanced`` let accelerate place whole decoder layers over the visible devices;
a JSON file maps module names (``model.layers.12``, ``lm_head``; ``""`` for the whole model) to
a device (``"cpu"``, ``"cuda:1"`` or a CUDA index). accelerate's hooks move activations between
devices; each layer's LoRA factors, masks, importance scores and importance computation live on
that layer's device (they are created next to its weights), and compaction works module by
module where the modules are. Weights offloaded to disk or kept off-device (``meta``) cannot be
pruned: every weight must be resident on its device.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

DEVICE_MAPS = ("auto", "balanced")


def parse_device_map(spec: str, model_dir: str | os.PathLike, name: str = "device_map") -> str | dict:
    """``auto``, ``balanced`` or the checked contents of a JSON file (every module on an existing device)."""
    if spec in DEVICE_MAPS:
        return spec
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"{name}: {spec!r} is neither one of {DEVICE_MAPS} nor a JSON file")
    try:
        mapping = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{name}: cannot read {path}: {exc}") from None
    if not isinstance(mapping, dict) or not mapping:
        raise ValueError(f"{name}: {path} must hold a JSON object of module name -> device")
    for module, device in mapping.items():
        check_device(device, f"{name}: {path}: {module!r}")
    missing = uncovered_modules(mapping, model_dir)
    if missing:
        raise ValueError(
            f"{name}: {path} puts {len(missing)} module(s) on no device, e.g. {', '.join(missing[:3])}"
        )
    return mapping


def check_device(device: object, where: str) -> None:
    """A device a weight can live on here: ``cpu``, or a CUDA device that exists."""
    if device in ("disk", "meta"):
        raise ValueError(
            f"{where}: {device!r} offloads weights, which cannot be pruned (they must be resident)"
        )
    if isinstance(device, bool) or not isinstance(device, (int, str)):
        raise ValueError(f"{where}: {device!r} is not a device")
    try:
        parsed = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"{where}: {device!r} is not a device") from None
    if parsed.type == "cpu":
        return
    count = torch.cuda.device_count() if parsed.type == "cuda" else 0
    if parsed.type != "cuda" or (parsed.index or 0) >= count:
        raise ValueError(f"{where}: device {device!r} does not exist ({count} CUDA devices)")


def uncovered_modules(mapping: dict, model_dir: str | os.PathLike) -> list[str]:
    """Parameters of the checkpoint's architecture that no key of ``mapping`` covers (by module prefix)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):  # names only: no weights are read
        model = AutoModelForCausalLM.from_config(config)
    keys = set(mapping)

    def covered(name: str) -> bool:
        parts = name.split(".")
        return "" in keys or any(".".join(parts[:i]) in keys for i in range(1, len(parts) + 1))

    names = [n for n, _ in model.named_parameters()]
    return sorted({n.rsplit(".", 1)[0] for n in names if not covered(n)})


def load_dispatched_model(
    model_dir: str | os.PathLike,
    device_map: str | dict,
    *,
    dtype: torch.dtype,
    quantize_base: str | None = None,
) -> nn.Module:
    """Load a checkpoint placed by accelerate's big-model dispatch (and quantized if asked)."""
    from transformers import AutoModelForCausalLM

    kwargs = {"device_map": device_map, "dtype": dtype}
    if quantize_base is not None:
        from loraprune.quantization import bitsandbytes, bitsandbytes_config

        bitsandbytes()
        kwargs["quantization_config"] = bitsandbytes_config(quantize_base, dtype)
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    offloaded = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if offloaded:
        raise ValueError(
            f"device_map: {len(offloaded)} weights did not fit on the devices and were offloaded "
            f"(e.g. {offloaded[0]}); pruning needs every weight resident: give a map that fits"
        )
    return model


__all__ = ["DEVICE_MAPS", "load_dispatched_model", "parse_device_map"]
