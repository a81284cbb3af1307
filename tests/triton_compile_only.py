"""Compile every Triton kernel of the package for a GPU target, on a machine without a GPU.

The interpreter that the CPU tests use is lenient: it runs code the GPU compiler rejects, and it
has no shared-memory limit. This script drives the real launchers (CPU tensors, so the argument
specialisation is the launchers' own) through a driver that reports a GPU target and compiles
each launch, every autotuning config included, instead of running it. For each kernel it prints
the shared memory, registers and stack (spills) it needs, and it exits 1 when a kernel does not
compile or needs more than the target's per-block shared memory.

With ``--load-check`` it compiles instead the masked LoRA linear's kernels on the default fast
paths (and on lora_k_steps), forward and backward, bf16, at ranks 8, 16, 32 and 64, one tuning
config each (the GEMM's 128×128×64), and reads how each loads global memory in its PTX: it exits 1
when a kernel has no 16-byte ``cp.async`` (its loads are not pipelined) or loads 16-bit tile data
with scalar 2-byte loads (not vectorised; a mask's bytes loaded in pairs are not tile data).

    python tests/triton_compile_only.py [--arch 90] [--quick] [--packed-only]
    python tests/triton_compile_only.py --load-check [--arch 80] [--ranks 8,16,32,64]

Must run in a fresh interpreter without TRITON_INTERPRET (the test suite starts it as a subprocess).
"""

from __future__ import annotations

import argparse
import itertools
import linecache
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


_LOC = re.compile(r"^\s*\.loc\s+(\d+)\s+(\d+)")
_FILE = re.compile(r'^\s*\.file\s+(\d+)\s+"([^"]+)"')
_CP_ASYNC = re.compile(
    r"cp\.async\.c[ag]\.shared\.global(?:\.\S+)?\s+\[[^\]]+\],\s*\[[^\]]+\],\s*(0x[0-9a-f]+|\d+)"
)
_LD_GLOBAL = re.compile(r"\bld\.global((?:\.[a-z0-9:_]+)*)\s")


