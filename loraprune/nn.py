"""The masked LoRA linear module and the in-place patching of a loaded model.

``patch_model`` swaps the seven projections of every decoder layer (q/k/v/o, gate/up/down; a fused
matrix split into them first, :mod:`loraprune.fused`) for :class:`LoraPruneLinear`: the frozen base weight, LoRA factors (on ``target_modules``) and
keep-masks over output features (q/k/v/gate/up rows) and input features (o/down columns).
Projections without LoRA still carry masks, so every member of a pruned structure can be
zeroed. ``unpatch_model`` swaps them back for plain ``nn.Linear`` layers with LoRA merged and
masked structures zeroed.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from loraprune import ops
from loraprune.config import LoraPruneConfig
from loraprune.fused import split_fused
from loraprune.ops.masked_lora_linear import MaskPlan, enabled_fast_paths, masked_lora_linear_plan
from loraprune.structures import decoder_layers, projection_paths, unwrap_model


def _host_reads_are_free(mask: torch.Tensor) -> bool:
    """Whether reading a mask on the host costs no device synchronisation (CPU tensors)."""
    return mask.device.type == "cpu"


def _capturing(device: torch.device) -> bool:
    """Whether a CUDA graph is being captured on the current stream of ``device``."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


class LoraPruneLinear(nn.Module):
    """``y = ((x⊙m_in) Wᵀ + b + s·drop(x⊙m_in) Aᵀ Bᵀ) ⊙ m_out`` with ``W``, ``b`` frozen.

    ``lora_A`` (r×in) and ``lora_B`` (out×r) are the trainable factors (``None`` when
    ``r == 0``: a frozen, maskable linear); ``out_mask`` and ``in_mask`` are bool keep-masks.
    While a unit fades out (:meth:`set_fade`, LoRAShear's LHSPG in :mod:`loraprune.fade`) the base
    part of its features is scaled by a factor ``m`` in [0, 1).

    Masks may be edited in place, by ``set_masks`` (which copies into the same buffers),
    ``load_state_dict``, in-place ops, or writes that bypass autograd's version counter
    (``.data``, numpy, DLPack, a kernel); the next forward uses the edited masks:

    - On CPU tensors every forward reads the masks on the host (free there) and passes only the
      masked ones.
    - Elsewhere (a GPU) the masked LoRA linear is always given both masks, and the host reads a mask
      only once per version ``(data_ptr, _version)`` (``set_masks``, ``load_state_dict`` and
      in-place ops make a new one; the writes that bypass the counter do not) to know whether it has
      a masked feature. A mask known to be masked goes through its cached plan (the kernels gather
      or skip the masked features), which the device compares with the live mask on every forward
      and rebuilds when they differ (:class:`~loraprune.kernels.masked_lora_linear.CachedMaskPlan`:
      one small launch, no host synchronisation, so a stale plan is never used and CUDA graphs
      capture it); a mask not known to be masked is applied in place (every feature computed, the
      masked ones zeroed), so that a write that bypassed the counter still takes effect, at the
      price of the gather until the next ``set_masks`` (or any new version). A projection without
      LoRA (``r == 0``), a quantized base and the importance criteria read the per-version answer
      only: after a write that bypasses the counter on a GPU, call ``set_masks()`` (no arguments).

    CUDA graphs: the plan's buffers are allocated once per mask and device and never freed while
    the layer lives, so a captured graph never reads freed memory, and its replay re-checks the
    plan against the (same) mask buffers: ``set_masks`` between replays takes effect. ``set_masks``
    is refused during a capture. Run the captured step once eagerly before capturing (same shapes,
    masks, training mode and fast paths): the kernels autotune on the first call with each new
    key, which a capture forbids.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        lora_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if weight.ndim != 2:
            raise ValueError(f"weight must be 2-D (out×in), got shape {tuple(weight.shape)}")
        if isinstance(r, bool) or not isinstance(r, int) or r < 0:
            raise ValueError(f"r must be a non-negative integer, got {r!r}")
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight.detach(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.r = r
        self.scaling = alpha / r if r else 0.0
        self.dropout = dropout
        if r:
            device = weight.device
            self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=device, dtype=lora_dtype))
            self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=device, dtype=lora_dtype))
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's default initialisation
        else:
            self.lora_A = self.lora_B = None
        self.register_buffer(
            "out_mask", torch.ones(self.out_features, dtype=torch.bool, device=weight.device)
        )
        self.register_buffer("in_mask", torch.ones(self.in_features, dtype=torch.bool, device=weight.device))
        # Per mask: ((data_ptr, _version, device), has a masked feature); see _has_masked.
        self._mask_flags: dict[str, tuple[tuple, bool]] = {}
        # Per (mask, device): the cached plan's buffers, never dropped (a captured graph may use them).
        self._plan_cache: dict[tuple[str, torch.device], object] = {}
        self._refresh_mask_flags()
        self.register_load_state_dict_post_hook(lambda module, _: module._refresh_mask_flags())

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int, alpha: float, dropout: float = 0.0) -> LoraPruneLinear:
        return cls(linear.weight, linear.bias, r, alpha, dropout)

    @classmethod
    def from_peft(cls, layer: nn.Module, adapter_name: str) -> LoraPruneLinear:
        """Take over a PEFT LoRA ``Linear``: its base layer, ``A``, ``B``, scaling and dropout."""
        base = layer.get_base_layer()
        lora_a = layer.lora_A[adapter_name].weight
        lora_b = layer.lora_B[adapter_name].weight
        dropout = layer.lora_dropout[adapter_name]
        module = cls(base.weight, base.bias, lora_a.shape[0], 1.0, getattr(dropout, "p", 0.0), lora_a.dtype)
        module.scaling = float(layer.scaling[adapter_name])
        with torch.no_grad():
            module.lora_A.copy_(lora_a)
            module.lora_B.copy_(lora_b)
        return module

    def _refresh_mask_flags(self) -> None:
        """Read both masks on the host now (``set_masks``, ``load_state_dict``, construction)."""
        self._mask_flags.clear()
        self._has_masked("out_mask")
        self._has_masked("in_mask")

    def _has_masked(self, name: str) -> bool:
        """Whether the mask ``name`` has a masked feature: read on the host at every call where that
        is free (CPU tensors), else once per version ``(data_ptr, _version)``; during a CUDA graph
        capture and under ``torch.compile``, where it cannot be read, the last answer (``False``
        when there is none: a mask is then applied in place, which is right whatever it holds)."""
        mask = getattr(self, name)
        known = self._mask_flags.get(name)
        if torch.compiler.is_compiling():
            return False if known is None else known[1]
        key = (mask.data_ptr(), mask._version, mask.device)
        if known is not None and known[0] == key and not _host_reads_are_free(mask):
            return known[1]
        if _capturing(mask.device):
            return False if known is None else known[1]
        masked = not bool(mask.all())
        self._mask_flags[name] = (key, masked)
        return masked

    @property
    def _out_masked(self) -> bool:
        return self._has_masked("out_mask")

    @property
    def _in_masked(self) -> bool:
        return self._has_masked("in_mask")

    def _cached_plan(self, name: str):
        """The :class:`~loraprune.kernels.masked_lora_linear.CachedMaskPlan` of mask ``name``, made
        on first use per device and kept for the layer's lifetime (a captured graph may read it)."""
        from loraprune.kernels.masked_lora_linear import CachedMaskPlan

        mask = getattr(self, name)
        key = (name, mask.device)
        if key not in self._plan_cache:
            self._plan_cache[key] = CachedMaskPlan(mask.shape[0], mask.device)
        return self._plan_cache[key]

    def _kernel_plan(
        self, out_mask: torch.Tensor | None, in_mask: torch.Tensor | None, out_masked: bool, in_masked: bool
    ) -> MaskPlan:
        """The masks' :class:`MaskPlan` for the Triton kernels (called only when they run): a mask
        known to be masked is gathered (output) or has its kept K tiles listed (input, ``k_tiles``),
        through the cached plan refreshed on the device (``mask_cache``) or a plan made per call; a
        mask not known to be masked is applied in place."""
        paths = enabled_fast_paths()
        gather_out = out_mask is not None and out_masked
        tiles_in = in_mask is not None and in_masked and "k_tiles" in paths
        if "mask_cache" not in paths or torch.compiler.is_compiling():
            return masked_lora_linear_plan(out_mask, in_mask, k_tiles=tiles_in, gather_out=gather_out)
        out_plan = self._cached_plan("out_mask").refresh(self.out_mask) if gather_out else None
        in_plan = self._cached_plan("in_mask").refresh(self.in_mask) if tiles_in else None
        # The kernels read the snapshot the plan was built from: consistent with the plan even if
        # the live mask is written between this forward and its backward.
        return MaskPlan(
            out_mask if out_plan is None else out_plan.snapshot,
            in_mask if in_plan is None else in_plan.snapshot,
            None if out_plan is None else out_plan.order,
            None if out_plan is None else out_plan.count,
            None if in_plan is None else in_plan.tiles,
            None if in_plan is None else in_plan.tile_counts,
        )

    def set_masks(self, out_mask: torch.Tensor | None = None, in_mask: torch.Tensor | None = None) -> None:
        """Replace the keep-masks (bool, ``out_features`` / ``in_features`` long, copied into the
        layer's buffers); ``None`` leaves one as is; with no argument, re-read both (after a write
        that bypassed autograd's version counter, see the class docstring). Refused while a CUDA
        graph is being captured (the copy would be captured, and replayed)."""
        if _capturing(self.out_mask.device):
            raise RuntimeError(
                "set_masks during a CUDA graph capture: change masks between replays instead (a replay "
                "re-checks the cached plans against the mask buffers)"
            )
        for name, mask, size in (
            ("out_mask", out_mask, self.out_features),
            ("in_mask", in_mask, self.in_features),
        ):
            if mask is None:
                continue
            if mask.dtype != torch.bool or mask.shape != (size,):
                raise ValueError(
                    f"{name} must be a bool tensor of shape ({size},), got {mask.dtype} {tuple(mask.shape)}"
                )
            getattr(self, name).copy_(mask)
        self._refresh_mask_flags()

    @torch.no_grad()
    def keep_rank_components(self, keep: torch.Tensor, scaling: float) -> None:
        """Narrow the adapter to rank components ``keep`` (sorted int64 indices into the current
        rank; component k is row k of ``A`` with column k of ``B``) with the new ``scaling``.

        ``A``, ``B`` and their gradients are replaced by narrowed copies (the old storage is freed);
        the Parameter objects stay the same, so an optimizer keeps them (its state is narrowed by
        :meth:`loraprune.lora_rank.RankPruner.prune`).
        """
        if self.lora_A is None:
            raise ValueError("keep_rank_components: this projection has no LoRA adapter")
        if keep.ndim != 1 or not 1 <= keep.numel() <= self.r:
            raise ValueError(f"keep must hold 1 to {self.r} component indices, got shape {tuple(keep.shape)}")
        for param, axis in ((self.lora_A, 0), (self.lora_B, 1)):
            index = keep.to(param.device)
            grad, param.grad = param.grad, None
            param.data = param.data.index_select(axis, index)
            if grad is not None:
                param.grad = grad.index_select(axis, index)
        self.r = int(keep.numel())
        self.scaling = float(scaling)

    # Set by the importance tracker while it scores (criteria ``taylor`` fused and ``act``): it
    # wraps the forward to collect this layer's input and a gradient during the backward.
    score_capture = None
    # Set by :func:`loraprune.distill.teacher_mode`: the layer computes its frozen base alone (no
    # masks, no LoRA), so that the patched model is also the unpruned teacher, without a copy.
    base_only = False
    # Set by :meth:`set_fade` (:mod:`loraprune.fade`): output / input features whose frozen base part
    # (``W`` rows with their bias / ``W`` columns) is scaled by ``m`` in [0, 1) while their unit fades
    # out; ``(index int64, m float32)`` on the layer's device, or ``None``.
    fade_out = None
    fade_in = None

    @property
    def fading(self) -> bool:
        """Whether features of this layer are fading out (their base scaled by ``m < 1``)."""
        return self.fade_out is not None or self.fade_in is not None

    def set_fade(
        self,
        out: tuple[torch.Tensor, torch.Tensor] | None = None,
        in_: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        """Scale the frozen base of output features ``out = (index, m)`` (rows of ``W`` and the bias)
        and of input features ``in_ = (index, m)`` (columns of ``W``) by ``m``; the LoRA path and the
        masks are unchanged. ``None`` ends the fade of that side. The layer then computes, per faded
        feature, ``m·W + s·B·A`` (exact for every backend: the kernels run as before and the base part
        of the faded features, ``(1 − m)·W``, is taken off with one GEMM over those features only)."""
        for name, value, size in (("out", out, self.out_features), ("in_", in_, self.in_features)):
            if value is None:
                continue
            index, factor = value
            if index.dtype != torch.int64 or index.ndim != 1 or factor.shape != index.shape:
                raise ValueError(f"set_fade: {name} must be (int64 index, factor) of the same length")
            if index.numel() and not (int(index.min()) >= 0 and int(index.max()) < size):
                raise ValueError(f"set_fade: {name} indexes features outside [0, {size})")
        device = self.out_mask.device
        self.fade_out = None if out is None else (out[0].to(device), out[1].to(device, torch.float32))
        self.fade_in = None if in_ is None else (in_[0].to(device), in_[1].to(device, torch.float32))

    def _check_not_fading(self, where: str) -> None:
        if self.fading:
            raise ValueError(
                f"{where}: features of this layer are still fading out (fade_steps): let the fade end "
                "(the units are then masked) before merging"
            )

    def _faded(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``y`` (the layer's output with every kept feature's full base) with the base part of the
        fading features scaled by ``m``: ``y + (m − 1)·(base of those features)`` (an entry of ``W`` in a
        fading row and a fading column is scaled by both factors)."""
        x_in = x * self.in_mask.to(x.dtype) if self._in_masked else x
        if self.fade_in is not None:
            index, factor = self.fade_in
            columns = x_in.index_select(-1, index)
            part = _FrozenSliceLinear.apply(columns * (factor - 1).to(x.dtype), self.weight, index, 1)
            if self._out_masked:
                part = part * self.out_mask.to(part.dtype)
            y = y + part.to(y.dtype)
            if self.fade_out is not None:  # the rows' base below sees the faded columns
                x_in = x_in.index_copy(-1, index, columns * factor.to(x.dtype))
        if self.fade_out is not None:
            index, factor = self.fade_out
            part = _FrozenSliceLinear.apply(x_in, self.weight, index, 0)
            if self.bias is not None:
                part = part + self.bias.index_select(0, index).to(part.dtype)
            y = y.index_add(-1, index, (part * (factor - 1).to(part.dtype)).to(y.dtype))
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.base_only:
            return self._base_forward(x)
        if self.score_capture is not None and self.training and torch.is_grad_enabled():
            return self.score_capture(x, self._masked_forward)
        return self._masked_forward(x)

    def _base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x Wᵀ + b``: the frozen base layer, whatever the masks and adapter hold."""
        return F.linear(x, self.weight, self.bias)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """``W + s·B·A`` in fp32, masks not applied."""
        weight = self.weight.float()
        if self.lora_A is None:
            return weight.clone()
        return weight + self.scaling * (self.lora_B.float() @ self.lora_A.float())

    @torch.no_grad()
    def set_merged_weight(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Make ``weight`` (out×in) the layer's ``W + s·B·A``: ``W`` takes it (in ``W``'s dtype) and
        ``B`` becomes zero; ``bias`` replaces the bias (``None``: only where the layer has none)."""
        self._check_merged(weight, bias)
        self.weight.copy_(weight)
        self._set_bias_and_clear_lora(bias)

    def _check_merged(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        if weight.shape != (self.out_features, self.in_features):
            raise ValueError(
                f"weight must be {self.out_features}×{self.in_features}, got {tuple(weight.shape)}"
            )
        if (bias is None) != (self.bias is None):
            raise ValueError("bias must be given exactly where the layer has one")

    def _set_bias_and_clear_lora(self, bias: torch.Tensor | None) -> None:
        if bias is not None:
            self.bias.copy_(bias)
        if self.lora_B is not None:
            self.lora_B.zero_()

    def _masked_forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._masked_lora_forward(x)
        return self._faded(x, y) if self.fading else y

    def _masked_lora_forward(self, x: torch.Tensor) -> torch.Tensor:
        out_masked, in_masked = self._out_masked, self._in_masked
        if self.lora_A is None:
            if in_masked:
                x = x * self.in_mask.to(x.dtype)
            y = F.linear(x, self.weight, self.bias)
            return y * self.out_mask.to(y.dtype) if out_masked else y
        # Without free host reads the masks are always passed (see the class docstring).
        always = not _host_reads_are_free(self.out_mask) or torch.compiler.is_compiling()
        out_mask = self.out_mask if out_masked or always else None
        in_mask = self.in_mask if in_masked or always else None
        return ops.masked_lora_linear(
            x,
            self.weight,
            self.bias,
            self.lora_A,
            self.lora_B,
            self.scaling,
            out_mask,
            in_mask,
            dropout_p=self.dropout,
            training=self.training,
            # The fused kernels compute no weight gradient; materialised taylor needs one.
            backend="torch" if self.weight.requires_grad else None,
            plan=functools.partial(self._kernel_plan, out_mask, in_mask, out_masked, in_masked),
        )

    def merged_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` computing this layer: LoRA merged, masked rows/columns zeroed."""
        self._check_not_fading("merged_linear")
        weight, bias = ops.compact_linear(self.weight, self.bias, self.lora_A, self.lora_B, self.scaling)
        weight = weight * self.out_mask[:, None].to(weight.dtype) * self.in_mask[None, :].to(weight.dtype)
        if bias is not None:
            bias = bias * self.out_mask.to(bias.dtype)
        linear = nn.Linear(
            self.in_features,
            self.out_features,
            bias=bias is not None,
            device=weight.device,
            dtype=weight.dtype,
        )
        linear.weight = nn.Parameter(weight, requires_grad=False)
        if bias is not None:
            linear.bias = nn.Parameter(bias, requires_grad=False)
        return linear

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"scaling={self.scaling:g}, dropout={self.dropout:g}, bias={self.bias is not None}"
        )


class _FrozenSliceLinear(torch.autograd.Function):
    """``x·Sᵀ`` with ``S`` the rows (``dim`` 0) or columns (``dim`` 1) ``index`` of a frozen ``W``: the
    slice is gathered again in the backward instead of being kept (while many features fade it is a large
    part of ``W``); only ``x`` gets a gradient. Under autocast it computes in the autocast dtype."""

    @staticmethod
    def forward(ctx, x, weight, index, dim):
        if torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        ctx.save_for_backward(weight, index)
        ctx.dim = dim
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x, weight.index_select(dim, index).to(x.dtype))

    @staticmethod
    def backward(ctx, grad):
        weight, index = ctx.saved_tensors
        return grad @ weight.index_select(ctx.dim, index).to(grad.dtype), None, None, None


