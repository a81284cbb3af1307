"""The pruning loop's parts: data windows and sampling, the schedule, checkpoints, Ctrl-C, perplexity."""

from __future__ import annotations

import math
import os
import signal

import pytest
import torch
from tiny_models import random_tokens, tiny_model

from loraprune import LoraPruneConfig
from loraprune.data import WindowSampler, read_text, windows
from loraprune.evaluate import lm_eval_tasks, perplexity
from loraprune.run import PruningRun, RunConfig


def test_read_text_file_directory_and_errors(tmp_path):
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "skip.md").write_text("not text")
    assert read_text(tmp_path) == "first\n\nsecond"
    assert read_text(tmp_path / "a.txt") == "first"
    with pytest.raises(FileNotFoundError, match="data"):
        read_text(tmp_path / "missing.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no \*\.txt"):
        read_text(tmp_path / "empty")


def test_windows_drop_the_tail_and_reject_short_text():
    tokens = torch.arange(10)
    assert windows(tokens, 3).tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    with pytest.raises(ValueError, match="too few"):
        windows(tokens, 11)


def test_sampler_is_a_function_of_seed_and_index_and_reshuffles_per_epoch():
    data = torch.arange(10).view(5, 2)
    sampler = WindowSampler(data, batch_size=2, seed=3)
    first_epoch = torch.cat([sampler.batch(i) for i in range(2)] + [sampler.batch(2)[:1]])
    assert sorted(first_epoch[:, 0].tolist()) == [0, 2, 4, 6, 8]  # every window once per epoch
    assert torch.equal(sampler.batch(7), WindowSampler(data, 2, 3).batch(7))
    orders = {tuple(WindowSampler(data, 5, 3).batch(e)[:, 0].tolist()) for e in range(4)}
    assert len(orders) > 1


def test_prune_steps_reach_the_target_at_the_cooldown():
    config = RunConfig(steps=100, prune_every=10)
    assert config.prune_steps() == [20, 30, 40, 50, 60, 70, 80, 90]
    assert RunConfig(steps=7, prune_every=2).prune_steps() == [2, 4, 6, 7]
    assert RunConfig(steps=5, prune_every=1, mode="oneshot").prune_steps() == []
    with pytest.raises(ValueError, match="prune_every"):
        RunConfig(steps=5, prune_every=10)


def make_run(tmp_path, steps=6, **prune):
    prune = {"layers": (0, 1, 2), "lora_dropout": 0.0, "ratio": 0.5, **prune}
    data = random_tokens(batch=16, length=10, seed=7)
    return PruningRun(
        tiny_model(),
        data,
        LoraPruneConfig(**prune),
        RunConfig(steps=steps, batch_size=2, seq_len=10, prune_every=2, save_every=0),
        checkpoint=tmp_path / "ckpt.safetensors",
        progress=False,
    )


def test_run_reaches_the_exact_target_and_stops_scoring(tmp_path):
    run = make_run(tmp_path)
    summary = run.run()
    assert summary.finished and summary.steps_done == 6 and math.isfinite(summary.final_loss)
    assert [s.kept for s in run.pruner.status()] == [2, 20] * 3
    assert not run.scoring


def test_the_refit_is_decided_per_model_and_data_by_default_and_distillation_is_off():
    data = random_tokens(batch=16, length=10, seed=7)
    config = RunConfig(steps=4, batch_size=2, seq_len=10, prune_every=2)
    run = PruningRun(tiny_model(), data, LoraPruneConfig(), config, progress=False)
    resolved = run.run_config
    assert (resolved.distill_weight, resolved.distill_temperature) == (0.0, None) and run.distiller is None
    assert (resolved.reconstruct, resolved.reconstruct_lambda) == (True, 0.01)
    assert resolved.reconstruct_samples == 16 and len(run.refit_windows) == 16  # all the data holds (< 64)
    assert run.notes == [] and config.reconstruct is None  # the caller's config is left as it was

    # a model placed over several devices: the refit stays off, and asking for it is an error
    def placed_model():
        model = tiny_model()
        model.hf_device_map = {"model.embed_tokens": "cpu", "model.layers": "cuda:0"}
        return model

    run = PruningRun(placed_model(), data, LoraPruneConfig(), config, progress=False)
    assert not run.run_config.reconstruct and run.refit_windows is None
    assert [n for n in run.notes if n.startswith("the refit is off: the refit of o_proj/down_proj is not")]
    for asked in (RunConfig(steps=20, reconstruct=True), RunConfig(steps=20, reconstruct_samples=8)):
        with pytest.raises(ValueError, match=r"^reconstruct: .* several devices"):
            PruningRun(placed_model(), data, LoraPruneConfig(), asked, progress=False)


