"""A frozen base quantized by bitsandbytes (CPU backend): int8 (LLM.int8()) and nf4.

The dequantized weights are the reference: the quantized layer must compute what a float
layer holding them computes, every criterion must score what it scores on them, and compaction
must write what compacting them writes.
"""

from __future__ import annotations

import copy
import importlib
import json
import shutil
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

import loraprune
from loraprune import LoraPruneConfig, LoraPruneLinear, LoraPruner, ops
from loraprune.cli import main
from loraprune.config import CRITERIA
from loraprune.nn import lora_modules

bitsandbytes = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as bnb_functional  # noqa: E402
from quantized_weights import bitsandbytes_weight  # noqa: E402
from tiny_models import aligned_model  # noqa: E402

from loraprune import quantization  # noqa: E402
from loraprune.ops import QuantizedWeight  # noqa: E402
from loraprune.quantization import QuantizedLoraPruneLinear  # noqa: E402

KINDS = ("int8", "nf4")


def randomize(model: torch.nn.Module, seed: int = 1) -> None:
    """Non-zero LoRA factors and a few masked heads and channels."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in lora_modules(model).values():
            if module.lora_A is not None:
                module.lora_A.normal_(0, 0.1, generator=generator)
                module.lora_B.normal_(0, 0.1, generator=generator)


def dequantized_twin(quantized: torch.nn.Module) -> torch.nn.Module:
    """A copy of a patched model whose projections hold the dequantized weights in fp32."""
    twin = copy.deepcopy(quantized)
    for path, module in lora_modules(quantized).items():
        if isinstance(module, QuantizedLoraPruneLinear):
            plain = LoraPruneLinear(
                module.dequantize_rows(slice(0, module.out_features)),
                module.bias,
                module.r,
                1.0,
                module.dropout,
            )
            plain.scaling = module.scaling
            plain.load_state_dict(
                {k: v for k, v in module.state_dict().items() if not k.startswith("base.")}, strict=False
            )
            plain.set_masks(module.out_mask, module.in_mask)
            twin.set_submodule(path, plain)
    return twin


def bitsandbytes_dequantized(module: QuantizedLoraPruneLinear) -> torch.Tensor:
    """bitsandbytes' own whole-matrix dequantization (the tests' reference only)."""
    weight = module.base.weight
    if module.quant_type == "int8":
        scales = weight.SCB if weight.SCB is not None else module.base.state.SCB
        return bnb_functional.int8_vectorwise_dequant(weight.data, scales).float()
    return bnb_functional.dequantize_4bit(weight.data, weight.quant_state).float()


def quantized_linear(kind: str, out_features: int = 96, in_features: int = 128, bias: bool = True):
    torch.manual_seed(3)
    linear = torch.nn.Linear(in_features, out_features, bias=bias)
    return QuantizedLoraPruneLinear.from_module(linear, kind, 4, 8.0, 0.0, torch.float32), linear


@pytest.mark.parametrize("kind", KINDS)
def test_row_blocks_dequantize_what_bitsandbytes_dequantizes(kind, monkeypatch):
    module, linear = quantized_linear(kind)
    reference = bitsandbytes_dequantized(module)
    assert (reference - linear.weight).abs().max() < 0.05  # it is a quantization of W
    monkeypatch.setattr(quantization, "BLOCK_ELEMENTS", 5 * 128 + 7)  # blocks of 5 rows
    blocks = list(module.row_blocks())
    assert len(blocks) == 20 and all(b.stop - b.start <= 5 for b in blocks)
    torch.testing.assert_close(torch.cat([module.dequantize_rows(b) for b in blocks]), reference)
    rows = torch.tensor([7, 0, 95, 31, 32, 33, 7])
    torch.testing.assert_close(module.dequantize_rows(rows), reference[rows])


@pytest.mark.parametrize("kind", KINDS)
def test_forward_and_gradients_match_the_dequantized_reference(kind):
    module, _ = quantized_linear(kind)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        module.lora_B.normal_(0, 0.1, generator=generator)
    module.set_masks(torch.rand(96, generator=generator) > 0.3, torch.rand(128, generator=generator) > 0.3)
    reference = dequantized_twin(torch.nn.ModuleDict({"m": module}))["m"]
    x = torch.randn(2, 5, 128, generator=generator)
    outputs, grads = [], []
    for layer in (module, reference):
        x_leaf = x.clone().requires_grad_(True)
        y = layer(x_leaf)
        y.backward(torch.ones_like(y))
        outputs.append(y.detach())
        grads.append([x_leaf.grad, layer.lora_A.grad, layer.lora_B.grad])
        layer.zero_grad()
    # nf4: the same dequantized matmul; int8: LLM.int8() also quantizes the activations (per token).
    scale = outputs[1].abs().max()
    atol = 1e-5 if kind == "nf4" else 0.02
    torch.testing.assert_close(outputs[0], outputs[1], atol=atol * scale, rtol=0)
    assert torch.equal(outputs[0] == 0, outputs[1] == 0)  # masked rows are exactly zero in both
    for got, want in zip(grads[0], grads[1], strict=True):
        torch.testing.assert_close(got, want, atol=atol * want.abs().max(), rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_criteria_score_what_they_score_on_the_dequantized_weights(kind, monkeypatch):
    monkeypatch.setattr(quantization, "BLOCK_ELEMENTS", 7 * 128)  # several row blocks
    module, _ = quantized_linear(kind)
    generator = torch.Generator().manual_seed(6)
    with torch.no_grad():
        module.lora_B.normal_(0, 0.1, generator=generator)
    module.lora_A.grad = torch.randn(module.lora_A.shape, generator=generator)
    module.lora_B.grad = torch.randn(module.lora_B.shape, generator=generator)
    weight = bitsandbytes_dequantized(module)
    lora_args = (module.lora_A, module.lora_B, module.lora_A.grad, module.lora_B.grad, module.scaling)
    for squared in (False, True):
        want = ops.lora_importance(weight, *lora_args, squared=squared, backend="torch")
        torch.testing.assert_close(module.lora_importance(squared=squared), want)
    x = torch.randn(11, 128, generator=generator)
    grad_y = torch.randn(11, 96, generator=generator)
    want = ops.taylor_importance(x, grad_y, weight, module.lora_A, module.lora_B, module.scaling)
    torch.testing.assert_close(module.taylor_importance(x, grad_y), want)
    merged = weight + module.scaling * module.lora_B @ module.lora_A
    torch.testing.assert_close(
        module.magnitude_importance(), (merged.square().sum(1), merged.square().sum(0))
    )


@pytest.mark.parametrize(
    ("kind", "nested"), [("int8", False), ("nf4", False), ("nf4", True), ("fp4", False), ("fp4", True)]
)
def test_packed_weight_dequantizes_what_bitsandbytes_dequantizes(kind, nested):
    """Odd widths: 4-bit rows start mid-byte and blocks run across rows; nested: double-quantized scales."""
    weight, reference = bitsandbytes_weight(kind, 37, 99, seed=2, nested=nested)
    assert weight.kind == kind
    torch.testing.assert_close(weight.dequantize_rows(slice(0, 37)), reference, rtol=0, atol=0)
    rows = torch.tensor([36, 0, 5, 5, 18])
    torch.testing.assert_close(weight.dequantize_rows(rows), reference[rows], rtol=0, atol=0)
    for span in (slice(3, 9), slice(4, 10), slice(36, 37), slice(5, 5), slice(1, 30, 4)):
        torch.testing.assert_close(weight.dequantize_rows(span), reference[span], rtol=0, atol=0)


def test_quantized_reference_dequantizes_a_row_block_at_a_time(monkeypatch):
    weight, dense = bitsandbytes_weight("nf4", 37, 128, seed=4)
    generator = torch.Generator().manual_seed(7)
    a, ga = torch.randn(2, 6, 128, generator=generator)
    b, gb = torch.randn(2, 37, 6, generator=generator)
    x, grad_y = torch.randn(5, 128, generator=generator), torch.randn(5, 37, generator=generator)
    # The ops' modules (``loraprune.ops.lora_importance`` the attribute is the function).
    lora_module = importlib.import_module("loraprune.ops.lora_importance")
    taylor_module = importlib.import_module("loraprune.ops.taylor_importance")
    monkeypatch.setattr(lora_module, "REFERENCE_BLOCK_ELEMENTS", 5 * 128)
    monkeypatch.setattr(taylor_module, "REFERENCE_ROW_BLOCK", 4)
    requested = []
    original = QuantizedWeight.dequantize_rows

    def recording(self, rows):
        requested.append(rows.stop - rows.start)
        return original(self, rows)

    monkeypatch.setattr(QuantizedWeight, "dequantize_rows", recording)
    for squared in (False, True):
        requested.clear()
        got = ops.lora_importance(weight, a, b, ga, gb, 0.5, squared=squared, backend="torch")
        assert max(requested) == 5 and sum(requested) == 37
        torch.testing.assert_close(got, ops.lora_importance(dense, a, b, ga, gb, 0.5, squared=squared))
        requested.clear()
        got = ops.taylor_importance(x, grad_y, weight, a, b, 0.5, squared=squared, backend="torch")
        assert max(requested) == 4 and sum(requested) == 37
        torch.testing.assert_close(got, ops.taylor_importance(x, grad_y, dense, a, b, 0.5, squared=squared))


@pytest.mark.parametrize("kind", KINDS)
def test_quantized_criteria_go_through_the_packed_weight_op(kind, monkeypatch):
    """The criteria hand the ops bitsandbytes' codes in place (no dense copy of W, no row blocks)."""
    module, _ = quantized_linear(kind)
    generator = torch.Generator().manual_seed(8)
    module.lora_A.grad = torch.randn(module.lora_A.shape, generator=generator)
    module.lora_B.grad = torch.randn(module.lora_B.shape, generator=generator)
    x, grad_y = torch.randn(6, 128, generator=generator), torch.randn(6, 96, generator=generator)
    calls = []
    for name in ("lora_importance", "taylor_importance"):
        original = getattr(ops, name)

        def recording(*args, _original=original, _name=name, **kwargs):
            calls.append((_name, next(a for a in args if isinstance(a, QuantizedWeight))))
            return _original(*args, **kwargs)

        monkeypatch.setattr(ops, name, recording)
    lora_scores = module.lora_importance()
    taylor_scores = module.taylor_importance(x, grad_y)
    assert [name for name, _ in calls] == ["lora_importance", "taylor_importance"]
    for _, weight in calls:
        assert weight.kind == kind and weight.shape == (96, 128)
        assert weight.data.data_ptr() == module.base.weight.data_ptr()
    monkeypatch.undo()
    dense = bitsandbytes_dequantized(module)
    lora_args = (module.lora_A, module.lora_B, module.lora_A.grad, module.lora_B.grad, module.scaling)
    torch.testing.assert_close(lora_scores, ops.lora_importance(dense, *lora_args, backend="torch"))
    torch.testing.assert_close(
        taylor_scores, ops.taylor_importance(x, grad_y, dense, module.lora_A, module.lora_B, module.scaling)
    )


