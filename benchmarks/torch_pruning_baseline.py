"""Torch-Pruning baseline for the quality study: Torch-Pruning chooses, loraprune removes and saves.

Torch-Pruning 1.6.1 (``pip install torch-pruning==1.6.1``) scores and selects the structures of
the same decoder layers loraprune prunes (its ``BasePruner``, local ranking, with
``GroupTaylorImportance`` or ``GroupMagnitudeImportance(p=2)``, as its LLM example configures
it); its choice becomes loraprune keep-masks (``gqa_unit="q_head"`` groups), and loraprune's
compaction writes the usual pruned folder, which ``loraprune prune DIR --ratio 0`` fine-tunes
like any other model.

How Torch-Pruning treats grouped-query attention (``BasePruner._prune`` with
``num_heads={q: H, k: KV, v: KV}``, ``prune_num_heads=True``, ``prune_head_dims=False``): k and
v are never pruned; every KV group loses the same number of query heads,
``ceil(ceil(ratio·H) / KV)``, the lowest by the head's mean group importance (q rows and o_proj
columns; the k/v members have no root indices and drop out of the reduction). loraprune's
default instead removes whole KV groups (k, v and their query heads). At SmolLM2's 9/3 heads,
ratio 0.5 keeps 3 query heads either way (loraprune: 1 KV group of 3; Torch-Pruning: 1 per
group) but Torch-Pruning keeps all 3 KV heads, so to reach loraprune's parameter count it
removes more MLP channels: one ratio for heads (the study's) and the MLP ratio solved for
loraprune's parameter count at that ratio (:func:`plan_for`).

Four things fail as a new user would call it on LLaMA with transformers 5.x; each has a
workaround here, and none changes what Torch-Pruning chooses (the trace only builds its
dependency graph; scores come from the weights and their gradients):

- the default ``use_cache=True`` makes the traced forward concatenate every k/v with an empty
  cache tensor (a one-input ``torch.cat``): the index propagation through it never converges
  (``get_pruning_group`` loops). Traced with ``use_cache=False``.
- ``sdpa`` attention runs GQA natively (``enable_gqa``, no ``repeat_kv``) and Torch-Pruning traces
  ``scaled_dot_product_attention`` as an element-wise op: q (576 channels), k and v (192) and
  o_proj become one channel-for-channel group rooted at v_proj, whose 192 scores cannot be
  split into q's 9 heads: ``shape '[9, -1]' is invalid for input of size 192``. Traced with
  ``eager`` attention, whose ``repeat_kv`` maps query head h to KV head h // g correctly.
- the rotary embedding's ``rotate_half`` concatenates two halves of every head along head_dim;
  Torch-Pruning infers the concatenation's channel offsets from shapes, and with 2 query heads
  per KV group (tiny-llama-gqa: 6/3 heads of 64) the offsets it infers for k do not add up to
  k's channels, so the propagation from k_proj loops as above. Traced with rotary embeddings
  as the identity: they mix dims within a head only, so they couple no heads or channels.
- when 1 query head per KV group is left (as many query heads as KV heads: ratio 0.5 here),
  ``_prune`` compares the already decremented head counts, takes the layer for plain
  multi-head attention, maps the removed query heads onto k and v, and its over-pruning check
  drops the layer's attention group without a word (only the MLP is pruned). The check is
  given the group without the k/v projections, which Torch-Pruning itself never prunes with GQA.

    python -m benchmarks.torch_pruning_baseline MODEL --data TEXT --ratio 0.5 \
        --importance taylor --out DIR [--calib-samples 10 --calib-seq-len 128 --seed 0]
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import math
import shutil
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from unittest import mock

import torch
from torch import nn

from loraprune import LoraPruneConfig, LoraPruner
from loraprune.masks import prune_count
from loraprune.structures import (
    StructureGroup,
    build_groups,
    decoder_layers,
    head_dim,
    projection_paths,
    pruned_layer_indices,
)

TORCH_PRUNING_VERSION = "1.6.1"
INSTALL = f"pip install torch-pruning=={TORCH_PRUNING_VERSION}"
IMPORTANCES = ("taylor", "magnitude")
REPORT_NAME = "torch_pruning_report.json"
TOLERANCE = 0.02  # the study compares methods at equal parameter count within 2%


@dataclass(frozen=True)
class Plan:
    """What Torch-Pruning is asked for, per pruned layer, and the counts it should reach."""

    layers: tuple[int, ...]
    head_ratio: float  # BasePruner's head_pruning_ratio
    heads_removed_per_kv_group: int
    channels_removed: int  # MLP channels per pruned layer
    mlp_ratio: float  # BasePruner's pruning_ratio that removes exactly channels_removed
    target_parameters: int  # loraprune's count at the same ratio (its default kv_group units)
    planned_parameters: int


def unit_parameters(model: nn.Module, group: StructureGroup) -> int:
    """Parameters one unit of ``group`` owns: its rows or columns in every member matrix."""
    total = 0
    for member in group.members:
        module = model.get_submodule(member.path)
        total += module.weight.numel() // group.num_units
        if member.axis == "out" and module.bias is not None:
            total += module.bias.numel() // group.num_units
    return total


def parameters_after(model: nn.Module, groups: Sequence[StructureGroup], removed: Sequence[int]) -> int:
    """The model's parameter count once ``removed[i]`` units of ``groups[i]`` are gone."""
    total = sum(p.numel() for p in model.parameters())
    return total - sum(count * unit_parameters(model, g) for g, count in zip(groups, removed, strict=True))


