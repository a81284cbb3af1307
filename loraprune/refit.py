"""Refit the consumers of removed units in closed form (``reconstruct``), after the final masks.

When heads (o_proj input columns) or channels (down_proj input columns) are removed, the kept
columns ``S`` of that consumer ``y = W x + b`` (LoRA merged into ``W`` first) are refit so that its
output on calibration tokens changes as little as possible, ridge toward the original weights:

    W′_S = (W·C[:, S] + λ·W_S)·(C[S, S] + λ·I)⁻¹,   C = E[x xᵀ]

With a bias, ``C`` is the centred covariance and the bias absorbs the mean,
``b′ = b + W·μ − W′_S·μ_S`` (FLAP's compensation when ``W′_S = W_S``). ``λ`` is relative: the ridge
is ``reconstruct_lambda · mean(diag C)`` (default 0.01, the dampening GPTQ and SparseGPT add to
their Hessians), so one value fits every layer and width. ``λ = 0`` is plain least squares (the
pseudo-inverse where ``C[S, S]`` is singular).

Statistics: ``x`` is the consumer's input with its producers unmasked (q/k/v rows for o_proj,
gate/up rows for down_proj; in the masked model the removed inputs are zero, and the refit has
nothing to fit), on the current pruned model (masks and LoRA on, dropout off). The calibration
windows pass through the model one decoder layer at a time: layer 0's inputs and every layer's other
arguments (its attention mask and RoPE tables, which differ between layers where sliding-window and
global layers alternate, as in Gemma) are captured once, then each layer runs three times (o_proj's
statistics, then down_proj's with the refit o_proj, then the layer's output for the next one), so a
refit sees the refits before it. One
consumer's ``in×in`` statistics exist at a time, accumulated in fp32 and solved in fp64.

Extra peak memory over the masked model: the calibration hidden states (``samples·seq_len·hidden``
in the model's dtype, one copy plus a layer's transients: 0.27 GB for LLaMA-7B at 64 × 512 in bf16),
and for the consumer being refit its fp32 ``in×in`` accumulator, then the fp64 moments and solve:
about ``14·in² + 16·out·in`` bytes at 50% kept. Measured on the CPU (VmHWM, one consumer, 50%
kept): LLaMA-7B o_proj (4096×4096) 0.57 GB, down_proj (out 4096, in 11008; fp32 accumulator
0.48 GB) 2.44 GB; by the formula LLaMA-2-70B down_proj (out 8192, in 28672; fp32 accumulator
3.3 GB) about 15 GB, o_proj (8192²) about 2 GB.

Biases: compensated where the consumer has one (LLaMA with ``attention_bias`` or ``mlp_bias``);
none is added where there is none (LLaMA's default, Mistral, Qwen2's o_proj), which would change
the architecture: there the uncentred solve above is the best refit without a bias. An existing
o_proj/down_proj bias is carried by every engine: the saved transformers code builds it from the
same config flags, the GGUF writer writes every tensor of the checkpoint (or refuses), and the
vLLM plugin builds LLaMA's layer from the same flags. A quantized base is re-quantized in its own
kind after the refit (``set_merged_weight``), LoRA ``B`` of the consumer zeroed in every case.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import nn

from loraprune.nn import LoraPruneLinear, eval_mode
from loraprune.structures import decoder_layers, projection_paths, unwrap_model

DEFAULT_LAMBDA = 0.01
DEFAULT_SAMPLES = 64
CONSUMERS = {"o_proj": ("q_proj", "k_proj", "v_proj"), "down_proj": ("gate_proj", "up_proj")}


def reconstruct_options(
    reconstruct: bool | None, lam: float | None, samples: int | None
) -> tuple[float | None, int | None]:
    """The checked ``reconstruct_lambda`` and ``reconstruct_samples`` (defaults filled in when
    ``reconstruct``; setting them with ``reconstruct=False`` is an error). With ``reconstruct``
    ``None`` (automatic) an unset ``samples`` stays ``None``: the run fills it from its data."""
    if reconstruct is False:
        for name, value in (("reconstruct_lambda", lam), ("reconstruct_samples", samples)):
            if value is not None:
                raise ValueError(f"{name} needs reconstruct (the refit of o_proj and down_proj)")
        return None, None
    lam = DEFAULT_LAMBDA if lam is None else lam
    if reconstruct and samples is None:
        samples = DEFAULT_SAMPLES
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not (math.isfinite(lam) and lam >= 0):
        raise ValueError(f"reconstruct_lambda must be a finite number >= 0, got {lam!r}")
    if samples is not None and (isinstance(samples, bool) or not isinstance(samples, int) or samples < 1):
        raise ValueError(f"reconstruct_samples must be a positive integer, got {samples!r}")
    return float(lam), samples


def calibration_windows(windows: torch.Tensor, samples: int, seed: int) -> torch.Tensor:
    """``samples`` of the data's windows, drawn without replacement by ``seed``."""
    if samples > len(windows):
        raise ValueError(f"reconstruct_samples ({samples}) exceeds the {len(windows)} windows the data holds")
    order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(seed))
    return windows[order[:samples]]


