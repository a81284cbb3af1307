"""LoraPruneCallback: pruning inside a transformers Trainer (and TRL's SFTTrainer) equals PruningRun.

tiny-llama (plain and PEFT) for the comparisons with PruningRun and the resumes, a tiny random model
for the rest: the same batches, seed, constant learning rate and gradient clipping as PruningRun, no
dropout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import shared_path
from tiny_models import random_tokens, tiny_model
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

import loraprune  # noqa: F401 (registers the pruned classes with the Auto classes)
from loraprune import LoraPruneConfig
from loraprune.data import WindowSampler
from loraprune.integrations.trainer import STATE_FILE, LoraPruneCallback
from loraprune.run import PruningRun, RunConfig

STEPS, BATCH, SEQ, LR, CLIP = 6, 2, 10, 1e-3, 0.5  # the gradient norms are ~4: clipping is active
SCHEDULE = {"prune_every": 2, "warmup": 0.0, "cooldown": 0.2}  # masks grow after steps 2, 4 and 5
PRUNE = {"ratio": 0.5, "layers": (0, 1, 2), "lora_dropout": 0.0}
DATA = random_tokens(batch=24, length=SEQ, seed=7)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices: one thread is fastest, and several contend badly on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_llama() -> LlamaForCausalLM:
    return AutoModelForCausalLM.from_pretrained(shared_path("fixtures", "tiny-llama"), dtype=torch.float32)


def tiny_llama_peft():
    """tiny-llama wrapped by get_peft_model (LoRA on three of its seven projections)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)  # PEFT initialises A from the global generator
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "up_proj"])
    return get_peft_model(tiny_llama(), config)


def pruning_run(model, prune: LoraPruneConfig, grad_accum: int = 1) -> PruningRun:
    run_config = RunConfig(
        steps=STEPS,
        batch_size=BATCH,
        grad_accum=grad_accum,
        seq_len=SEQ,
        lr=LR,
        max_grad_norm=CLIP,
        reconstruct=False,  # PruningRun's own refit, which the callback does not have
        **SCHEDULE,
    )
    run = PruningRun(model, DATA, prune, run_config, progress=False)
    run.run()
    return run


def training_args(output_dir, grad_accum: int = 1, **options) -> TrainingArguments:
    settings = {
        "max_steps": STEPS,
        "per_device_train_batch_size": BATCH,
        "gradient_accumulation_steps": grad_accum,
        "learning_rate": LR,
        "lr_scheduler_type": "constant",
        "weight_decay": 0.0,
        "max_grad_norm": CLIP,
        "optim": "adamw_torch",
        "train_sampling_strategy": "sequential",
        "use_cpu": True,
        "report_to": "none",
        "save_strategy": "no",
        "logging_steps": 2,
        "disable_tqdm": True,
        **options,
    }
    return TrainingArguments(str(output_dir), **settings)


def run_batches(grad_accum: int = 1) -> list[dict]:
    """PruningRun's micro-batches, in its order, as the Trainer's (sequential) dataset."""
    sampler = WindowSampler(DATA, BATCH, seed=0)
    rows = torch.cat([sampler.batch(i) for i in range(STEPS * grad_accum)])
    return [{"input_ids": row, "labels": row} for row in rows]


def trainer(model, callback, output_dir, grad_accum: int = 1, **options) -> Trainer:
    args = training_args(output_dir, grad_accum, **options)
    return Trainer(model=model, args=args, train_dataset=run_batches(grad_accum), callbacks=[callback])


def outcome(pruner) -> dict[str, list[torch.Tensor]]:
    """Masks, moving averages, LoRA factors, and the compacted model's logits (compacts in place)."""
    state = {
        "keep": [k.clone() for k in pruner.keep],
        "scores": [s.clone() for s in pruner.tracker.scores],
        "lora": [p.detach().clone() for p in pruner.trainable_parameters()],
    }
    with torch.no_grad():
        state["logits"] = [pruner.compact().eval()(DATA[:2]).logits]
    return state


