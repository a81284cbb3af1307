"""A pruned folder loads in plain transformers, where loraprune is not installed (trust_remote_code)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from tiny_models import CONFIGS, pruned_tiny_model, random_tokens
from transformers import AutoModelForCausalLM

import loraprune
from loraprune.models import PRUNED_CLASSES

CONFIG_NAMES = list(CONFIGS)
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


@pytest.fixture(scope="module")
def loaded_without_loraprune(tmp_path_factory) -> tuple[dict, dict, torch.Tensor]:
    """Per config: the folder, and what a loraprune-free interpreter computed from it."""
    root = tmp_path_factory.mktemp("remote_code")
    folders = {}
    for name in CONFIG_NAMES:
        folders[name] = root / name
        pruned_tiny_model(name).save_pretrained(folders[name])
    tokens = random_tokens(length=16)
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
    return folders, {name: results[str(folder)] for name, folder in folders.items()}, tokens


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_pruned_folder_loads_without_loraprune_with_equal_outputs(name, loaded_without_loraprune):
    folders, results, tokens = loaded_without_loraprune
    folder = folders[name]
    config = json.loads((folder / "config.json").read_text())
    config_cls, model_cls = PRUNED_CLASSES[CONFIGS[name][0]]
    assert config["auto_map"] == {
        "AutoConfig": f"configuration_loraprune.{config_cls.__name__}",
        "AutoModelForCausalLM": f"modeling_loraprune.{model_cls.__name__}",
    }
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()  # via import loraprune
    assert type(model).__module__ == "loraprune.modeling_loraprune"
    class_name, remote_logits, remote_greedy = results[name]
    assert class_name == type(model).__name__
    with torch.no_grad():
        assert torch.equal(remote_logits, model(input_ids=tokens).logits)
    greedy = model.generate(
        tokens[:1, :PROMPT_LENGTH], max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0
    )
    assert torch.equal(remote_greedy, greedy)


def test_saved_class_files_are_the_package_files_and_import_only_torch_and_transformers(tmp_path):
    pruned_tiny_model("llama-gqa-tied").save_pretrained(tmp_path)
    package = Path(loraprune.__file__).parent
    for name in ("configuration_loraprune.py", "modeling_loraprune.py"):
        text = (tmp_path / name).read_text()
        assert text == (package / name).read_text()  # copied verbatim: one implementation
        imported = {
            line.split()[1].split(".")[0]
            for line in text.splitlines()
            if line.startswith(("import ", "from ")) and not line.startswith("from .")
        }
        assert imported <= {"__future__", "torch", "transformers"}, imported
