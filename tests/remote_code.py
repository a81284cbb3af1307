"""Load pruned folders in a fresh interpreter where ``import loraprune`` fails, as where it was never installed."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

PROMPT_LENGTH, NEW_TOKENS = 5, 12

# Runs in a fresh interpreter in which `import loraprune` fails, as where it was never installed.
LOAD_WITHOUT_LORAPRUNE = (
    textwrap.dedent(
        """
    import sys
    sys.modules["loraprune"] = None
    try:
        import loraprune
    except ImportError:
        pass
    else:
        raise SystemExit("loraprune is importable: the check would prove nothing")
    import torch
    from transformers import AutoModelForCausalLM

    folders, tokens, out = sys.argv[1].split(","), torch.load(sys.argv[2]), sys.argv[3]
    results = {}
    for folder in folders:
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
        assert not type(model).__module__.startswith("loraprune"), type(model).__module__
        with torch.no_grad():
            logits = model(input_ids=tokens).logits
        greedy = model.generate(
            tokens[:1, :PROMPT_LENGTH], max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0
        )
        results[folder] = (type(model).__name__, logits, greedy)
    torch.save(results, out)
    """
    )
    .replace("PROMPT_LENGTH", str(PROMPT_LENGTH))
    .replace("NEW_TOKENS", str(NEW_TOKENS))
)


def load_without_loraprune(folders: dict[str, Path], tokens: torch.Tensor, root: Path) -> dict[str, tuple]:
    """Per name: (class name, logits of ``tokens``, greedy tokens of the first row's prompt), computed
    from the folder with ``trust_remote_code`` by an interpreter that cannot import loraprune."""
    torch.save(tokens, root / "tokens.pt")
    env = {**os.environ, "HF_MODULES_CACHE": str(root / "hf_modules"), "PYTHONPATH": ""}
    subprocess.run(
        [
            sys.executable,
            "-c",
            LOAD_WITHOUT_LORAPRUNE,
            ",".join(str(f) for f in folders.values()),
            str(root / "tokens.pt"),
            str(root / "results.pt"),
        ],
        check=True,
        cwd=root,
        env=env,
    )
    results = torch.load(root / "results.pt")
    return {name: results[str(folder)] for name, folder in folders.items()}
