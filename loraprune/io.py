"""Loading checkpoints with clear errors, and atomic file writes."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from loraprune.families import family

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def parse_dtype(dtype: str | torch.dtype, name: str = "dtype") -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"{name} must be one of {sorted(DTYPES)}, got {dtype!r}")


def parse_device(device: str | torch.device, name: str = "device") -> torch.device:
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"{name} must be 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{name} must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{name}: CUDA was requested but no CUDA device is available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{name}: {device} does not exist ({torch.cuda.device_count()} CUDA devices)")
    return device


def check_model_dir(model_dir: str | os.PathLike, name: str = "model_dir") -> Path:
    """A directory with a config.json of a supported family; returns it as a Path."""
    path = Path(model_dir)
    if not path.exists():
        raise FileNotFoundError(f"{name}: {path} does not exist")
    if not path.is_dir():
        raise NotADirectoryError(f"{name}: {path} is not a directory")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{name}: {path} has no config.json (not a Hugging Face checkpoint)")
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{name}: cannot read {config_file}: {exc}") from None
    family(model_type, name, "config.json model_type")
    return path


def load_model(
    model_dir: str | os.PathLike, *, dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu"
) -> nn.Module:
    """Load a (pruned or dense) checkpoint of a supported family onto ``device`` in ``dtype``."""
    path = check_model_dir(model_dir)
    dtype, device = parse_dtype(dtype), parse_device(device)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model.to(device)


def load_tokenizer(model_dir: str | os.PathLike):
    """The checkpoint's tokenizer, or ``None`` when it has none.

    A ``tokenizer.json`` whose ``tokenizer_config.json`` names a class this transformers lacks
    (one saved by a newer release) still loads, as a plain fast tokenizer.
    """
    path = Path(model_dir)
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        if not (path / "tokenizer.json").is_file():
            return None
    config_file = path / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    special = {k: v for k, v in config.items() if k.endswith("_token") and isinstance(v, str)}
    return PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"), **special)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: readers never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
