"""Models as users name them: a local Hugging Face folder, a Hub id, or a GGUF file.

- A **folder** is used as it is.
- A **Hub id** (``org/name``, with an optional revision) is resolved through ``huggingface_hub``
  as transformers resolves it: from the local cache when offline (``HF_HUB_OFFLINE=1``) or when
  the Hub cannot be reached, downloaded otherwise; the token is the one ``huggingface_hub`` finds
  (``HF_TOKEN``, ``hf auth login``).
- A **GGUF file** (llama.cpp's format) of an architecture transformers reads and loraprune
  prunes is dequantized by transformers into a dense model of the requested dtype, with the
  tokenizer the file carries. Its quantization is recorded in the config (``gguf_source``), which
  pruning carries into the pruned folder's ``config.json``, so that ``loraprune export gguf``
  writes it back at the type it came in.

Everything is checked before anything is written; errors name the argument and the reason.
"""

from __future__ import annotations

import collections
import functools
import importlib.metadata
import importlib.util
import json
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from loraprune.export.gguf import GGUF_SOURCE_KEY
from loraprune.families import SUPPORTED_MODEL_TYPES
from loraprune.io import check_model_dir, parse_dtype

# What a model folder needs from a Hub repository (not *.bin or *.gguf duplicates of the weights).
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]


@dataclass(frozen=True)
class ModelSource:
    """Where MODEL was found: ``kind`` is ``folder``, ``hub`` or ``gguf``."""

    name: str  # as the user gave it
    kind: str
    path: Path  # the folder (for ``hub``, the snapshot in the cache) or the .gguf file
    revision: str | None = None  # ``hub``: the commit of the snapshot

    @property
    def label(self) -> str:
        """A short name: the folder's, the repository's or the GGUF file's (without .gguf)."""
        if self.kind == "hub":
            return self.name.split("/")[-1]
        return self.path.stem if self.kind == "gguf" else self.path.resolve().name

    def to_dict(self) -> dict:
        info = {"kind": self.kind, "name": self.name, "path": str(self.path)}
        if self.revision is not None:
            info["revision"] = self.revision
        return info


@dataclass(frozen=True)
class GGUFHeader:
    """What loraprune reads from a GGUF file before transformers dequantizes it."""

    architecture: str
    file_type: str  # llama.cpp's name for the file's quantization: MOSTLY_Q4_1, MOSTLY_Q4_K_M, ...
    tensor_types: dict[str, int]  # GGML type name -> tensor count

    def record(self, file: Path) -> dict:
        """The ``gguf_source`` entry of the config."""
        return {"file": file.name, "file_type": self.file_type, "tensor_types": self.tensor_types}


def resolve_model(name: str | os.PathLike, revision: str | None = None, arg: str = "MODEL") -> ModelSource:
    """A local folder, a local ``.gguf`` file, or a Hub id (fetched or found in the cache)."""
    text = str(name)
    path = Path(text).expanduser()
    if path.exists():
        if revision is not None:
            raise ValueError(f"--revision: {arg} {text} is a local path; --revision selects a Hub revision")
        if path.is_file() and path.suffix.lower() == ".gguf":
            read_gguf_header(path, arg)
            return ModelSource(text, "gguf", path)
        if path.is_file():
            raise ValueError(
                f"{arg}: {text} is a file but not a .gguf file (give a model folder, a .gguf file or a Hub id)"
            )
        return ModelSource(text, "folder", check_model_dir(path, arg))
    if path.suffix.lower() == ".gguf" or not _looks_like_hub_id(text):
        raise FileNotFoundError(f"{arg}: {text} does not exist")
    snapshot = _download(text, revision, arg)
    return ModelSource(text, "hub", check_model_dir(snapshot, arg), revision=snapshot.name)


def _looks_like_hub_id(text: str) -> bool:
    """``name`` or ``org/name`` as the Hub spells repository ids (not ``./x``, ``/x`` or ``a/b/c``)."""
    return (
        re.fullmatch(r"(?:[\w.-]+/)?[\w.-]+", text) is not None
        and not text.startswith((".", "-"))
        and ".." not in text
        and "--" not in text
    )


def _download(repo_id: str, revision: str | None, arg: str) -> Path:
    """The repository's snapshot folder: cached, or downloaded where the Hub can be reached."""
    from huggingface_hub import constants, get_token, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS))
    except GatedRepoError:
        token = "the token in use has no access" if get_token() else "no Hugging Face token is set"
        raise PermissionError(
            f"{arg}: {repo_id} is a gated repository and {token}: accept its terms on "
            f"https://huggingface.co/{repo_id}, then set HF_TOKEN (or run `hf auth login`) with a token "
            "that has access"
        ) from None
    except RevisionNotFoundError:
        raise ValueError(f"--revision: {repo_id} has no revision {revision!r} on the Hub") from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(
            f"{arg}: {repo_id} is neither a local path nor a model repository on the Hub "
            "(a private one needs a token: HF_TOKEN)"
        ) from None
    except LocalEntryNotFoundError:
        at = f" at revision {revision!r}" if revision else ""
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the Hub could not be reached"
        raise FileNotFoundError(
            f"{arg}: {repo_id} is not a local path, and is not in the Hugging Face cache "
            f"({constants.HF_HUB_CACHE}){at} while {why}"
        ) from None
    except OSError as exc:  # other HTTP and file-system errors of the download
        raise OSError(f"{arg}: cannot fetch {repo_id} from the Hub: {exc}") from None