def loraprune_parameters(model: nn.Module, ratio: float, layers: Sequence[int] | None = None) -> int:
    """The parameter count ``loraprune prune --ratio RATIO`` reaches with its default units."""
    groups = build_groups(model, LoraPruneConfig(ratio=ratio, layers=layers))
    return parameters_after(model, groups, [prune_count(g, ratio) for g in groups])


def query_head_groups(model: nn.Module, layers: Sequence[int]) -> list[StructureGroup]:
    """loraprune's groups that match Torch-Pruning's GQA units: query heads (q rows, o columns) in
    blocks of one KV group, and MLP channels."""
    return build_groups(model, LoraPruneConfig(gqa_unit="q_head", layers=tuple(layers)))


def plan_for(model: nn.Module, ratio: float, layers: Sequence[int] | None = None) -> Plan:
    """Heads at ``ratio`` by Torch-Pruning's own rule, MLP channels solved for loraprune's count."""
    layers = pruned_layer_indices(model, LoraPruneConfig(layers=layers))
    target = loraprune_parameters(model, ratio, layers)
    groups = query_head_groups(model, layers)
    attention = [g for g in groups if g.kind == "attention"]
    mlp = [g for g in groups if g.kind == "mlp"]
    if len({(g.num_units, g.blocks) for g in attention}) > 1 or len({g.num_units for g in mlp}) > 1:
        raise ValueError(
            "the Torch-Pruning baseline needs equal layers (one ratio for all): prune a dense model"
        )
    heads, kv_groups = attention[0].num_units, attention[0].blocks
    # BasePruner._prune (local, GQA): ceil(ratio·heads) heads, rounded up to a count per KV group
    per_kv_group = math.ceil(math.ceil(ratio * heads) / kv_groups)
    if per_kv_group >= heads // kv_groups:
        raise ValueError(f"ratio {ratio}: Torch-Pruning would remove every query head of a KV group")
    removed = [per_kv_group * kv_groups if g.kind == "attention" else 0 for g in groups]
    excess = parameters_after(model, groups, removed) - target
    channels = mlp[0].num_units
    # at least 1: BasePruner prunes heads only inside a width scope with a non-zero ratio
    channels_removed = min(channels - 1, max(1, round(excess / sum(unit_parameters(model, g) for g in mlp))))
    removed = [r if g.kind == "attention" else channels_removed for g, r in zip(groups, removed, strict=True)]
    planned = parameters_after(model, groups, removed)
    if abs(planned / target - 1) > TOLERANCE:
        raise ValueError(
            f"ratio {ratio}: Torch-Pruning's {per_kv_group} query heads per KV group and {channels_removed} "
            f"MLP channels per layer give {planned:,} parameters, loraprune {target:,}: more than "
            f"{TOLERANCE:.0%} apart"
        )
    return Plan(
        layers=tuple(layers),
        head_ratio=ratio,
        heads_removed_per_kv_group=per_kv_group,
        channels_removed=channels_removed,
        # BasePruner keeps int(n·(1 − ratio)) channels: half a channel below the count keeps it exact
        mlp_ratio=(channels_removed - 0.5) / channels,
        target_parameters=target,
        planned_parameters=planned,
    )