def test_quantized_weight_errors_name_the_field():
    weight, _ = bitsandbytes_weight("nf4", 8, 64, seed=0)
    fields = dict(
        kind="nf4", data=weight.data, scales=weight.scales, shape=(8, 64), code=weight.code, blocksize=64
    )
    for change, match in (
        ({"kind": "int4"}, "weight.kind"),
        ({"scales": weight.scales[:3]}, "weight.scales"),
        ({"blocksize": 48}, "weight.blocksize"),
        ({"code": weight.code[:8]}, "weight.code"),
        ({"shape": (9, 64)}, "weight.data"),
    ):
        with pytest.raises(ValueError, match=match):
            QuantizedWeight(**{**fields, **change})
    a = torch.randn(2, 64)
    with pytest.raises(ValueError, match="lora_b"):
        ops.lora_importance(weight, a, torch.randn(7, 2), a, torch.randn(8, 2), 1.0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("criterion", CRITERIA)
def test_every_criterion_prunes_a_quantized_base(kind, criterion):
    model = aligned_model()
    pruner = LoraPruner(model, LoraPruneConfig(ratio=0.5, criterion=criterion, quantize_base=kind))
    projections = lora_modules(pruner.model).values()
    assert all(isinstance(m, QuantizedLoraPruneLinear) and m.quant_type == kind for m in projections)
    assert all(p.dtype == torch.float32 for p in pruner.trainable_parameters())
    optimizer = torch.optim.AdamW(pruner.trainable_parameters(), lr=1e-2)
    tokens = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    pruner.model.train()
    for step in range(2):
        pruner.model(input_ids=tokens, labels=tokens).loss.backward()
        pruner.update_scores()
        optimizer.step()
        pruner.model.zero_grad()
        pruner.prune(0.25 * (step + 1))
    assert all(torch.isfinite(s).all() for s in pruner.tracker.scores)
    assert all(s.kept == s.total // 2 for s in pruner.status())
    compacted = pruner.compact()
    assert compacted(input_ids=tokens).logits.isfinite().all()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("family", "dense_dtype"), [("llama", torch.float32), ("qwen2", torch.bfloat16)])
def test_compaction_equals_compaction_of_the_dequantized_weights(kind, family, dense_dtype, monkeypatch):
    model = aligned_model(family).to(dense_dtype)
    pruner = LoraPruner(model, LoraPruneConfig(ratio=0.5, quantize_base=kind))
    randomize(pruner.model)
    for index, group in enumerate(pruner.groups):
        keep = torch.ones(group.num_units, dtype=torch.bool)
        keep[
            torch.randperm(group.num_units, generator=torch.Generator().manual_seed(index))[
                : group.num_units // 2
            ]
        ] = False
        pruner.set_group_mask(index, keep)
    twin = dequantized_twin(pruner.model)
    requested = []  # rows each projection dequantized
    original = QuantizedLoraPruneLinear.dequantize_rows

    def recording(self, rows):
        requested.append((self, rows.numel() if isinstance(rows, torch.Tensor) else rows.stop - rows.start))
        return original(self, rows)

    monkeypatch.setattr(QuantizedLoraPruneLinear, "dequantize_rows", recording)
    kept_rows = {m: int(m.out_mask.sum()) for m in lora_modules(pruner.model).values()}
    compacted = pruner.compact()
    monkeypatch.undo()
    for module, rows in kept_rows.items():
        assert sum(n for m, n in requested if m is module) == rows  # only the kept rows
    want = loraprune.compact(twin).state_dict()
    got = compacted.state_dict()
    assert got.keys() == want.keys()
    for key, value in want.items():  # the twin merged in fp32 too: one rounding to the dense dtype
        assert got[key].dtype == dense_dtype, key
        tolerance = 1e-6 if dense_dtype == torch.float32 else 2**-8  # one bf16 ulp, rounding ties
        torch.testing.assert_close(got[key], value.to(dense_dtype), atol=tolerance, rtol=tolerance)
    assert "quantization_config" not in compacted.config.to_dict()


def save_with_tokenizer(model: torch.nn.Module, directory, tokenizer_dir) -> None:
    model.save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, directory / name)