def load_profile(ptx: str, source_file: str | None = None) -> dict:
    """How a kernel loads global memory, from its PTX: ``cp_async_16`` (16-byte asynchronous copies:
    the software pipeline's, vectorised), ``cp_async_small`` (4/8-byte ones), ``vector_loads``
    (synchronous ``ld.global.v2/v4``), ``scalar_16bit`` (scalar 2-byte ``ld.global``: 16-bit tile
    data loaded one element at a time, unless the source line loads a mask, whose bytes are loaded
    in pairs) with ``scalar_16bit_lines`` (``file:line`` of those). ``source_file``: the kernel's
    source, read in place of a ``.file`` of the same name (a cached PTX may name the path of another
    checkout that compiled the same source)."""
    files = {m.group(1): m.group(2) for m in map(_FILE.match, ptx.splitlines()) if m}  # at the end
    if source_file is not None:
        files = {k: source_file if Path(v).name == Path(source_file).name else v for k, v in files.items()}
    where = None
    profile = {"cp_async_16": 0, "cp_async_small": 0, "vector_loads": 0, "scalar_16bit": 0}
    lines: set[str] = set()
    for line in ptx.splitlines():
        if match := _LOC.match(line):
            where = (files.get(match.group(1), "?"), int(match.group(2)))
        elif match := _CP_ASYNC.search(line):
            profile["cp_async_16" if int(match.group(1), 0) == 16 else "cp_async_small"] += 1
        elif match := _LD_GLOBAL.search(line):
            suffixes = match.group(1).split(".")
            if any(s in ("v2", "v4", "v8") for s in suffixes):
                profile["vector_loads"] += 1
            elif any(s in ("b16", "u16", "s16", "f16", "bf16") for s in suffixes):
                source = linecache.getline(where[0], where[1]) if where else ""
                if "mask_ptr" not in source:
                    profile["scalar_16bit"] += 1
                    lines.add(f"{Path(where[0]).name}:{where[1]}" if where else "?")
    profile["scalar_16bit_lines"] = sorted(lines)
    return profile


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
    from loraprune.ops.masked_lora_linear import DEFAULT_FAST_PATHS, FAST_PATHS, masked_lora_linear_plan

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
        # lora_k_steps): each is compiled and reported until a GPU run has compared them. Masks
        # applied in place (a layer on a GPU with masks it does not know to be masked) as well.
        all_paths = frozenset(FAST_PATHS)
        default = frozenset(DEFAULT_FAST_PATHS)
        mask_paths = frozenset({"mask_cache", "k_tiles", "dropout_bits"})
        in_place = masked_lora_linear_plan(out_mask, in_mask, k_tiles=False, gather_out=False)
        for masks, dropout_p, tokens, paths, plan in (
            ((None, None), 0.0, rows, frozenset(), None),
            ((out_mask, in_mask), 0.1, rows, frozenset(), None),
            ((out_mask, in_mask), 0.1, rows, all_paths, None),
            ((None, None), 0.0, 16, all_paths, None),
            ((out_mask, in_mask), 0.0, 16, all_paths, None),
            ((out_mask, in_mask), 0.1, rows, default, in_place),
            ((out_mask, in_mask), 0.0, 16, default, in_place),
            ((None, None), 0.0, rows, frozenset({"lora_k_steps"}), None),
            ((out_mask, in_mask), 0.0, rows, mask_paths | {"lora_k_steps"}, None),
            ((None, None), 0.0, rows, frozenset({"persistent"}), None),
            ((None, None), 0.0, rows, frozenset({"tma"}), None),
            ((None, None), 0.0, rows, all_paths, None),
        ):
            x = torch.randn(tokens, in_features, generator=gen).to(dtype).requires_grad_()
            lora_a, lora_b = (f.clone().requires_grad_() for f in factors)
            args = (x, weight, None, lora_a, lora_b, 2.0, *masks, dropout_p)
            y = masked_lora_linear.masked_lora_linear(
                *args, training=dropout_p > 0, plan=plan, fast_paths=paths
            )
            y.backward(torch.ones_like(y))
        # The split-K decode on a K-heavy layer (few output tiles, K >= 2·DECODE_SPLIT_MIN_K: it
        # splits on the CPU tensors here as on a GPU), without and with masks.
        split_in = 4 * in_features
        split_weight = torch.randn(out_features // 4, split_in, generator=gen).to(dtype)
        split_a = torch.randn(rank, split_in, generator=gen)
        split_b = torch.randn(out_features // 4, rank, generator=gen)
        assert masked_lora_linear.decode_splits(*split_weight.shape, split_weight.device) > 1
        split_masks = (out_mask[: out_features // 4], torch.rand(split_in, generator=gen) > 0.5)
        for masks, plan in (
            ((None, None), None),
            (split_masks, None),
            (split_masks, masked_lora_linear_plan(*split_masks, k_tiles=False, gather_out=False)),
        ):
            x = torch.randn(16, split_in, generator=gen).to(dtype)
            masked_lora_linear.masked_lora_linear(
                x, split_weight, None, split_a, split_b, 2.0, *masks, 0.0, False, plan=plan,
                fast_paths=frozenset({"decode_split_k"}),
            )  # fmt: skip
        if rank == ranks[0] and dtype == dtypes[0]:  # the mask plan cache's refresh: one variant
            masked_lora_linear.CachedMaskPlan(out_features, out_mask.device).refresh(out_mask)
    for widths in ((128, 128, 128, 128), (1, 1, 1)):
        num_units = 32
        parts = [torch.rand(num_units * width, generator=gen) for width in widths]
        counters = torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64)
        score_update.score_update(torch.zeros(num_units), parts, 0.9, *counters)
    drive_packed_importance(dtypes, ranks, shapes)


def drive_load_check(ranks: list[int], compiled: list) -> dict[int, int]:
    """The masked LoRA linear on the default fast paths, forward and backward, bf16, at each rank,
    at sizes divisible by 16 (LLaMA's): unmasked, output-masked with dropout (gathered, keep bits
    stored), input-masked with dropout (kept K tiles), both masks applied in place (as a layer on a
    GPU does with masks it does not know to be masked), decode with masks; then lora_k_steps (off
    by default; at rank 8 it had lost its vectorised, pipelined loads: issue #28) without and with
    masks. One tuning config per kernel: the first GPU config (the GEMM's 128×128×64). Returns the
    rank of each launch in ``compiled`` by index."""
    from loraprune.kernels import masked_lora_linear as kernels
    from loraprune.ops.masked_lora_linear import DEFAULT_FAST_PATHS, masked_lora_linear_plan

    for tuned in (
        kernels._lora_down_kernel,
        kernels._masked_lora_gemm_kernel,
        kernels._lora_grad_kernel,
        kernels._decode_kernel,
    ):
        tuned.configs = tuned.configs[:1]
    default = frozenset(DEFAULT_FAST_PATHS)
    k_steps = default | {"lora_k_steps"}
    gen = torch.Generator().manual_seed(0)
    rows, out_features, in_features = 256, 320, 256
    dtype = torch.bfloat16
    weight = torch.randn(out_features, in_features, generator=gen).to(dtype)
    out_mask = torch.rand(out_features, generator=gen) > 0.5
    in_mask = torch.rand(in_features, generator=gen) > 0.5
    in_place = masked_lora_linear_plan(out_mask, in_mask, k_tiles=False, gather_out=False)
    rank_of: dict[int, int] = {}
    for rank in ranks:
        factors = [
            torch.randn(rank, in_features, generator=gen),
            torch.randn(out_features, rank, generator=gen),
        ]
        for masks, plan, dropout_p, tokens, paths in (
            ((None, None), None, 0.0, rows, default),
            ((out_mask, None), None, 0.1, rows, default),
            ((None, in_mask), None, 0.1, rows, default),
            ((out_mask, in_mask), in_place, 0.0, rows, default),
            ((out_mask, in_mask), in_place, 0.0, 16, default),
            ((out_mask, in_mask), None, 0.0, 16, default),
            ((None, None), None, 0.0, rows, k_steps),
            ((out_mask, in_mask), None, 0.0, rows, k_steps),
        ):
            x = torch.randn(tokens, in_features, generator=gen).to(dtype).requires_grad_()
            lora_a, lora_b = (f.clone().requires_grad_() for f in factors)
            y = kernels.masked_lora_linear(
                x, weight, None, lora_a, lora_b, 2.0, *masks, dropout_p, dropout_p > 0, plan=plan, fast_paths=paths
            )  # fmt: skip
            y.backward(torch.ones_like(y))
        rank_of.update(dict.fromkeys(range(len(rank_of), len(compiled)), rank))
    return rank_of


def load_check(compiled: list, rank_of: dict[int, int], arch: int) -> int:
    """Print each compiled kernel's load profile (:func:`load_profile`), one line per distinct
    compiled kernel and rank; return how many have no 16-byte cp.async or scalar 16-bit tile loads."""
    failures = 0
    seen = set()
    print(f"triton {triton.__version__}, sm_{arch}: load check of {len(compiled)} launches")
    for index, (name, kernel) in enumerate(compiled):
        if (kernel.hash, rank_of[index]) in seen:
            continue
        seen.add((kernel.hash, rank_of[index]))
        meta = meta_parameters(kernel)
        profile = load_profile(kernel.asm["ptx"], kernel.src.fn.fn.__code__.co_filename)
        bad = profile["cp_async_16"] == 0 or profile["scalar_16bit"] > 0
        failures += bad
        scalar_at = f" at {', '.join(profile['scalar_16bit_lines'])}" if profile["scalar_16bit"] else ""
        print(f"{'FAIL' if bad else 'ok  '} r={rank_of[index]} {name} {meta}: cp.async 16 B {profile['cp_async_16']}, "
              f"cp.async 4/8 B {profile['cp_async_small']}, ld.global.v* {profile['vector_loads']}, "
              f"scalar 16-bit tile loads {profile['scalar_16bit']}{scalar_at}")  # fmt: skip
    if failures:
        print(f"{failures} kernels on sm_{arch} load without 16-byte cp.async or with scalar 16-bit loads")
    return failures


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
    parser.add_argument(
        "--load-check",
        action="store_true",
        help="masked LoRA linear, default fast paths and lora_k_steps: vectorised, pipelined loads per rank",
    )
    parser.add_argument("--ranks", default="8,16,32,64", help="LoRA ranks of --load-check (comma list)")
    args = parser.parse_args(argv)

    compiled: list = []
    driver.set_active(CompileOnlyDriver(GPUTarget("cuda", args.arch, 32)))
    compile_instead_of_launch(compiled)
    if args.load_check:
        rank_of = drive_load_check([int(rank) for rank in args.ranks.split(",")], compiled)
        return 1 if load_check(compiled, rank_of, args.arch) else 0
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
