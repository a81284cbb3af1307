"""A pruned folder loads in plain transformers, where loraprune is not installed (trust_remote_code)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from remote_code import NEW_TOKENS, PROMPT_LENGTH, load_without_loraprune
from tiny_models import CONFIGS, pruned_tiny_model, random_tokens
from transformers import AutoModelForCausalLM

import loraprune
from loraprune.models import PRUNED_CLASSES

CONFIG_NAMES = list(CONFIGS)


@pytest.fixture(scope="module")
def loaded_without_loraprune(tmp_path_factory) -> tuple[dict, dict, torch.Tensor]:
    """Per config: the folder, and what a loraprune-free interpreter computed from it."""
    root = tmp_path_factory.mktemp("remote_code")
    folders = {}
    for name in CONFIG_NAMES:
        folders[name] = root / name
        pruned_tiny_model(name).save_pretrained(folders[name])
    tokens = random_tokens(length=16)
    return folders, load_without_loraprune(folders, tokens, root), tokens


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