@dataclass(frozen=True)
class ConsumerStatistics:
    """A consumer's input moments over the calibration tokens (fp64)."""

    second_moment: torch.Tensor  # E[x xᵀ], in×in
    mean: torch.Tensor  # E[x], in
    tokens: int

    def covariance(self, centred: bool) -> torch.Tensor:
        if not centred:
            return self.second_moment
        return self.second_moment - torch.outer(self.mean, self.mean)


@dataclass(frozen=True)
class ConsumerRefit:
    """One refit consumer and its output error on the calibration tokens, relative to
    ``E‖W x‖²``: masked without refit (``before``) and refit (``after``)."""

    path: str
    kept: int
    total: int
    tokens: int
    error_before: float
    error_after: float


def ridge_refit(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    statistics: ConsumerStatistics,
    keep: torch.Tensor,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``W′_S`` (out×|S|) and ``b′`` (``None`` without a bias), fp64 (see the module docstring).

    ``weight`` is the merged ``W`` (out×in), ``keep`` the bool kept-column mask, ``lam`` relative to
    the mean diagonal of the covariance used (centred with a bias)."""
    kept = keep.nonzero().squeeze(1)
    full = weight.double()
    cov = statistics.covariance(centred=bias is not None)
    ridge = lam * float(cov.diagonal().mean())
    system = cov[kept][:, kept] + ridge * torch.eye(len(kept), dtype=cov.dtype, device=cov.device)
    rhs = full @ cov[:, kept] + ridge * full[:, kept]  # out×|S|
    factor, info = torch.linalg.cholesky_ex(system)
    if int(info) == 0:
        refit = torch.cholesky_solve(rhs.T, factor).T
    else:  # singular without a ridge: the least-squares solution of least norm
        refit = rhs @ torch.linalg.pinv(system, hermitian=True)
    if bias is None:
        return refit, None
    mean = statistics.mean
    return refit, bias.double() + full @ mean - refit @ mean[kept]


def removal_costs(
    weight: torch.Tensor,
    covariance: torch.Tensor,
    keep: torch.Tensor,
    width: int,
    lam: float = DEFAULT_LAMBDA,
) -> torch.Tensor:
    """The refit-aware cost of removing each kept unit of ``width`` columns of ``weight`` (out×in), fp64
    per unit, 0 for units ``keep`` (bool per column, whole units) already removes: SliceGPT's

        tr(W_P · ([(C_SS + λI)⁻¹]_PP)⁻¹ · W_Pᵀ)

    for unit ``P`` among the kept columns ``S``, the least ``E‖(W′ − W) x‖² + λ‖W′ − W‖²`` a ridge refit
    (:func:`ridge_refit`) of ``S`` without ``P`` leaves (the Schur complement of ``S \\ P`` in
    ``C_SS + λI``). ``covariance`` as the refit uses it (centred where the consumer has a bias), ``lam``
    relative to its mean kept diagonal and > 0 (the system is then positive definite; inputs that are
    all zero cost nothing). One ``|S|×|S|`` inverse, then a ``width×width`` solve per unit."""
    if not lam > 0:
        raise ValueError(f"removal_costs needs a ridge lam > 0, got {lam!r}")
    costs = torch.zeros(keep.numel() // width, dtype=torch.float64, device=weight.device)
    kept = keep.nonzero().squeeze(1)
    units = len(kept) // width
    system = covariance[kept][:, kept].double()
    ridge = lam * float(system.diagonal().mean())
    if units == 0 or not ridge > 0:
        return costs
    system = system + ridge * torch.eye(len(kept), dtype=system.dtype, device=system.device)
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(system))
    blocks = inverse.view(units, width, units, width).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
    removed = weight[:, kept].double().view(-1, units, width).permute(1, 0, 2)  # units × out × width
    # tr(W_P B⁻¹ W_Pᵀ) = Σ W_Pᵀ ⊙ B⁻¹W_Pᵀ, with B the unit's diagonal block of the inverse
    solved = torch.linalg.solve(blocks, removed.transpose(1, 2))  # units × width × out
    costs[kept.view(units, width)[:, 0] // width] = (removed.transpose(1, 2) * solved).sum(dim=(1, 2))
    return costs


def output_error(difference: torch.Tensor, covariance: torch.Tensor, block: int = 256) -> float:
    """``E‖D x‖² = tr(D C Dᵀ)`` from the input's moment ``C``, a block of rows of ``D`` at a time."""
    return sum(float(((rows @ covariance) * rows).sum()) for rows in difference.double().split(block))


class _Collected(Exception):
    """Ends a forward once what it was run for has been collected."""


def layer_inputs(model: nn.Module, windows: torch.Tensor, batch_size: int, last: int) -> list[list[tuple]]:
    """``(hidden_states, args, kwargs)`` of decoder layers 0..``last`` for each batch of ``windows``:
    per layer, one entry per batch. Each layer's own ``args``/``kwargs`` (the model may pass each
    layer a different mask and RoPE tables); ``hidden_states`` are layer 0's only (``None`` beyond:
    they are the outputs of the layers before, which the refit changes). The layers do not run: each
    returns its input while the arguments are captured, and the forward stops after layer ``last``."""
    model = unwrap_model(model)
    device = model.get_input_embeddings().weight.device
    layers = decoder_layers(model)
    captured: list[list[tuple]] = [[] for _ in range(last + 1)]

    def recorder(index: int):
        def forward(*args, **kwargs):
            kwargs = dict(kwargs)
            hidden = args[0] if args else kwargs.pop("hidden_states")
            captured[index].append((hidden if index == 0 else None, args[1:], kwargs))
            if index == last:
                raise _Collected
            return hidden

        return forward

    # an instance attribute shadows the class's forward (accelerate's hooks set one: kept and put back)
    saved = [layers[index].__dict__.get("forward") for index in range(last + 1)]
    for index in range(last + 1):
        layers[index].forward = recorder(index)
    try:
        for start in range(0, len(windows), batch_size):
            with contextlib.suppress(_Collected):
                model(input_ids=windows[start : start + batch_size].to(device), use_cache=False)
    finally:
        for index, forward in enumerate(saved):
            if forward is None:
                del layers[index].forward
            else:
                layers[index].forward = forward
    return captured


def consumer_statistics(
    layer: nn.Module, consumer: LoraPruneLinear, producers: list[LoraPruneLinear], inputs: list[tuple]
) -> ConsumerStatistics:
    """``E[x xᵀ]`` and ``E[x]`` of ``consumer``'s input over ``inputs``, its producers unmasked;
    each forward stops at the consumer."""
    width = consumer.in_features
    device = consumer.out_mask.device
    second = torch.zeros(width, width, dtype=torch.float32, device=device)
    total = torch.zeros(width, dtype=torch.float64, device=device)
    tokens = [0]

    def collect(module, args):
        x = args[0].reshape(-1, width).float()
        second.addmm_(x.T, x)
        total.add_(x.sum(dim=0, dtype=torch.float64))
        tokens[0] += x.shape[0]
        raise _Collected

    saved = [producer.out_mask.clone() for producer in producers]
    handle = consumer.register_forward_pre_hook(collect)
    try:
        for producer in producers:
            producer.set_masks(out_mask=torch.ones_like(producer.out_mask))
        for hidden, args, kwargs in inputs:
            with contextlib.suppress(_Collected):
                layer(hidden, *args, **kwargs)
    finally:
        handle.remove()
        for producer, mask in zip(producers, saved, strict=True):
            producer.set_masks(out_mask=mask)
    count = tokens[0]
    return ConsumerStatistics(second.double().div_(count), total / count, count)


def refit_consumer(
    path: str, consumer: LoraPruneLinear, statistics: ConsumerStatistics, lam: float
) -> ConsumerRefit:
    """Refit ``consumer``'s kept columns in place (:func:`ridge_refit`)."""
    keep = consumer.in_mask.to(statistics.mean.device)
    kept, removed = keep.nonzero().squeeze(1), (~keep).nonzero().squeeze(1)
    weight = consumer.merged_weight().double()
    refit, bias = ridge_refit(weight, consumer.bias, statistics, keep, lam)
    uncentred = statistics.covariance(centred=False)
    reference = output_error(weight, uncentred)
    before = output_error(weight[:, removed], uncentred[removed][:, removed])
    difference = weight.clone()
    difference[:, kept] -= refit
    # with a bias, b′ cancels the error's mean: what is left is the centred error
    after = output_error(difference, statistics.covariance(centred=bias is not None))
    del difference
    weight[:, kept] = refit
    consumer.set_merged_weight(weight, bias)
    return ConsumerRefit(path, len(kept), len(keep), statistics.tokens, before / reference, after / reference)


@torch.no_grad()
def reconstruct(
    model: nn.Module, windows: torch.Tensor, lam: float = DEFAULT_LAMBDA, batch_size: int = 8
) -> list[ConsumerRefit]:
    """Refit every o_proj and down_proj with removed input columns on ``windows`` (int64 token
    windows), layer by layer, in place; returns what each refit did (see the module docstring)."""
    model = unwrap_model(model)
    layers = decoder_layers(model)
    todo: dict[int, list[str]] = {}
    for index in range(len(layers)):
        paths = projection_paths(model, index)
        for consumer, producers in CONSUMERS.items():
            modules = [model.get_submodule(paths[name]) for name in (consumer, *producers)]
            missing = [
                paths[name]
                for name, m in zip((consumer, *producers), modules, strict=True)
                if not isinstance(m, LoraPruneLinear)
            ]
            if missing:
                raise ValueError(
                    f"reconstruct: {missing[0]} is not a patched projection (a "
                    f"{type(model.get_submodule(missing[0])).__name__}); the refit reads its masks"
                )
            if not bool(modules[0].in_mask.all()):
                todo.setdefault(index, []).append(consumer)
    if not todo:
        return []
    with eval_mode(model):  # no dropout: the statistics are those of the model as it will run
        arguments = layer_inputs(model, windows, batch_size, max(todo))
        inputs = arguments[0]
        done = []
        for index in range(max(todo) + 1):
            layer, paths = layers[index], projection_paths(model, index)
            for consumer in todo.get(index, []):
                module = model.get_submodule(paths[consumer])
                producers = [model.get_submodule(paths[name]) for name in CONSUMERS[consumer]]
                statistics = consumer_statistics(layer, module, producers, inputs)
                done.append(refit_consumer(paths[consumer], module, statistics, lam))
            if index < max(todo):  # this layer's outputs, with the next layer's own arguments
                inputs = [
                    (_hidden(layer(h, *args, **kwargs)), *arguments[index + 1][batch][1:])
                    for batch, (h, args, kwargs) in enumerate(inputs)
                ]
        return done


def _hidden(output) -> torch.Tensor:
    """A decoder layer's hidden states (transformers 4.x returns a tuple, 5.x the tensor)."""
    return output[0] if isinstance(output, tuple) else output


__all__ = [
    "DEFAULT_LAMBDA",
    "DEFAULT_SAMPLES",
    "ConsumerRefit",
    "ConsumerStatistics",
    "calibration_windows",
    "reconstruct",
    "reconstruct_options",
    "removal_costs",
    "ridge_refit",
]
