"""Text data: files or directories of plain text (or Hugging Face dataset names when the
``datasets`` library and a network are available), tokenised into fixed-length windows."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

HF_DATASET_PREFIX = "hf:"


def read_text(source: str | os.PathLike, name: str = "data") -> str:
    """The text of a file, of every ``*.txt`` file under a directory (sorted, joined by blank
    lines), or of a Hugging Face dataset given as ``hf:NAME[:CONFIG][@SPLIT]``."""
    source = str(source)
    if source.startswith(HF_DATASET_PREFIX):
        return _read_hf_dataset(source.removeprefix(HF_DATASET_PREFIX), name)
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"{name}: {path} does not exist")
    files = sorted(path.rglob("*.txt")) if path.is_dir() else [path]
    if not files:
        raise FileNotFoundError(f"{name}: {path} holds no *.txt file")
    try:
        return "\n\n".join(f.read_text(encoding="utf-8") for f in files)
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{name}: cannot read {path} as UTF-8 text: {exc}") from None


def _read_hf_dataset(spec: str, name: str) -> str:
    try:
        import datasets
    except ImportError:
        raise ImportError(f"{name}: hf:{spec} needs the `datasets` library (pip install datasets)") from None
    spec, _, split = spec.partition("@")
    dataset_name, _, config = spec.partition(":")
    dataset = datasets.load_dataset(dataset_name, config or None, split=split or "train")
    column = "text" if "text" in dataset.column_names else dataset.column_names[0]
    return "\n\n".join(dataset[column])


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """All of ``text`` as one int64 token sequence, without special tokens."""
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.int64)


def windows(tokens: torch.Tensor, seq_len: int, name: str = "data") -> torch.Tensor:
    """Non-overlapping windows (n, seq_len) of a token sequence; the tail shorter than a window is dropped."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    count = tokens.numel() // seq_len
    if count == 0:
        raise ValueError(f"{name}: {tokens.numel()} tokens are too few for one window of seq_len={seq_len}")
    return tokens[: count * seq_len].view(count, seq_len)


@dataclass
class WindowSampler:
    """Batches of windows in a seeded order, reshuffled every epoch; batch ``j`` is a pure
    function of ``(seed, j)``, so a resumed run sees exactly the batches it would have seen."""

    windows: torch.Tensor
    batch_size: int
    seed: int

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.windows), generator=generator)

    def batch(self, index: int) -> torch.Tensor:
        count = len(self.windows)
        positions = range(index * self.batch_size, (index + 1) * self.batch_size)
        rows, epoch, order = [], None, None
        for position in positions:
            if position // count != epoch:
                epoch = position // count
                order = self._epoch_order(epoch)
            rows.append(order[position % count])
        return self.windows[torch.stack(rows)]