def patch_model(model: nn.Module, config: LoraPruneConfig | None = None) -> nn.Module:
    """Swap the projections of every decoder layer for :class:`LoraPruneLinear`, in place.

    ``model`` is a Hugging Face causal LM of a supported family, or a PEFT model wrapping one,
    whose LoRA adapters (active adapter) are taken over. Every parameter except the LoRA factors
    is frozen. Returns the (unwrapped) Hugging Face model; patching twice is a no-op. Everything
    is checked before the first module is swapped, so a rejected model is left untouched.
    """
    config = LoraPruneConfig() if config is None else config
    if not isinstance(config, LoraPruneConfig):
        raise TypeError(f"config must be a LoraPruneConfig, got {type(config).__name__}")
    peft_adapter = _active_peft_adapter(model)
    model = unwrap_model(model)
    # A family's fused matrices (Phi-3's qkv_proj) become their member projections first (a change
    # of layout only: the model computes the same), a PEFT adapter on one becoming per-member adapters.
    split_fused(model, peft_adapter)
    targets = {}
    for layer_index in range(len(decoder_layers(model))):
        for name, path in projection_paths(model, layer_index).items():
            module = model.get_submodule(path)
            if isinstance(module, LoraPruneLinear):
                continue
            takes_over_peft = peft_adapter is not None and _is_peft_lora_layer(module)
            if not takes_over_peft and (not isinstance(module, nn.Linear) or _is_peft_lora_layer(module)):
                raise TypeError(
                    f"model: {path} is a {type(module).__name__}, expected nn.Linear "
                    "(custom projections are not supported)"
                )
            targets[path] = (name, module)
    if peft_adapter is not None:
        stray = [p for p, m in model.named_modules() if _is_peft_lora_layer(m) and p not in targets]
        if stray:
            raise TypeError(
                f"model: PEFT LoRA adapters outside the q/k/v/o/gate/up/down projections are not "
                f"supported: {stray[:3]}"
            )
    dense_dtype = model.get_input_embeddings().weight.dtype  # what a quantized base is merged back into
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(config.seed)  # LoRA initialisation is reproducible from the config's seed
    try:
        lora = {id(p) for p in lora_parameters(model)}  # factors of projections patched before stay trainable
        for param in model.parameters():
            param.requires_grad_(id(param) in lora)
        for path, (name, module) in targets.items():
            if _is_peft_lora_layer(module):
                new = LoraPruneLinear.from_peft(module, peft_adapter)
            else:
                r = config.lora_r if name in config.target_modules else 0
                new = _patched_linear(module, r, config, dense_dtype)
            model.set_submodule(path, new)
    finally:
        torch.random.set_rng_state(generator_state)
    return model


