"""--device-map: a model placed by accelerate's big-model dispatch (CPU devices here)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from loraprune import LoraPruneConfig, LoraPruner
from loraprune.cli import main
from loraprune.device_map import load_dispatched_model, parse_device_map
from loraprune.nn import lora_modules

pytest.importorskip("accelerate")

RUN = ["--ratio", "0.5", "--steps", "2", "--prune-every", "1", "--seq-len", "16", "--batch-size", "2"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_llama_dir):
    config = LlamaConfig(
        vocab_size=8192,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("tiny-llama-random")
    LlamaForCausalLM(config).save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_llama_dir / name, directory / name)
    return directory


def layer_map(**overrides) -> dict:
    mapping = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    mapping.update({f"model.layers.{i}": "cpu" for i in range(3)})
    mapping.update(overrides)
    return {k: v for k, v in mapping.items() if v is not None}


def test_state_lives_on_each_layers_device(model_dir):
    model = load_dispatched_model(model_dir, "auto", dtype=torch.float32)
    pruner = LoraPruner(model, LoraPruneConfig(ratio=0.5, layers=(0, 1, 2)))
    for group, scores in zip(pruner.groups, pruner.tracker.scores, strict=True):
        module = pruner.model.get_submodule(group.members[0].path)
        assert scores.device == module.weight.device == module.lora_A.device == module.out_mask.device
    assert all(m.lora_A.device == m.weight.device for m in lora_modules(pruner.model).values())


@pytest.mark.parametrize("spec", ["auto", "balanced", "file"])
def test_cli_prunes_a_dispatched_model(spec, model_dir, calib_text, tmp_path):
    if spec == "file":
        spec = tmp_path / "map.json"
        spec.write_text(json.dumps(layer_map()))
    out = tmp_path / "out"
    args = ["prune", str(model_dir), "--data", str(calib_text), "--out", str(out), *RUN, "--quiet"]
    assert main([*args, "--device-map", str(spec)]) == 0
    pruned = AutoModelForCausalLM.from_pretrained(out)
    assert pruned.model.layers[1].mlp.down_proj.in_features == 48
    assert pruned(input_ids=torch.randint(0, 8192, (1, 8))).logits.isfinite().all()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"model.layers.1": None}, "model.layers.1"),  # a layer on no device
        ({"model.layers.2": "cuda:7"}, "does not exist"),
        ({"model.layers.2": "disk"}, "offloads weights"),
        ({"model.layers.0": "gpu9"}, "is not a device"),
    ],
)
def test_bad_maps_one_line_naming_the_flag_and_nothing_written(
    overrides, message, model_dir, calib_text, tmp_path, capsys
):
    if overrides.get("model.layers.2") == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("cuda:7 exists here")
    spec = tmp_path / "map.json"
    spec.write_text(json.dumps(layer_map(**overrides)))
    with pytest.raises(ValueError, match=message):
        parse_device_map(str(spec), model_dir, "--device-map")
    out = tmp_path / "out"
    args = ["prune", str(model_dir), "--data", str(calib_text), "--out", str(out), *RUN, "--quiet"]
    assert main([*args, "--device-map", str(spec)]) == 2
    err = capsys.readouterr().err.strip()
    assert "--device-map" in err and message in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_a_map_that_is_not_a_file_or_a_choice(model_dir):
    with pytest.raises(ValueError, match="neither"):
        parse_device_map("everywhere", model_dir, "--device-map")