@pytest.fixture(scope="module")
def float_model_dir(tmp_path_factory, tiny_llama_dir):
    """A tiny random LLaMA (aligned widths) with the fixture's tokenizer, saved in float32."""
    directory = tmp_path_factory.mktemp("float-model")
    save_with_tokenizer(aligned_model(vocab=8192), directory, tiny_llama_dir)
    return directory


@pytest.mark.parametrize("kind", KINDS)
def test_a_model_loaded_quantized_is_taken_over(kind, float_model_dir, tmp_path):
    loaded = quantization.load_quantized_model(
        float_model_dir, kind, dtype=torch.float32, device=torch.device("cpu")
    )
    loaded.save_pretrained(tmp_path / "quantized")  # a checkpoint with a quantization_config
    assert quantization.checkpoint_quant_type(tmp_path / "quantized") == kind
    model = loraprune.load_model(tmp_path / "quantized")
    other = "nf4" if kind == "int8" else "int8"
    with pytest.raises(ValueError, match="quantize_base"):
        LoraPruner(model, LoraPruneConfig(quantize_base=other))
    pruner = LoraPruner(model, LoraPruneConfig(ratio=0.5))
    modules = lora_modules(pruner.model).values()
    assert all(isinstance(m, QuantizedLoraPruneLinear) and m.quant_type == kind for m in modules)
    float_pruner = LoraPruner(AutoModelForCausalLM.from_pretrained(float_model_dir), LoraPruneConfig())
    assert pruner.parameter_counts() == float_pruner.parameter_counts()