def unpatch_model(model: nn.Module) -> nn.Module:
    """Swap every :class:`LoraPruneLinear` back for an ``nn.Linear`` (LoRA merged, masks applied), in place."""
    model = unwrap_model(model)
    for path, module in list(model.named_modules()):
        if isinstance(module, LoraPruneLinear):
            model.set_submodule(path, module.merged_linear())
    return model


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Within: every module of ``model`` in eval mode; after: each back in its own mode (patched
    projections may be in another mode than their parents)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def lora_modules(model: nn.Module) -> dict[str, LoraPruneLinear]:
    """The patched projections of ``model`` by module path."""
    return {path: m for path, m in unwrap_model(model).named_modules() if isinstance(m, LoraPruneLinear)}


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable LoRA factors, in a stable order."""
    params = []
    for module in lora_modules(model).values():
        if module.lora_A is not None:
            params += [module.lora_A, module.lora_B]
    return params


def _patched_linear(
    linear: nn.Linear, r: int, config: LoraPruneConfig, dense_dtype: torch.dtype
) -> nn.Module:
    """The patched projection: the base quantized with ``config.quantize_base``, or kept quantized
    when it was loaded so (bitsandbytes is imported only then)."""
    if config.quantize_base is None and not type(linear).__module__.startswith("bitsandbytes"):
        return LoraPruneLinear.from_linear(linear, r, config.lora_alpha, config.lora_dropout)
    from loraprune.quantization import QuantizedLoraPruneLinear

    return QuantizedLoraPruneLinear.from_module(
        linear, config.quantize_base, r, config.lora_alpha, config.lora_dropout, dense_dtype
    )


def _is_peft_lora_layer(module: nn.Module) -> bool:
    return hasattr(module, "lora_A") and hasattr(module, "get_base_layer") and hasattr(module, "scaling")


def _active_peft_adapter(model: nn.Module) -> str | None:
    if not hasattr(model, "peft_config"):
        return None
    adapter = model.active_adapter
    if isinstance(adapter, (list, tuple)):
        if len(adapter) != 1:
            raise ValueError(f"model: exactly one active PEFT adapter is supported, got {adapter}")
        adapter = adapter[0]
    peft_type = str(getattr(model.peft_config[adapter], "peft_type", ""))
    if "LORA" not in peft_type.upper():
        raise ValueError(f"model: PEFT adapter {adapter!r} is {peft_type}, only LoRA can be taken over")
    for module in model.modules():
        if _is_peft_lora_layer(module) and adapter in module.lora_A:
            base = module.get_base_layer()
            if not isinstance(base, nn.Linear) or type(base).__module__.startswith("bitsandbytes"):
                raise TypeError(f"model: PEFT LoRA on a {type(base).__name__} is not supported")
            if getattr(module, "use_dora", {}).get(adapter, False):
                raise ValueError(f"model: PEFT adapter {adapter!r} uses DoRA, which cannot be taken over")
    return adapter


__all__ = ["LoraPruneLinear", "eval_mode", "lora_modules", "lora_parameters", "patch_model", "unpatch_model"]
