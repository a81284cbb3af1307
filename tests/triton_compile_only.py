"""Compile every Triton kernel of the package for a GPU target, on a machine without a GPU.

The interpreter that the CPU tests use is lenient: it runs code the GPU compiler rejects, and it
has no shared-memory limit. This script drives the real launchers (CPU tensors, so the argument
specialisation is the launchers' own) through a driver that reports a GPU target and compiles
each launch, every autotuning config included, instead of running it. For each kernel it prints
the shared memory, registers and stack (spills) it needs, and it exits 1 when a kernel does not
compile or needs more than the target's per-block shared memory.

    python tests/triton_compile_only.py [--arch 90] [--quick] [--packed-only]

Must run in a fresh interpreter without TRITON_INTERPRET (the test suite starts it as a subprocess).
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("run without TRITON_INTERPRET: interpreted kernels are not compiled")

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.runtime.jit import KernelInterface

# Opt-in shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin), bytes.
MAX_SHARED = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


class CompileOnlyDriver:
    """What JITFunction.run asks of the active driver, for a GPU that is not there."""

    def __init__(self, target: GPUTarget) -> None:
        self.target = target

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")


def compile_instead_of_launch(compiled: list) -> None:
    """``kernel[grid](...)`` compiles (every config of an autotuned kernel) and launches nothing."""

    def getitem(self, grid):
        def launch(*args, **kwargs):
            kernels = self.warmup(*args, grid=grid, **kwargs)
            for kernel in kernels if isinstance(kernels, list) else [kernels]:
                compiled.append((getattr(self, "fn", self).__name__, kernel))

        return launch

    KernelInterface.__getitem__ = getitem


def resource_usage(kernel) -> dict[str, int]:
    """REG (registers per thread) and STACK (bytes per thread: spills and local arrays) of the
    kernel's cubin, from the cuobjdump that ships with triton."""
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        usage = subprocess.run(
            [str(cuobjdump), "-res-usage", cubin.name], capture_output=True, text=True, check=True
        ).stdout
    return {key: int(value) for key, value in re.findall(r"(REG|STACK):(\d+)", usage)}


def meta_parameters(kernel) -> str:
    """The block sizes the kernel was compiled with, the variant flags that are on and, for the
    importance kernels, how W is stored (int8, 4-bit; dense unnamed)."""
    from loraprune.kernels._utils import FOUR_BIT, INT8

    names = kernel.src.fn.arg_names
    constants = {names[path[0]]: value for path, value in kernel.src.constants.items() if len(path) == 1}
    blocks = [f"{name}={value}" for name, value in constants.items() if name.startswith("BLOCK")]
    flags = [name for name, value in constants.items() if name.isupper() and value is True]
    weight = {INT8: ["W=int8"], FOUR_BIT: ["W=4bit"]}.get(constants.get("WEIGHT_FORMAT"), [])
    return " ".join(blocks + flags + weight)