def test_first_ctrl_c_finishes_the_step_and_checkpoints(tmp_path):
    handler = signal.getsignal(signal.SIGINT)  # SIG_IGN in a backgrounded shell, Python's default elsewhere
    run = make_run(tmp_path)
    original = run._train_step

    def step_with_interrupt():
        if run.step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # arrives in the middle of step 3
        original()

    run._train_step = step_with_interrupt
    with pytest.raises(KeyboardInterrupt, match="after step 3"):
        run.run()
    resumed = make_run(tmp_path)
    resumed.load_checkpoint()
    assert resumed.step == 3
    assert signal.getsignal(signal.SIGINT) is handler  # restored


def test_taylor_frees_weight_gradients_after_the_last_pruning_step(tmp_path):
    run = make_run(tmp_path, criterion="taylor", taylor_impl="materialized")
    q_proj = run.model.get_submodule("model.layers.0.self_attn.q_proj")
    assert q_proj.weight.requires_grad
    run.run()
    assert not q_proj.weight.requires_grad and q_proj.weight.grad is None


def test_fused_taylor_stops_its_backward_hooks_after_the_last_pruning_step(tmp_path):
    run = make_run(tmp_path, criterion="taylor")
    q_proj = run.model.get_submodule("model.layers.0.self_attn.q_proj")
    assert q_proj.score_capture is not None and not q_proj.weight.requires_grad
    run.run()
    assert q_proj.score_capture is None and q_proj.weight.grad is None


def test_perplexity_equals_exp_of_the_model_loss(tmp_path):
    model = tiny_model()

    class CharTokenizer:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) % 96 for c in text]}

    (tmp_path / "text.txt").write_text("some text to score with a tiny model " * 3)
    report = perplexity(
        model, CharTokenizer(), tmp_path / "text.txt", seq_len=16, batch_size=3, progress=False
    )
    tokens = windows(torch.tensor([ord(c) % 96 for c in (tmp_path / "text.txt").read_text()]), 16)
    with torch.no_grad():
        losses = [model(input_ids=w[None], labels=w[None]).loss for w in tokens]
    assert report.windows == len(tokens) and report.tokens == 15 * len(tokens)
    assert report.perplexity == pytest.approx(math.exp(sum(losses) / len(losses)), rel=1e-5)


def test_lm_eval_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "lm_eval", None)
    with pytest.raises(ImportError, match="lm_eval"):
        lm_eval_tasks(tiny_model(), None, ["hellaswag"])


def test_tokenizer_saved_by_a_newer_transformers_still_loads(tiny_llama_dir, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    import loraprune.io

    expected_tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    (tmp_path / "tokenizer.json").write_bytes((tiny_llama_dir / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(
        '{"tokenizer_class": "TokenizerOfTheFuture", "eos_token": "</s>"}'
    )

    def older_transformers(*args, **kwargs):  # what transformers 4.x says of a class it lacks
        raise ValueError("Tokenizer class TokenizerOfTheFuture does not exist or is not currently imported.")

    monkeypatch.setattr(loraprune.io.AutoTokenizer, "from_pretrained", older_transformers)
    tokenizer = loraprune.io.load_tokenizer(tmp_path)
    text = "Pruning keeps the heads that matter."
    expected = expected_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert (
        tokenizer(text, add_special_tokens=False)["input_ids"] == expected and tokenizer.eos_token == "</s>"
    )
    assert loraprune.io.load_tokenizer(tmp_path / "missing") is None


def test_oneshot_calibration_reads_the_first_calib_seq_len_tokens_of_each_window():
    # LLM-Pruner calibrates on short samples (10 of 128 tokens) while recovery trains on longer ones.
    data = random_tokens(batch=16, length=10, seed=7)

    def masks_after_calibration(windows: torch.Tensor, **run_config) -> list[torch.Tensor]:
        run = PruningRun(
            tiny_model(),
            windows,
            LoraPruneConfig(layers=(0, 1, 2), lora_dropout=0.0, ratio=0.5),
            RunConfig(
                steps=1, batch_size=2, seq_len=windows.shape[1], mode="oneshot", save_every=0, **run_config
            ),
            progress=False,
        )
        run.run(stop_after=1)
        return [keep.clone() for keep in run.pruner.keep]

    def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
        return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))

    short = masks_after_calibration(data, calib_batches=3, calib_seq_len=4)
    assert same(short, masks_after_calibration(data[:, :4], calib_batches=3))
    assert not same(short, masks_after_calibration(data, calib_batches=3))
    with pytest.raises(ValueError, match="calib_seq_len must be an integer from 2 to seq_len"):
        RunConfig(seq_len=10, calib_seq_len=11)