def assert_same_outcome(ours: dict, theirs: dict, tolerance: float = 0.0) -> None:
    for ours_keep, theirs_keep in zip(ours["keep"], theirs["keep"], strict=True):
        assert torch.equal(ours_keep, theirs_keep)
    for key in ("scores", "lora"):
        for one, two in zip(ours[key], theirs[key], strict=True):
            torch.testing.assert_close(one, two, rtol=tolerance, atol=tolerance, msg=key)
    logits_tolerance = 1e-4 if tolerance else 0.0  # the bound against PruningRun; a resume is bit-exact
    assert (ours["logits"][0] - theirs["logits"][0]).abs().max() <= logits_tolerance


MODELS = {"tiny-llama": tiny_llama, "tiny-llama-peft": tiny_llama_peft, "random": tiny_model}
# (model, criterion, grad_accum, gradient checkpointing); lora reads the gradients that the Trainer
# would have clipped before its pre-optimizer-step hook.
CASES = {
    "tiny-llama-lora": ("tiny-llama", "lora", 1, False),
    "tiny-llama-peft-lora": ("tiny-llama-peft", "lora", 1, False),
    "random-taylor-accum-checkpointing": ("random", "taylor", 2, True),
    "random-act-accum-checkpointing": ("random", "act", 2, True),
}


def train_case(case: str, output_dir) -> tuple[dict, list[dict], list]:
    """An uninterrupted Trainer run: its outcome, log history and final mask status."""
    kind, criterion, grad_accum, checkpointing = CASES[case]
    model = MODELS[kind]()
    callback = LoraPruneCallback(model, LoraPruneConfig(criterion=criterion, **PRUNE), **SCHEDULE)
    hf_trainer = trainer(model, callback, output_dir, grad_accum, gradient_checkpointing=checkpointing)
    hf_trainer.train()
    assert hf_trainer.args.max_grad_norm == CLIP  # the callback clipped in its place, then gave it back
    status = callback.pruner.status()
    assert all(2 * s.kept == s.total for s in status)  # the target, 50%
    # a PEFT adapter is taken over at its own rank (4), a projection without one gets lora_r (8)
    rank = callback.pruner.model.get_submodule("model.layers.0.self_attn.q_proj").r
    assert rank == (4 if kind.endswith("peft") else 8)
    return outcome(callback.pruner), hf_trainer.state.log_history, status


@pytest.fixture(scope="module")
def trained_case(tmp_path_factory):
    """Each case's uninterrupted run, made once for the tests that need it."""
    results = {}

    def get(case: str) -> tuple[dict, list[dict], list]:
        if case not in results:
            results[case] = train_case(case, tmp_path_factory.mktemp(case))
        return results[case]

    return get


@pytest.mark.parametrize("case", CASES)
def test_trainer_prunes_as_pruning_run(trained_case, case):
    kind, criterion, grad_accum, _ = CASES[case]
    run = pruning_run(MODELS[kind](), LoraPruneConfig(criterion=criterion, **PRUNE), grad_accum)
    ours = trained_case(case)[0]
    assert_same_outcome(ours, outcome(run.pruner), tolerance=1e-5)


def test_the_trainer_logs_the_ratio_and_the_masked_units(trained_case):
    _, history, status = trained_case("tiny-llama-lora")
    logged = [entry for entry in history if "prune_ratio" in entry]
    assert [entry["step"] for entry in logged[:3]] == [2, 4, 6]
    assert 0 < logged[0]["prune_ratio"] < logged[1]["prune_ratio"] < logged[2]["prune_ratio"] == 0.5
    for kind in ("attention", "mlp"):
        masked = sum(s.total - s.kept for s in status if s.kind == kind)
        assert 0 < logged[0][f"masked_{kind}_units"] < masked == logged[2][f"masked_{kind}_units"]


class Crash(RuntimeError):
    """A training process dying after a step."""


