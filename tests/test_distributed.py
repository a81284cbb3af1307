"""Data parallel pruning on the CPU: torchrun with 2 processes (gloo) against one process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from loraprune import LoraPruneConfig
from loraprune.distributed import DistributedPruner, DistributedPruningRun, mask_fingerprint
from loraprune.run import PruningRun, RunConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
RUN = ["--ratio", "0.5", "--steps", "6", "--prune-every", "2", "--seq-len", "16", "--batch-size", "4"]
RUN += ["--lora-dropout", "0", "--save-every", "0", "--warmup", "0", "--cooldown", "0.2"]
# lora scores the all-reduced LoRA gradients, so two ranks equal one process with the same batch; fused taylor
# equals one process whose micro-batches are the ranks' batches (test_every_criterion_... below).
RUN += ["--criterion", "lora"]


def tiny_llama(vocab: int = 8192) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_llama_dir):
    directory = tmp_path_factory.mktemp("tiny-llama-random")
    tiny_llama().save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_llama_dir / name, directory / name)
    return directory


def prune(model_dir: Path, data: Path, out: Path, processes: int, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "loraprune.cli", "prune", str(model_dir), "--data", str(data)]
    command += ["--out", str(out), *RUN, "--overwrite", *extra]
    if processes > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]
        command = [*launcher, str(processes), *command[1:]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def runs(model_dir, calib_text, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    single = prune(model_dir, calib_text, root / "single", 1, "--quiet")
    parallel = prune(model_dir, calib_text, root / "parallel", 2)
    return {"root": root, "single": single, "parallel": parallel}


def assert_same_model(first: Path, second: Path) -> None:
    one, two = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(one[key], two[key], atol=1e-5, rtol=1e-4, msg=key)
    plans = [json.loads((d / "config.json").read_text())["pruned_layers"] for d in (first, second)]
    assert plans[0] == plans[1]


def test_two_processes_prune_the_model_one_process_prunes(runs):
    root = runs["root"]
    assert_same_model(root / "single", root / "parallel")
    reports = [json.loads((root / d / "prune_report.json").read_text()) for d in ("single", "parallel")]
    assert [r["processes"] for r in reports] == [1, 2]
    assert reports[1]["tokens_seen"] == reports[0]["tokens_seen"]
    assert reports[1]["final_loss"] == pytest.approx(reports[0]["final_loss"], rel=1e-5)
    # rank 0 alone shows progress and talks
    stderr = runs["parallel"].stderr
    assert stderr.count("pruned ") == 1 and stderr.count("prune:   0%") == 1, stderr[-2000:]


def test_two_processes_resume_to_the_same_model(runs, model_dir, calib_text):
    out = runs["root"] / "resumed"
    prune(model_dir, calib_text, out, 2, "--quiet", "--stop-after", "3")
    assert (out / "checkpoint.safetensors").is_file() and not (out / "model.safetensors").exists()
    prune(model_dir, calib_text, out, 2, "--quiet", "--resume")
    assert_same_model(runs["root"] / "parallel", out)


# Every criterion that runs under data parallel (taylor materialized is refused); act's squared form
# has its own scaling over ranks.
CRITERIA = {
    "lora": {"criterion": "lora"},
    "taylor": {"criterion": "taylor"},
    "act": {"criterion": "act"},
    "act-squared": {"criterion": "act", "squared": True},
    "magnitude": {"criterion": "magnitude"},
    "random": {"criterion": "random"},
    "reconstruction": {"criterion": "reconstruction"},  # input moments summed over ranks' tokens
    # distillation: each rank's teacher forward (outside DDP) on its own slice
    "lora-distill": {"criterion": "lora", "run": {"distill_weight": 0.5, "distill_temperature": 2.0}},
    # LoRAShear's parts: protection (rank 0's analysis on every rank), the fade (chosen units checked equal on
    # every rank), the recovery (rank 0's choice of source). Its 20 training windows (4 held out) give some
    # near-zero LoRA gradients whose rounding AdamW magnifies: without LoRAShear the same windows differ by
    # 3e-7 between one process's batch 4 and its 2 × 2 micro-batches, hence its own atol.
    "lora-lorashear": {
        "criterion": "lora",
        "run": {"protect_fraction": 0.1, "protect_by": "unit", "heldout_windows": 4, "fade_steps": 2},
        "recovery": {"recovery_stages": 1},
        "atol": 1e-6,
    },
}
CRITERIA_WINDOWS = torch.randint(0, 96, (24, 8), generator=torch.Generator().manual_seed(0))
RECOVERY_WINDOWS = torch.randint(0, 96, (12, 8), generator=torch.Generator().manual_seed(1))


def criterion_run(name: str, batch_size: int, grad_accum: int, run_class: type = PruningRun) -> dict:
    """Scores, masks and LoRA factors after 4 steps, pruned to 50% at steps 1 to 3 (no dropout)."""
    options = dict(CRITERIA[name])
    options.pop("atol", None)
    run_options = options.pop("run", {})
    recovery = options.pop("recovery", None)
    sources = None if recovery is None else {"other": RECOVERY_WINDOWS}
    run_options = {**run_options, **(recovery or {})}
    prune_config = LoraPruneConfig(ratio=0.5, layers=(0, 1, 2), lora_dropout=0.0, **options)
    run_config = RunConfig(
        steps=4, prune_every=1, batch_size=batch_size, grad_accum=grad_accum, seq_len=8, warmup=0.0,
        cooldown=0.25, save_every=0, **run_options,
    )  # fmt: skip
    run = run_class(
        tiny_llama(96), CRITERIA_WINDOWS, prune_config, run_config, progress=False, recovery_sources=sources
    )
    run.run()
    state = {f"scores.{i}": s.clone() for i, s in enumerate(run.pruner.tracker.scores)}
    state.update({f"keep.{i}": k.clone() for i, k in enumerate(run.pruner.keep)})
    state.update({f"lora.{i}": p.detach().clone() for i, p in enumerate(run.pruner.trainable_parameters())})
    return state


def _rank_worker(rank: int, world_size: int, store: str, results: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    outcome = {}
    try:
        windows = torch.randint(0, 96, (16, 8), generator=torch.Generator().manual_seed(0))
        config = LoraPruneConfig(ratio=0.5, layers=(0, 1, 2))
        try:
            DistributedPruningRun(
                tiny_llama(96), windows, config, RunConfig(steps=2, prune_every=1, batch_size=3)
            )
        except ValueError as exc:
            outcome["uneven batch"] = str(exc)
        pruner = DistributedPruner(tiny_llama(96), config)
        pruner.check_masks_agree()  # all kept on both ranks
        keep = torch.ones(pruner.groups[0].num_units, dtype=torch.bool)
        keep[rank] = False  # each rank masks a different unit
        pruner.set_group_mask(0, keep)
        try:
            pruner.check_masks_agree()
        except RuntimeError as exc:
            outcome["masks differ"] = str(exc)
        for name in CRITERIA:
            state = criterion_run(name, 4, 1, DistributedPruningRun)
            if rank == 0:
                torch.save(state, Path(results, f"{name}.pt"))
    finally:
        Path(results, f"{rank}.json").write_text(json.dumps(outcome))
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def spawned():
    """Two processes (gloo) started once: each one's outcomes, and rank 0's state per criterion."""
    with tempfile.TemporaryDirectory() as directory:
        mp.spawn(_rank_worker, args=(2, os.path.join(directory, "store"), directory), nprocs=2)
        outcomes = [json.loads(Path(directory, f"{r}.json").read_text()) for r in range(2)]
        states = {name: torch.load(Path(directory, f"{name}.pt")) for name in CRITERIA}
    return {"outcomes": outcomes, "states": states}


def test_each_rank_fails_loudly_on_bad_input_and_diverged_masks(spawned):
    for outcome in spawned["outcomes"]:
        assert "batch_size (3)" in outcome["uneven batch"]
        assert "masks differ" in outcome["masks differ"]


def assert_same_run(one: dict, two: dict, atol: float = 1e-7) -> None:
    assert one.keys() == two.keys()
    for key in one:
        if key.startswith("keep."):
            assert torch.equal(one[key], two[key]), key
        else:
            torch.testing.assert_close(one[key], two[key], atol=atol, rtol=1e-5, msg=key)


@pytest.mark.parametrize("name", CRITERIA)
def test_every_criterion_under_two_processes_equals_one_process_with_their_micro_batches(spawned, name):
    """2 processes × batch 2 = one process with batch 2 and --grad-accum 2 (the README's guarantee);
    all but fused taylor also equal one process with batch 4 (it adds |·| over ranks, not Σ then |·|)."""
    state = spawned["states"][name]
    atol = CRITERIA[name].get("atol", 1e-7)
    assert_same_run(state, criterion_run(name, 2, 2), atol)
    assert all(0 < int(k.sum()) < len(k) for key, k in state.items() if key.startswith("keep."))
    for key in (k for k in state if k.startswith("scores.")):  # no tie for the masks to break
        scores = state[key]
        if name == "reconstruction":  # a masked unit costs 0: its columns are gone
            scores = scores[state[key.replace("scores.", "keep.")]]
        assert (scores.sort().values.diff() > 0).all(), key
    same_batch = criterion_run(name, 4, 1)
    if name == "taylor":
        assert not torch.allclose(state["scores.0"], same_batch["scores.0"], rtol=1e-3)
    else:
        assert_same_run(state, same_batch, atol)


def test_mask_fingerprint_tells_masks_apart():
    keep = [torch.tensor([True, False, True]), torch.ones(4, dtype=torch.bool)]
    flipped = [torch.tensor([True, True, False]), torch.ones(4, dtype=torch.bool)]
    assert mask_fingerprint(keep) == mask_fingerprint([k.clone() for k in keep])
    assert mask_fingerprint(keep) != mask_fingerprint(flipped)