def test_errors_name_the_argument(monkeypatch):
    with pytest.raises(ValueError, match="quantize_base"):
        LoraPruneConfig(quantize_base="int4")
    with pytest.raises(ValueError, match="taylor_impl"):
        LoraPruner(
            aligned_model(),
            LoraPruneConfig(criterion="taylor", taylor_impl="materialized", quantize_base="int8"),
        )
    linear = torch.nn.Linear(48, 32)  # 48 is not a multiple of nf4's 64-element block
    with pytest.raises(ValueError, match="in_features"):
        QuantizedLoraPruneLinear.from_module(linear, "nf4", 4, 8.0, 0.0, torch.float32)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(ImportError, match="quantize_base needs bitsandbytes"):
        LoraPruner(aligned_model(), LoraPruneConfig(quantize_base="int8"))


@pytest.mark.parametrize("kind", KINDS)
def test_cli_prunes_a_quantized_base_into_a_dense_model(kind, float_model_dir, calib_text, tmp_path):
    out = tmp_path / "out"
    run = ["--ratio", "0.5", "--steps", "2", "--prune-every", "1", "--seq-len", "16", "--batch-size", "2"]
    args = ["prune", str(float_model_dir), "--data", str(calib_text), "--out", str(out), *run, "--quiet"]
    assert main([*args, "--quantize-base", kind, "--dtype", "bfloat16"]) == 0
    report = json.loads((out / "prune_report.json").read_text())
    assert report["prune_config"]["quantize_base"] == kind
    assert report["parameters"]["after"] < report["parameters"]["before"]
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    pruned = AutoModelForCausalLM.from_pretrained(out)
    assert all(p.dtype == torch.bfloat16 for p in pruned.parameters())
    assert pruned.model.layers[1].mlp.down_proj.in_features == 96
    tokens = torch.randint(0, 8192, (1, 8))
    assert pruned(input_ids=tokens).logits.isfinite().all()


def test_cli_bad_quantization_one_line_and_nothing_written(float_model_dir, calib_text, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["prune", str(float_model_dir), "--data", str(calib_text), "--out", str(out), "--quiet"]
    args += ["--ratio", "0.5", "--steps", "2", "--prune-every", "1", "--seq-len", "16"]
    assert main([*args, "--quantize-base", "int4"]) == 2
    assert "--quantize-base" in capsys.readouterr().err
    materialized = ["--criterion", "taylor", "--taylor-impl", "materialized", "--quantize-base", "int8"]
    assert main([*args, *materialized]) == 2
    err = capsys.readouterr().err.strip()
    assert "--taylor-impl" in err and len(err.splitlines()) == 1, err
    assert not out.exists()