def crash_after(step: int):
    from transformers import TrainerCallback

    class CrashAfter(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == step:
                raise Crash(f"interrupted after step {step}")

    return CrashAfter()


@pytest.mark.parametrize("kind", ["tiny-llama", "tiny-llama-peft"])
def test_resuming_from_a_checkpoint_gives_the_uninterrupted_model(trained_case, tmp_path, kind):
    prune = LoraPruneConfig(criterion="lora", **PRUNE)
    model = MODELS[kind]()
    first = trainer(
        model, LoraPruneCallback(model, prune, **SCHEDULE), tmp_path, save_strategy="steps", save_steps=3
    )
    first.add_callback(crash_after(4))
    with pytest.raises(Crash):
        first.train()
    # after step 3: masks at step 2's ratio, moving averages and LoRA factors mid-way
    assert (tmp_path / "checkpoint-3" / STATE_FILE).is_file()

    model = MODELS[kind]()
    resumed = LoraPruneCallback(model, prune, **SCHEDULE)
    trainer(model, resumed, tmp_path, save_strategy="steps", save_steps=3).train(resume_from_checkpoint=True)
    assert resumed.steps_done == STEPS
    assert_same_outcome(outcome(resumed.pruner), trained_case(f"{kind}-lora")[0])


def test_resume_without_the_callbacks_state_is_refused(tmp_path):
    prune = LoraPruneConfig(**PRUNE)
    model = tiny_model()
    first = trainer(
        model, LoraPruneCallback(model, prune, **SCHEDULE), tmp_path, save_strategy="steps", save_steps=1
    )
    first.add_callback(crash_after(2))
    with pytest.raises(Crash):
        first.train()
    (tmp_path / "checkpoint-1" / STATE_FILE).unlink()
    model = tiny_model()
    again = trainer(
        model, LoraPruneCallback(model, prune, **SCHEDULE), tmp_path, save_strategy="steps", save_steps=1
    )
    with pytest.raises(FileNotFoundError, match=f"resumes at step 1, but no {STATE_FILE}"):
        again.train(resume_from_checkpoint=True)


def test_sft_trainer_prunes_to_the_target_and_the_result_loads(tmp_path, tiny_llama_dir):
    trl = pytest.importorskip("trl")
    from datasets import load_dataset
    from transformers import AutoTokenizer

    data_file = tmp_path / "chat.jsonl"
    with data_file.open("w") as handle:
        for i in range(16):
            messages = [
                {"role": "user", "content": f"What is {i} plus {i}?"},
                {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."},
            ]
            handle.write(json.dumps({"messages": messages}) + "\n")
    dataset = load_dataset("json", data_files=str(data_file), split="train")
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tokenizer.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    out = tmp_path / "pruned"
    callback = LoraPruneCallback(
        model, LoraPruneConfig(ratio=0.5, layers=(0, 1, 2), lora_dropout=0.0), **SCHEDULE, output_dir=out
    )
    args = trl.SFTConfig(
        str(tmp_path / "sft"),
        max_steps=STEPS,
        per_device_train_batch_size=4,
        max_length=64,
        learning_rate=LR,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
    )
    trl.SFTTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=[callback]
    ).train()
    loaded = AutoModelForCausalLM.from_pretrained(out)
    plan = loaded.config.pruned_layers
    assert [layer["num_key_value_heads"] for layer in plan] == [1, 1, 1]  # 2 KV groups -> 1
    assert [layer["intermediate_size"] for layer in plan] == [24, 24, 24]
    assert AutoTokenizer.from_pretrained(out).chat_template == tokenizer.chat_template
    # the model the SFTTrainer holds was compacted in place (the bf16 autocast of TRL's default
    # precision still wraps its forward, so weights are compared rather than logits)
    assert type(model).__name__ == "PrunedLlamaForCausalLM"
    assert callback.compact() is model  # compacted once, at the end of training
    ours = model.state_dict()
    assert loaded.state_dict().keys() == ours.keys()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, ours[key]), key


# -- wrong use ---------------------------------------------------------------------------------
def test_a_callback_built_for_another_model_is_refused(tmp_path):
    callback = LoraPruneCallback(tiny_model(), LoraPruneConfig(**PRUNE))
    with pytest.raises(ValueError, match="built for another model than the Trainer's"):
        trainer(tiny_model(), callback, tmp_path)