def calibration_batch(tokenizer, data: str, samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """``samples`` windows of ``seq_len`` tokens of the text, drawn as loraprune's runs draw batches."""
    from loraprune.data import WindowSampler, read_text, tokenize, windows

    token_windows = windows(tokenize(tokenizer, read_text(data, "--data")), seq_len, "--data")
    return WindowSampler(token_windows, samples, seed).batch(0)


def _torch_pruning():
    try:
        import torch_pruning
    except ImportError:
        raise ImportError(f"the Torch-Pruning baseline needs torch-pruning: {INSTALL}") from None
    return torch_pruning


@contextmanager
def torch_pruner(model: nn.Module, plan: Plan, importance: str) -> Iterator:
    """Torch-Pruning's ``BasePruner`` set up for ``plan`` as its LLM example sets it up, with the
    workarounds of the module docstring (eager attention while the pruner lives).

    ``taylor`` reads the weight gradients: run a backward pass first.
    """
    tp = _torch_pruning()
    if importance not in IMPORTANCES:
        raise ValueError(f"importance must be one of {IMPORTANCES}, got {importance!r}")
    scorer = (
        tp.importance.GroupTaylorImportance()
        if importance == "taylor"
        else tp.importance.GroupMagnitudeImportance(p=2)
    )
    layers = decoder_layers(model)
    device = next(model.parameters()).device
    num_heads, kv_projections = {}, set()
    for index in plan.layers:
        attention = layers[index].self_attn
        heads = attention.q_proj.out_features // attention.head_dim
        kv_heads = attention.k_proj.out_features // attention.head_dim
        num_heads |= {attention.q_proj: heads, attention.k_proj: kv_heads, attention.v_proj: kv_heads}
        kv_projections |= {attention.k_proj, attention.v_proj}
    ignored = [model.get_input_embeddings(), model.get_output_embeddings()]
    ignored += [layer for i, layer in enumerate(layers) if i not in plan.layers]
    modeling = sys.modules[type(layers[0].self_attn).__module__]  # the family's modeling_*.py
    attention_impl = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with (
            warnings.catch_warnings(),
            # traced without rotary embeddings: they mix dims within a head only (module docstring)
            mock.patch.object(modeling, "apply_rotary_pos_emb", lambda q, k, *args, **kwargs: (q, k)),
        ):
            warnings.filterwarnings("ignore", message="Unwrapped parameters detected")  # RMSNorm weights
            pruner = tp.pruner.BasePruner(
                model,
                example_inputs={
                    "input_ids": torch.ones((1, 8), dtype=torch.long, device=device),
                    "use_cache": False,
                },
                importance=scorer,
                global_pruning=False,
                pruning_ratio=plan.mlp_ratio,
                ignored_layers=ignored,  # embeddings and unpruned layers: the hidden size stays
                num_heads=num_heads,
                prune_num_heads=True,
                prune_head_dims=False,
                head_pruning_ratio=plan.head_ratio,
                output_transform=lambda output: output.logits,
            )
        check = pruner.DG.check_pruning_group
        pruner.DG.check_pruning_group = lambda group: check(
            [(dep, idxs) for dep, idxs in group if dep.target.module not in kv_projections]
        )
        yield pruner
    finally:
        model.set_attn_implementation(attention_impl)


def torch_pruning_keeps(
    model: nn.Module, plan: Plan, importance: str, calibration: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Torch-Pruning's choice as keep-masks per :func:`query_head_groups` group name.

    Taylor scores need ``calibration`` (token ids): one forward and backward of the LM loss on
    it sets the weight gradients that ``GroupTaylorImportance`` reads. The model's weights are
    not changed (its gradients are cleared afterwards).
    """
    if importance == "taylor":
        if calibration is None:
            raise ValueError("taylor importance needs calibration tokens")
        model.zero_grad(set_to_none=True)
        batch = calibration.to(next(model.parameters()).device)
        model(input_ids=batch, labels=batch, use_cache=False).loss.backward()
    names = {module: name for name, module in model.named_modules()}
    chosen: dict[str, list[int]] = {}
    try:
        with torch_pruner(model, plan, importance) as pruner:
            for group in pruner.step(interactive=True):  # read, not pruned: loraprune removes
                for dep, idxs in group:
                    if pruner.DG.is_out_channel_pruning_fn(dep.handler) and dep.target.module in names:
                        chosen[names[dep.target.module]] = sorted(idxs)
    finally:
        model.zero_grad(set_to_none=True)
    return _keeps_from_choice(model, plan, chosen)


def _keeps_from_choice(model: nn.Module, plan: Plan, chosen: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """Keep-masks from the removed q_proj and gate_proj rows, checked against the plan."""
    dim = head_dim(model)
    keeps = {}
    for group in query_head_groups(model, plan.layers):
        paths = projection_paths(model, group.layer)
        rows = chosen.get(paths["q_proj" if group.kind == "attention" else "gate_proj"])
        if rows is None:
            raise RuntimeError(f"Torch-Pruning pruned nothing in {group.name}")
        units = sorted({row // dim for row in rows}) if group.kind == "attention" else rows
        if group.kind == "attention" and len(rows) != len(units) * dim:
            raise RuntimeError(f"Torch-Pruning removed part of a head in {group.name}")
        keep = torch.ones(group.num_units, dtype=torch.bool)
        keep[units] = False
        per_block = (~keep).view(group.blocks, -1).sum(dim=1)
        wanted = plan.heads_removed_per_kv_group if group.kind == "attention" else plan.channels_removed
        if bool((per_block != wanted).any()):
            raise RuntimeError(
                f"Torch-Pruning removed {per_block.tolist()} units of {group.name}, planned {wanted}"
            )
        keeps[group.name] = keep
    return keeps


def prune_with_torch_pruning(
    model: nn.Module,
    ratio: float,
    importance: str,
    calibration: torch.Tensor | None = None,
    layers: Sequence[int] | None = None,
) -> tuple[nn.Module, dict]:
    """The compacted model (loraprune's pruned class) and a report; ``model`` is changed in place."""
    plan = plan_for(model, ratio, layers)
    before = sum(p.numel() for p in model.parameters())
    keeps = torch_pruning_keeps(model, plan, importance, calibration)
    # lora_r=1: the smallest adapter patching accepts; B = 0, so compaction merges nothing
    config = LoraPruneConfig(
        ratio=ratio, criterion="magnitude", lora_r=1, gqa_unit="q_head", layers=plan.layers
    )
    pruner = LoraPruner(model, config)
    for index, group in enumerate(pruner.groups):
        pruner.set_group_mask(index, keeps[group.name])
    pruned = pruner.compact().eval()
    after = sum(p.numel() for p in pruned.parameters())
    deviation = after / plan.target_parameters - 1
    if abs(deviation) > TOLERANCE:
        raise RuntimeError(
            f"Torch-Pruning's model has {after:,} parameters, {deviation:+.1%} from loraprune's "
            f"{plan.target_parameters:,} at ratio {ratio}"
        )
    report = {
        "plan": asdict(plan),
        "parameters": {
            "before": before,
            "after": after,
            "ratio": after / before,
            "target": plan.target_parameters,
            "deviation_from_target": deviation,
        },
    }
    return pruned, report


def build_parser() -> argparse.ArgumentParser:
    from loraprune.cli_args import _add_model_argument, _add_runtime_flags, _layers, _positive_int, _ratio

    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.torch_pruning_baseline", description=__doc__.split("\n")[0]
    )
    _add_model_argument(parser)
    parser.add_argument("--data", required=True, help="calibration text (Taylor scores)")
    parser.add_argument("--out", required=True, type=Path, help="where the pruned folder is written")
    parser.add_argument(
        "--ratio", type=_ratio, required=True, help="loraprune's ratio whose parameter count is matched"
    )
    parser.add_argument("--importance", choices=IMPORTANCES, default="taylor")
    parser.add_argument(
        "--calib-samples", type=_positive_int, default=10, help="Taylor: sequences in the one batch"
    )
    parser.add_argument(
        "--calib-seq-len", type=_positive_int, default=128, help="Taylor: tokens per sequence"
    )
    parser.add_argument("--seed", type=int, default=0, help="which calibration windows are drawn")
    parser.add_argument("--layers", type=_layers, default=None, help="default: loraprune's default layers")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    _add_runtime_flags(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from loraprune.cli import _device_and_dtype, _load, _resolve
    from loraprune.io import atomic_write_text

    args = build_parser().parse_args(argv)
    if args.quiet:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    if args.out.exists() and not args.overwrite:
        print(f"{args.out} exists: pass --overwrite to replace it", file=sys.stderr)
        return 2
    started = time.perf_counter()
    device, dtype = _device_and_dtype(args)
    source = _resolve(args)
    model, tokenizer = _load(source, device, dtype)
    calibration = None
    if args.importance == "taylor":
        calibration = calibration_batch(
            tokenizer, args.data, args.calib_samples, args.calib_seq_len, args.seed
        )
    pruned, report = prune_with_torch_pruning(model, args.ratio, args.importance, calibration, args.layers)
    staging = args.out.with_name(args.out.name + ".partial")  # OUT appears complete or not at all
    shutil.rmtree(staging, ignore_errors=True)
    pruned.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    report |= {
        "model": str(args.model_dir),
        "model_source": source.to_dict(),
        "importance": args.importance,
        "ratio": args.ratio,
        "calibration": None
        if calibration is None
        else {
            "data": str(args.data),
            "samples": args.calib_samples,
            "seq_len": args.calib_seq_len,
            "seed": args.seed,
        },
        "torch_pruning": importlib.metadata.version("torch-pruning"),  # its __version__ says 1.6.0
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "wall_time_s": time.perf_counter() - started,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    atomic_write_text(staging / REPORT_NAME, json.dumps(report, indent=2) + "\n")
    if args.out.exists():
        shutil.rmtree(args.out)
    staging.rename(args.out)
    if not args.quiet:
        counts = report["parameters"]
        print(
            f"Torch-Pruning ({args.importance}) {counts['before']:,} -> {counts['after']:,} parameters "
            f"({counts['deviation_from_target']:+.2%} from loraprune's count at ratio {args.ratio}) -> {args.out}",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