def _require_gguf_packages() -> None:
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(f"reading a GGUF file needs {' and '.join(missing)}: pip install 'loraprune[gguf]'")


def read_gguf_header(path: Path, arg: str = "MODEL") -> GGUFHeader:
    """Architecture and quantization of a GGUF file; a type gguf-py cannot dequantize is refused."""
    _require_gguf_packages()
    stat = path.stat()
    return _read_gguf_header(path.resolve(), stat.st_mtime_ns, stat.st_size, arg)


@functools.lru_cache(maxsize=4)
def _read_gguf_header(path: Path, mtime_ns: int, size: int, arg: str) -> GGUFHeader:
    """Cached by path, time and size: parsing a file's metadata (its vocabulary) takes seconds."""
    import gguf
    import numpy as np

    try:
        reader = gguf.GGUFReader(path)
        architecture = reader.get_field("general.architecture").contents()
    except (ValueError, OSError, AttributeError, KeyError) as exc:
        raise ValueError(f"{arg}: {path} is not a readable GGUF file: {exc}") from None
    file_type_field = reader.get_field("general.file_type")
    file_type_value = None if file_type_field is None else int(file_type_field.contents())
    try:
        file_type = gguf.LlamaFileType(file_type_value).name
    except ValueError:
        file_type = f"UNKNOWN_{file_type_value}"
    counts = collections.Counter(t.tensor_type for t in reader.tensors)
    for ggml_type in counts:
        block_bytes = gguf.GGML_QUANT_SIZES[ggml_type][1]
        try:  # one zero block through gguf-py, which is what transformers dequantizes with
            gguf.quants.dequantize(np.zeros(block_bytes, np.uint8), ggml_type)
        except NotImplementedError:
            raise ValueError(
                f"{arg}: {path} holds {ggml_type.name} tensors, a type gguf "
                f"{importlib.metadata.version('gguf')} cannot dequantize"
            ) from None
    return GGUFHeader(str(architecture), file_type, {t.name: n for t, n in sorted(counts.items())})


def gguf_config(path: Path, arg: str = "MODEL"):
    """The transformers config of a GGUF file, refused unless loraprune prunes its architecture."""
    import transformers
    from transformers import AutoConfig

    header = read_gguf_header(path, arg)
    try:
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    except (ValueError, KeyError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if header.architecture == "deci":  # what `loraprune export gguf` writes: already pruned
            reason = "a pruned model's export; prune the Hugging Face folder it was exported from"
        raise ValueError(
            f"{arg}: {path}: transformers {transformers.__version__} cannot read GGUF architecture "
            f"{header.architecture!r} ({reason})"
        ) from None
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"{arg}: {path}: GGUF architecture {header.architecture!r} (transformers model_type "
            f"{config.model_type!r}) cannot be pruned; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    setattr(config, GGUF_SOURCE_KEY, header.record(path))
    return config


def load_gguf(
    path: Path, dtype: str | torch.dtype = "float32", arg: str = "MODEL"
) -> tuple[nn.Module, object]:
    """The GGUF file dequantized into a dense model of ``dtype`` (on the CPU), and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    model = AutoModelForCausalLM.from_pretrained(
        path.parent,
        gguf_file=path.name,
        config=gguf_config(path, arg),
        dtype=parse_dtype(dtype),
        # dense nn.Linear weights to prune: transformers otherwise keeps them in packed GGUF blocks
        quantization_config=GgufConfig(dequantize=True),
    )
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model, _within_vocabulary(tokenizer, model.config.vocab_size)


def _within_vocabulary(tokenizer, vocab_size: int):
    """The tokenizer without added tokens past the model's vocabulary.

    transformers' GGUF tokenizer adds GPT-2's ``<|endoftext|>`` where the file has none: an id the
    embedding does not have, which the GGUF export (rightly) refuses.
    """
    if all(i < vocab_size for i in tokenizer.added_tokens_decoder):
        return tokenizer
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="loraprune-tokenizer-") as folder:
        tokenizer.save_pretrained(folder)
        path = Path(folder) / "tokenizer.json"
        data = json.loads(path.read_text())
        data["added_tokens"] = [t for t in data["added_tokens"] if t["id"] < vocab_size]
        path.write_text(json.dumps(data))
        return AutoTokenizer.from_pretrained(folder)


@contextmanager
def model_folder(source: ModelSource, dtype: str | torch.dtype = "float32") -> Iterator[Path]:
    """A Hugging Face folder of ``source``: a GGUF file is written as one (in ``dtype``) to a temporary folder."""
    if source.kind != "gguf":
        yield source.path
        return
    model, tokenizer = load_gguf(source.path, dtype)
    with tempfile.TemporaryDirectory(prefix="loraprune-gguf-") as folder:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        del model
        yield Path(folder)