def test_models_and_settings_it_cannot_prune_are_refused():
    with pytest.raises(ValueError, match="no decoder layer to prune"):
        LoraPruneCallback(tiny_model(layers=1), LoraPruneConfig())  # the default skips the last layer
    with pytest.raises(ValueError, match=r"ratio must be in \[0, 1\), got 1.0"):
        LoraPruneCallback(tiny_model(), LoraPruneConfig(ratio=1.0))
    with pytest.raises(TypeError, match="config must be a LoraPruneConfig"):
        LoraPruneCallback(tiny_model(), {"ratio": 0.5})
    with pytest.raises(ValueError, match="warmup and cooldown"):
        LoraPruneCallback(tiny_model(), LoraPruneConfig(**PRUNE), warmup=0.6, cooldown=0.5)
    with pytest.raises(ValueError, match="taylor_impl 'materialized'"):
        LoraPruneCallback(
            tiny_model(), LoraPruneConfig(criterion="taylor", taylor_impl="materialized", **PRUNE)
        )


def test_an_optimizer_made_before_the_patch_and_a_late_callback_are_refused(tmp_path):
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters())
    callback = LoraPruneCallback(model, LoraPruneConfig(**PRUNE), **SCHEDULE)
    with pytest.raises(ValueError, match="optimizer you passed"):
        Trainer(model=model, args=training_args(tmp_path), callbacks=[callback], optimizers=(optimizer, None))
    model = tiny_model()
    late = Trainer(model=model, args=training_args(tmp_path), train_dataset=run_batches())
    late.add_callback(LoraPruneCallback(model, LoraPruneConfig(**PRUNE), **SCHEDULE))
    with pytest.raises(RuntimeError, match="missed the Trainer's construction"):
        late.train()


@pytest.mark.parametrize("engine", ["FSDP", "DeepSpeed"])
def test_sharded_training_is_refused(tmp_path, monkeypatch, engine):
    """FSDP and DeepSpeed need several processes (and DeepSpeed a package): the Trainer is built
    without, then handed what ``accelerate launch`` with an FSDP config (its environment) or a
    DeepSpeed config (``args.deepspeed``) gives it, and the callback's check runs."""
    model = tiny_model()
    callback = LoraPruneCallback(model, LoraPruneConfig(**PRUNE), **SCHEDULE)
    hf_trainer = Trainer(model=model, args=training_args(tmp_path), callbacks=[callback])
    if engine == "FSDP":
        monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    else:
        monkeypatch.setattr(hf_trainer.args, "deepspeed", {"zero_optimization": {"stage": 3}})
    with pytest.raises(ValueError, match=f"does not support {engine}"):
        callback.on_train_begin(hf_trainer.args, hf_trainer.state, hf_trainer.control, model=model)


# -- data parallel -----------------------------------------------------------------------------
def test_two_processes_prune_as_one_process_with_their_global_batch(tmp_path):
    """torchrun, 2 CPU processes (gloo), one sample each per step: DDP averages the LoRA gradients,
    so the lora criterion sees one process's batch of 2 (the PruningRun below)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += [__file__, str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ours = torch.load(tmp_path / "outcome.pt")
    run = pruning_run(tiny_model(), LoraPruneConfig(criterion="lora", **PRUNE))
    assert_same_outcome(ours, outcome(run.pruner), tolerance=1e-5)


def data_parallel_worker(output_dir: str) -> None:
    """One rank of the test above: the Trainer splits each global batch of 2 over the 2 processes."""
    model = tiny_model()
    callback = LoraPruneCallback(model, LoraPruneConfig(criterion="lora", **PRUNE), **SCHEDULE)
    args = training_args(output_dir, per_device_train_batch_size=1)
    Trainer(model=model, args=args, train_dataset=run_batches(), callbacks=[callback]).train()
    assert type(callback.pruner).__name__ == "DistributedPruner"
    state = outcome(callback.pruner)
    if args.process_index == 0:
        torch.save(state, os.path.join(output_dir, "outcome.pt"))


if __name__ == "__main__":
    data_parallel_worker(sys.argv[1])
