"""PrunedLoRA: adapters start at rank r0 and lose rank components down to r while they train."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import requires_triton_interpreter
from tiny_models import random_tokens, randomize_lora, tiny_model

from loraprune import LoraPruneConfig, LoraPruner, ops
from loraprune.cli import main
from loraprune.config import CRITERIA
from loraprune.lora_rank import RankPruner, rank_schedule
from loraprune.nn import LoraPruneLinear, lora_modules
from loraprune.ops.lora_importance import lora_importance_reference
from loraprune.ops.masked_lora_linear import masked_lora_linear_reference
from loraprune.ops.taylor_importance import taylor_importance_reference
from loraprune.run import PruningRun, RunConfig


def windows(n: int = 48, length: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 96, (n, length), generator=torch.Generator().manual_seed(seed))


def make_run(model_name="llama-gqa-tied", checkpoint=None, criterion="lora", steps=12, **prune_options):
    options = {"ratio": 0.5, "criterion": criterion, "lora_r": 16, "lora_final_r": 5, "lora_dropout": 0.0}
    options.update(prune_options)
    return PruningRun(
        tiny_model(model_name),
        windows(),
        LoraPruneConfig(**options),
        RunConfig(steps=steps, batch_size=2, seq_len=12, prune_every=2, save_every=0),
        checkpoint=checkpoint,
        progress=False,
    )


# -- the schedule -------------------------------------------------------------------------------


def test_schedule_takes_the_papers_k1_k2_when_they_fit_and_finishes_by_the_cooldown():
    paper = rank_schedule(1000, 0.1, 0.1, 64, 8)
    assert (paper.every, paper.count) == (10, 2) and len(paper.steps) == 28
    assert paper.steps[0] == 110 and paper.steps[-1] == 380
    short = rank_schedule(20, 0.1, 0.1, 64, 8)  # 28 events of 10 steps do not fit in steps 2..18
    assert short.every == 1 and short.count == 4 and short.steps == tuple(range(3, 17))
    for steps, warmup, cooldown, r0, r in [
        (300, 0.1, 0.1, 64, 8),
        (7, 0.0, 0.2, 16, 1),
        (50, 0.3, 0.2, 33, 7),
    ]:
        schedule = rank_schedule(steps, warmup, cooldown, r0, r)
        end = math.ceil(steps - cooldown * steps)
        assert schedule.steps == tuple(sorted(set(schedule.steps)))
        assert warmup * steps < schedule.steps[0] and schedule.steps[-1] <= end
        # every event but the last removes `count`; the last one takes the rest (at most `count`)
        assert 0 < (r0 - r) - schedule.count * (len(schedule.steps) - 1) <= schedule.count
    # too slow for the window (steps 10..90): its end takes the rest
    given = rank_schedule(100, 0.1, 0.1, 16, 8, every=20, count=1)
    assert given.steps == (30, 50, 70, 90) and (given.every, given.count) == (20, 1)
    assert rank_schedule(20, 0.1, 0.1, 8, 8).steps == ()


# -- shapes, optimizer state, monotonicity ----------------------------------------------------------


def test_rank_really_shrinks_and_never_regrows_with_the_optimizer_state():
    run = make_run(steps=12)
    modules = lora_modules(run.model)
    history = []
    while run.step < 12:
        before = {p: m.lora_A.detach().clone() for p, m in modules.items()}
        kept_before = {p: k.clone() for p, k in run.pruner.rank.kept.items()}
        run.run(stop_after=1)
        ranks = run.pruner.rank.ranks()
        history.append(sorted(set(ranks.values())))
        for path, module in modules.items():
            r = ranks[path]
            assert module.r == r and module.lora_A.shape == (r, module.in_features)
            assert module.lora_B.shape == (module.out_features, r)
            state = run.optimizer.state[module.lora_A]
            assert state["exp_avg"].shape == state["exp_avg_sq"].shape == (r, module.in_features)
            assert run.optimizer.state[module.lora_B]["exp_avg_sq"].shape == (module.out_features, r)
            kept = run.pruner.rank.kept[path]
            assert set(kept.tolist()) <= set(kept_before[path].tolist())  # never reactivated
            assert len(kept) == r and torch.equal(kept, kept.sort().values)
            if r < len(kept_before[path]):  # what stayed is what was there (after one more AdamW step)
                positions = torch.searchsorted(kept_before[path], kept)
                assert not torch.equal(module.lora_A, before[path][positions])  # trained, yet...
                assert torch.allclose(module.lora_A, before[path][positions], atol=1e-2)  # ...the same rows
    assert all(len(h) == 1 for h in history)  # every adapter loses the same number each time
    schedule, expected, rank = run.rank_schedule, [], 16
    for step in range(1, 13):
        if step in schedule.steps:
            rank = 5 if step == schedule.steps[-1] else max(5, rank - schedule.count)
        expected.append(rank)
    assert [h[0] for h in history] == expected and expected[-1] == 5
    assert len(set(expected)) > 3 and schedule.steps[-1] <= 11  # several removals, done by the cool-down
    assert run.pruner.compact()(random_tokens()).logits.isfinite().all()


def test_the_lowest_scored_components_go_and_the_optimizer_state_follows_them():
    pruner = LoraPruner(tiny_model(), LoraPruneConfig(ratio=0.5, criterion="lora", lora_r=9, lora_final_r=3))
    randomize_lora(pruner.model)
    optimizer = torch.optim.AdamW(pruner.trainable_parameters(), lr=1e-3)
    tokens = random_tokens()
    pruner.model(input_ids=tokens, labels=tokens).loss.backward()
    pruner.update_rank_scores()
    optimizer.step()
    generator = torch.Generator().manual_seed(3)
    for scores in pruner.rank.scores.values():
        scores.copy_(torch.randperm(9, generator=generator).float())  # distinct, known scores
    expected = {p: s.argsort()[4:].sort().values for p, s in pruner.rank.scores.items()}
    modules = pruner.rank.modules
    old = {
        p: (
            m.lora_A.detach().clone(),
            m.lora_B.detach().clone(),
            optimizer.state[m.lora_A]["exp_avg"].clone(),
        )
        for p, m in modules.items()
    }
    old_scores = {p: s.clone() for p, s in pruner.rank.scores.items()}
    assert pruner.prune_rank(4, optimizer) == 4 * len(modules)
    for path, module in modules.items():
        keep = expected[path]
        assert torch.equal(pruner.rank.kept[path], keep)
        assert torch.equal(module.lora_A, old[path][0][keep])
        assert torch.equal(module.lora_B, old[path][1][:, keep])
        assert torch.equal(optimizer.state[module.lora_A]["exp_avg"], old[path][2][keep])
        assert torch.equal(pruner.rank.scores[path], old_scores[path][keep])
        assert old_scores[path][keep].min() > old_scores[path].sort().values[3]  # the 4 lowest are gone
    assert pruner.prune_rank(None, optimizer) == 2 * len(modules)  # down to the final rank
    assert set(pruner.rank.ranks().values()) == {3}
    assert pruner.prune_rank(None, optimizer) == 0  # never below it


def test_component_score_is_twice_the_first_order_loss_change_of_removing_it():
    pruner = LoraPruner(
        tiny_model(), LoraPruneConfig(criterion="lora", lora_r=6, lora_final_r=2, lora_dropout=0.0)
    )
    randomize_lora(pruner.model)
    module = pruner.model.get_submodule("model.layers.1.mlp.up_proj")
    tokens = random_tokens()

    def loss() -> float:
        return float(pruner.model(input_ids=tokens, labels=tokens).loss)

    pruner.model(input_ids=tokens, labels=tokens).loss.backward()
    score = RankPruner.component_importance(module)
    by_b = (module.lora_B.grad * module.lora_B).sum(0)
    by_a = (module.lora_A.grad * module.lora_A).sum(1)
    torch.testing.assert_close(by_a, by_b)  # both are s·B_kᵀ ∇W A_kᵀ
    eps = 1e-2
    with torch.no_grad():
        for k in range(6):  # d/dt L(component k scaled by t) at t = 1, by central differences
            row = module.lora_A[k].clone()
            module.lora_A[k] = row * (1 + eps)
            up = loss()
            module.lora_A[k] = row * (1 - eps)
            down = loss()
            module.lora_A[k] = row
            assert score[k].item() == pytest.approx(2 * abs(up - down) / (2 * eps), rel=2e-2, abs=1e-4)
    assert score.min() > 1e-3 and score.max() / score.min() > 2  # distinct, non-trivial components


@pytest.mark.parametrize("mode", ["rank", "fixed"])
def test_alpha_modes_scale_as_documented(mode):
    config = LoraPruneConfig(criterion="lora", lora_r=8, lora_alpha=16, lora_final_r=3, lora_alpha_mode=mode)
    pruner = LoraPruner(tiny_model(), config)
    randomize_lora(pruner.model)
    path = "model.layers.0.self_attn.q_proj"
    module = pruner.model.get_submodule(path)
    a, b = module.lora_A.detach().clone(), module.lora_B.detach().clone()
    tokens = random_tokens()
    pruner.model(input_ids=tokens, labels=tokens).loss.backward()
    pruner.update_rank_scores()
    pruner.prune_rank(3)
    keep = pruner.rank.kept[path]
    dropped = [k for k in range(8) if k not in keep.tolist()]
    assert module.r == 5 and len(dropped) == 3
    after = module.scaling * module.lora_B.detach() @ module.lora_A.detach()
    if mode == "rank":  # alpha = 16·5/8: the scaling stays 2, the adapter loses exactly the removed ones
        assert module.scaling == 2.0
        before = 2.0 * b @ a
        torch.testing.assert_close(before - after, 2.0 * b[:, dropped] @ a[dropped])
    else:  # alpha stays 16: the kept components are scaled up to 16/5
        assert module.scaling == pytest.approx(16 / 5)
        torch.testing.assert_close(after, 16 / 5 * b[:, keep] @ a[keep])
    pruner.prune_rank()
    assert module.scaling == pytest.approx(2.0 if mode == "rank" else 16 / 3)


# -- kernels at every rank the schedule passes through ----------------------------------------------


@requires_triton_interpreter
def test_triton_ops_agree_with_the_reference_at_every_rank_of_the_schedule():
    """16 → 8 in steps of 3 and the rest (16, 13, 10, 8; then every rank between, odd ones too)."""
    torch.manual_seed(0)
    weight = torch.randn(20, 24)
    module = LoraPruneLinear(weight, torch.randn(20), 16, 16.0)
    with torch.no_grad():
        module.lora_B.normal_()
    out_mask = torch.rand(20) > 0.3
    in_mask = torch.rand(24) > 0.3
    schedule = rank_schedule(16, 0.0, 0.25, 16, 8, every=3, count=3)
    ranks = [16]
    for _ in schedule.steps[:-1]:
        ranks.append(ranks[-1] - 3)
    ranks.append(8)
    ranks += [r for r in range(15, 7, -1) if r not in ranks]
    assert {13, 11, 9} <= set(ranks)
    for rank in sorted(set(ranks), reverse=True):
        if module.r > rank:
            keep = torch.randperm(module.r)[:rank].sort().values
            module.keep_rank_components(keep, 16.0 / rank)
        a, b = module.lora_A.detach(), module.lora_B.detach()
        assert a.shape == (rank, 24) and b.shape == (20, rank)
        x = torch.randn(3, 5, 24)
        outputs = []
        for backend in ("triton", "torch"):
            leaves = [t.clone().requires_grad_() for t in (x, a, b)]
            y = ops.masked_lora_linear(
                leaves[0],
                weight,
                module.bias,
                leaves[1],
                leaves[2],
                module.scaling,
                out_mask,
                in_mask,
                backend=backend,
            )
            y.backward(torch.linspace(-1, 1, y.numel()).view_as(y))
            outputs.append([y.detach(), *(t.grad for t in leaves)])
        for got, want in zip(*outputs, strict=True):
            torch.testing.assert_close(
                got, want, rtol=1e-4, atol=1e-4, msg=f"masked_lora_linear at rank {rank}"
            )
        reference_y = masked_lora_linear_reference(
            x, weight, module.bias, a, b, module.scaling, out_mask, in_mask
        )
        torch.testing.assert_close(outputs[1][0], reference_y)
        grad_a, grad_b = torch.randn_like(a), torch.randn_like(b)
        got = ops.lora_importance(weight, a, b, grad_a, grad_b, module.scaling, backend="triton")
        want = lora_importance_reference(weight, a, b, grad_a, grad_b, module.scaling)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4, msg=f"lora_importance at rank {rank}")
        xs, grad_y = torch.randn(7, 24), torch.randn(7, 20)
        got = ops.taylor_importance(xs, grad_y, weight, a, b, module.scaling, backend="triton")
        want = taylor_importance_reference(xs, grad_y, weight, a, b, module.scaling)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4, msg=f"taylor_importance at rank {rank}")


# -- resume, criteria, compaction, PEFT, quantized base ------------------------------------------------


def lora_state(run: PruningRun) -> dict[str, torch.Tensor]:
    state = {
        f"{p}.{n}": getattr(m, n)
        for p, m in lora_modules(run.model).items()
        if m.lora_A is not None
        for n in ("lora_A", "lora_B")
    }
    state.update({f"pruner.{k}": v for k, v in run.pruner.state_dict().items()})
    for index, param_state in run.optimizer.state_dict()["state"].items():
        state.update({f"optimizer.{index}.{k}": torch.as_tensor(v) for k, v in param_state.items()})
    return state


@pytest.mark.parametrize("stop_after", [4, 9], ids=["during-rank-schedule", "after-it"])
def test_resume_is_bit_identical(tmp_path, stop_after):
    full = make_run(steps=12, lora_dropout=0.05)
    full.run()
    checkpoint = tmp_path / "checkpoint.safetensors"
    first = make_run(steps=12, lora_dropout=0.05, checkpoint=checkpoint)
    first.run(stop_after=stop_after)
    assert checkpoint.is_file()
    resumed = make_run(steps=12, lora_dropout=0.05, checkpoint=checkpoint)
    resumed.load_checkpoint()
    assert resumed.pruner.rank.ranks() == first.pruner.rank.ranks()
    resumed.run()
    want, got = lora_state(full), lora_state(resumed)
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), key
    tokens = random_tokens()
    compact = [r.pruner.compact()(tokens).logits for r in (full, resumed)]
    assert torch.equal(*compact)


@pytest.mark.parametrize(
    ("criterion", "model_name"),
    [(c, "llama-gqa-tied") for c in CRITERIA]
    + [("lora", "llama-mha-untied"), ("taylor", "qwen2-gqa-bias-tied")],
)
def test_every_criterion_prunes_the_rank_and_compacts_at_the_final_rank(criterion, model_name):
    run = make_run(model_name, criterion=criterion, steps=8, lora_dropout=0.05)
    summary = run.run()
    assert set(run.pruner.rank.ranks().values()) == {5} and summary.finished
    assert run.rank_schedule.steps[-1] <= 8 and summary.peak_memory_after_rank_bytes > 0
    assert all(s.kept < s.total for s in run.pruner.status())
    tokens = random_tokens()
    run.model.eval()
    with torch.no_grad():
        masked = run.model(tokens).logits
        compacted = run.pruner.compact()(tokens).logits
    torch.testing.assert_close(compacted, masked, rtol=1e-4, atol=1e-4)


def test_peft_adapters_are_taken_over_at_their_rank():
    peft = pytest.importorskip("peft")
    from loraprune.config import ALL_PROJECTIONS

    def adapted():
        return peft.get_peft_model(
            tiny_model("llama-gqa-tied"),
            peft.LoraConfig(r=12, lora_alpha=24, lora_dropout=0.0, target_modules=list(ALL_PROJECTIONS)),
        )

    with pytest.raises(ValueError, match=r"lora_final_r \(14\) exceeds the rank of .*\(12\)"):
        LoraPruner(adapted(), LoraPruneConfig(criterion="lora", lora_r=16, lora_final_r=14))
    pruner = LoraPruner(adapted(), LoraPruneConfig(criterion="lora", lora_r=12, lora_final_r=4))
    optimizer = torch.optim.AdamW(pruner.trainable_parameters(), lr=1e-2)
    tokens = random_tokens()
    pruner.model.train()
    for step in range(3):
        pruner.model(input_ids=tokens, labels=tokens).loss.backward()
        pruner.update_scores()
        pruner.update_rank_scores()
        optimizer.step()
        pruner.model.zero_grad()
        pruner.prune_rank(None if step == 2 else 3, optimizer)
        pruner.prune(0.25 * (step + 1))
    modules = pruner.rank.modules.values()
    assert {m.r for m in modules} == {4} and {m.scaling for m in modules} == {2.0}
    assert {tuple(optimizer.state[m.lora_B]["exp_avg"].shape) for m in modules} >= {(48, 4)}
    assert pruner.compact()(tokens).logits.isfinite().all()


def test_quantized_base_prunes_the_rank():
    pytest.importorskip("bitsandbytes")
    run = make_run(steps=6, quantize_base="int8")
    run.run()
    assert set(run.pruner.rank.ranks().values()) == {5}
    assert run.pruner.compact()(random_tokens()).logits.isfinite().all()


# -- command line ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_paths(tiny_llama_dir, calib_text):
    return [str(tiny_llama_dir), "--data", str(calib_text)]


CLI_RUN = ["--ratio", "0.5", "--steps", "6", "--prune-every", "2", "--seq-len", "32", "--batch-size", "2"]


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--lora-r", "8", "--lora-final-r", "16"], "--lora-final-r"),
        (["--lora-final-r", "0"], "--lora-final-r"),
        (["--lora-final-r", "-2"], "--lora-final-r"),
        (["--lora-final-r", "4", "--lora-alpha-mode", "linear"], "--lora-alpha-mode"),
        (["--rank-prune-every", "3"], "--rank-prune-every"),
        (["--lora-alpha-mode", "fixed"], "--lora-alpha-mode"),
        (["--lora-final-r", "4", "--rank-prune-count", "0"], "--rank-prune-count"),
    ],
)
def test_cli_errors_name_the_argument_exit_2_and_write_nothing(cli_paths, tmp_path, capsys, flags, named):
    out = tmp_path / "out"
    assert main(["prune", *cli_paths, "--out", str(out), *CLI_RUN, *flags]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and named in error, error
    assert not out.exists()


def test_cli_prunes_the_rank_and_reports_it(cli_paths, tmp_path):
    out = tmp_path / "out"
    flags = ["--lora-r", "12", "--lora-final-r", "3", "--lora-alpha-mode", "fixed", "--quiet"]
    assert main(["prune", *cli_paths, "--out", str(out), *CLI_RUN, "--criterion", "lora", *flags]) == 0
    report = json.loads((out / "prune_report.json").read_text())
    rank = report["lora_rank"]
    assert set(rank["ranks"].values()) == {3} and len(rank["ranks"]) == 6 * 7
    assert rank["alpha_mode"] == "fixed" and rank["schedule"]["initial_r"] == 12
    assert rank["schedule"]["final_r"] == 3 and rank["schedule"]["steps"][-1] <= 6
    assert report["prune_config"]["lora_final_r"] == 3 and rank["peak_memory_after_rank_bytes"] > 0


# -- data parallel ---------------------------------------------------------------------------------


def test_two_processes_prune_the_rank_as_one_process_does(tiny_llama_dir, calib_text, tmp_path):
    """torchrun, 2 CPU processes (gloo): the rank scores come from DDP's all-reduced gradients, DDP is
    rebuilt around the narrowed factors, and the result equals one process's, also after --resume."""
    import shutil

    from test_distributed import assert_same_model, prune, tiny_llama

    model_dir = tmp_path / "model"
    tiny_llama().save_pretrained(model_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_llama_dir / name, model_dir / name)
    flags = ("--quiet", "--lora-r", "8", "--lora-final-r", "3")
    prune(model_dir, calib_text, tmp_path / "single", 1, *flags)
    prune(model_dir, calib_text, tmp_path / "parallel", 2, *flags)
    assert_same_model(tmp_path / "single", tmp_path / "parallel")
    reports = [json.loads((tmp_path / d / "prune_report.json").read_text()) for d in ("single", "parallel")]
    assert reports[0]["lora_rank"]["ranks"] == reports[1]["lora_rank"]["ranks"]
    assert set(reports[1]["lora_rank"]["ranks"].values()) == {3} and reports[1]["processes"] == 2
    resumed = tmp_path / "resumed"
    prune(model_dir, calib_text, resumed, 2, *flags, "--stop-after", "2")  # inside the rank schedule
    prune(model_dir, calib_text, resumed, 2, *flags, "--resume")
    assert_same_model(tmp_path / "parallel", resumed)


def test_resume_checks_the_rank_settings_and_takes_checkpoints_from_before_them(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    checkpoint = tmp_path / "checkpoint.safetensors"
    make_run(steps=12, checkpoint=checkpoint).run(stop_after=3)
    other = make_run(steps=12, checkpoint=checkpoint, lora_final_r=4)
    with pytest.raises(ValueError, match=r"lora_final_r: 5 then, 4 now"):
        other.load_checkpoint()
    # a checkpoint written before these settings existed (no rank pruning) resumes at their defaults
    plain = tmp_path / "plain.safetensors"
    make_run(steps=12, checkpoint=plain, lora_final_r=None).run(stop_after=3)
    with safe_open(str(plain), framework="pt") as handle:
        metadata = json.loads(handle.metadata()["loraprune"])
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    for key in ("lora_final_r", "lora_alpha_mode", "rank_prune_every", "rank_prune_count"):
        del metadata["settings"]["prune_config"][key]
    save_file(tensors, str(plain), metadata={"loraprune": json.dumps(metadata)})
    resumed = make_run(steps=12, checkpoint=plain, lora_final_r=None)
    resumed.load_checkpoint()
    assert resumed.step == 3 and resumed.pruner.rank is None