def packed_weights(out_features: int, in_features: int, gen: torch.Generator) -> list:
    """``W`` as an int8 and as an NF4 :class:`~loraprune.ops.QuantizedWeight` (bitsandbytes' layouts,
    blocks of 64; random codes: only the launch's specialisation matters here)."""
    from loraprune.ops import QuantizedWeight

    shape = (out_features, in_features)
    elements = out_features * in_features
    int8 = QuantizedWeight(
        "int8",
        torch.randint(-127, 128, shape, generator=gen, dtype=torch.int8),
        torch.rand(out_features, generator=gen),
        shape,
    )
    nf4 = QuantizedWeight(
        "nf4",
        torch.randint(0, 256, ((elements + 1) // 2,), generator=gen, dtype=torch.uint8),
        torch.rand(-(-elements // 64), generator=gen),
        shape,
        code=torch.linspace(-1.0, 1.0, 16),
        blocksize=64,
    )
    return [int8, nf4]


def drive_packed_importance(
    dtypes: list[torch.dtype], ranks: list[int], shapes: list[tuple[int, int, int]]
) -> None:
    """Both importance launchers with ``W`` packed (int8, NF4): the load stage dequantizes, so each
    format is its own variant; Taylor also per activation dtype and without LoRA."""
    from loraprune.kernels import lora_importance, taylor_importance

    gen = torch.Generator().manual_seed(1)
    for (rows, out_features, in_features), rank in itertools.product(shapes, ranks):
        factors = [
            torch.randn(rank, in_features, generator=gen),
            torch.randn(out_features, rank, generator=gen),
        ]
        for weight in packed_weights(out_features, in_features, gen):
            lora_importance.lora_importance(weight, *factors, *factors, 2.0, False)
            for dtype in dtypes:
                x = torch.randn(rows, in_features, generator=gen).to(dtype)
                grad_y = torch.randn(rows, out_features, generator=gen).to(dtype)
                taylor_importance.taylor_importance(x, grad_y, weight, *factors, 2.0, False)
                if rank == ranks[0]:
                    taylor_importance.taylor_importance(x, grad_y, weight, None, None, 0.0, False)


def drive_launchers(dtypes: list[torch.dtype], ranks: list[int], shapes: list[tuple[int, int, int]]) -> None:
    """Call every launcher on shapes and masks that select each kernel variant. Triton specialises
    on sizes and strides divisible by 16, so (rows, out, in) multiples of 16 give the code that runs
    on LLaMA shapes, and other sizes the bounds-checked variants."""
    from loraprune.kernels import lora_importance, masked_lora_linear, score_update, taylor_importance
    from loraprune.ops.masked_lora_linear import FAST_PATHS

    gen = torch.Generator().manual_seed(0)
    for (rows, out_features, in_features), dtype, rank in itertools.product(shapes, dtypes, ranks):
        weight = torch.randn(out_features, in_features, generator=gen).to(dtype)
        factors = [
            torch.randn(rank, in_features, generator=gen),
            torch.randn(out_features, rank, generator=gen),
        ]
        lora_importance.lora_importance(weight, *factors, *factors, 2.0, False)
        x = torch.randn(rows, in_features, generator=gen).to(dtype)
        grad_y = torch.randn(rows, out_features, generator=gen).to(dtype)
        taylor_importance.taylor_importance(x, grad_y, weight, *factors, 2.0, False)
        if rank == ranks[0]:  # without LoRA, and with X and dY of different dtypes (upcast)
            taylor_importance.taylor_importance(x, grad_y, weight, None, None, 0.0, False)
            if dtype != torch.float32:
                taylor_importance.taylor_importance(x, grad_y.float(), weight, *factors, 2.0, False)
        out_mask = torch.rand(out_features, generator=gen) > 0.5
        in_mask = torch.rand(in_features, generator=gen) > 0.5
        # The old paths, then every fast path (k_tiles and dropout_bits with masks and dropout, decode
        # at 16 tokens; the GEMM's lora_k_steps, persistent and tma, alone and together, without
        # masks and with gathered ones: tma only where the target is sm_90, in place of
        # lora_k_steps): each is compiled and reported until a GPU run has compared them.
        all_paths = frozenset(FAST_PATHS)
        mask_paths = frozenset({"mask_cache", "k_tiles", "dropout_bits"})
        for masks, dropout_p, tokens, paths in (
            ((None, None), 0.0, rows, frozenset()),
            ((out_mask, in_mask), 0.1, rows, frozenset()),
            ((out_mask, in_mask), 0.1, rows, all_paths),
            ((None, None), 0.0, 16, all_paths),
            ((out_mask, in_mask), 0.0, 16, all_paths),
            ((None, None), 0.0, rows, frozenset({"lora_k_steps"})),
            ((out_mask, in_mask), 0.0, rows, mask_paths | {"lora_k_steps"}),
            ((None, None), 0.0, rows, frozenset({"persistent"})),
            ((None, None), 0.0, rows, frozenset({"tma"})),
            ((None, None), 0.0, rows, all_paths),
        ):
            x = torch.randn(tokens, in_features, generator=gen).to(dtype).requires_grad_()
            lora_a, lora_b = (f.clone().requires_grad_() for f in factors)
            args = (x, weight, None, lora_a, lora_b, 2.0, *masks, dropout_p)
            y = masked_lora_linear.masked_lora_linear(*args, training=dropout_p > 0, fast_paths=paths)
            y.backward(torch.ones_like(y))
        # The split-K decode on a K-heavy layer (few output tiles, K >= 2·DECODE_SPLIT_MIN_K: it
        # splits on the CPU tensors here as on a GPU), without and with masks.
        split_in = 4 * in_features
        split_weight = torch.randn(out_features // 4, split_in, generator=gen).to(dtype)
        split_a = torch.randn(rank, split_in, generator=gen)
        split_b = torch.randn(out_features // 4, rank, generator=gen)
        assert masked_lora_linear.decode_splits(*split_weight.shape, split_weight.device) > 1
        for masks in (
            (None, None),
            (out_mask[: out_features // 4], torch.rand(split_in, generator=gen) > 0.5),
        ):
            x = torch.randn(16, split_in, generator=gen).to(dtype)
            masked_lora_linear.masked_lora_linear(
                x, split_weight, None, split_a, split_b, 2.0, *masks, 0.0, False,
                fast_paths=frozenset({"decode_split_k"}),
            )  # fmt: skip
    for widths in ((128, 128, 128, 128), (1, 1, 1)):
        num_units = 32
        parts = [torch.rand(num_units * width, generator=gen) for width in widths]
        counters = torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64)
        score_update.score_update(torch.zeros(num_units), parts, 0.9, *counters)
    drive_packed_importance(dtypes, ranks, shapes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, default=90, choices=sorted(MAX_SHARED))
    parser.add_argument(
        "--quick", action="store_true", help="bfloat16, rank 64 (the largest tiles), aligned shapes only"
    )
    parser.add_argument(
        "--packed-only",
        action="store_true",
        help="only the importance launchers with a packed (int8, NF4) weight",
    )
    args = parser.parse_args(argv)

    compiled: list = []
    driver.set_active(CompileOnlyDriver(GPUTarget("cuda", args.arch, 32)))
    compile_instead_of_launch(compiled)
    dtypes = [torch.bfloat16] if args.quick else [torch.float16, torch.bfloat16, torch.float32]
    ranks = [64] if args.quick else [1, 8, 16, 32, 64, 128]
    shapes = [(64, 320, 256)] if args.quick else [(64, 320, 256), (37, 200, 136)]
    (drive_packed_importance if args.packed_only else drive_launchers)(dtypes, ranks, shapes)

    limit = MAX_SHARED[args.arch]
    failures = 0
    print(f"triton {triton.__version__}, sm_{args.arch}: {len(compiled)} kernels compiled")
    for name, kernel in compiled:
        over = kernel.metadata.shared > limit
        failures += over
        usage = resource_usage(kernel)
        print(f"{'OVER' if over else 'ok  '} {name} {meta_parameters(kernel)} warps={kernel.metadata.num_warps} "
              f"stages={kernel.metadata.num_stages}: shared {kernel.metadata.shared} B, "
              f"{usage['REG']} registers, stack {usage['STACK']} B")  # fmt: skip
    if failures:
        print(f"{failures} kernels need more than the {limit} B of shared memory of sm_{args.arch}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
