"""The command line, end to end on the real tiny-llama fixture (short runs, small windows)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import shared_path
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import loraprune  # noqa: F401  (registers the pruned classes)
from loraprune.cli import main

RUN = [
    "--ratio",
    "0.5",
    "--steps",
    "4",
    "--prune-every",
    "2",
    "--seq-len",
    "32",
    "--batch-size",
    "2",
    "--quiet",
]


@pytest.fixture(scope="module")
def paths(tiny_llama_dir, calib_text, wikitext_test):
    return {"model": str(tiny_llama_dir), "data": str(calib_text), "eval": str(wikitext_test)}


def prune(paths, out, *extra: str) -> int:
    return main(["prune", paths["model"], "--data", paths["data"], "--out", str(out), *RUN, *extra])


@pytest.mark.parametrize(
    ("criterion", "mode"),
    [
        ("lora", "iterative"),
        ("taylor", "iterative"),
        ("taylor", "oneshot"),
        ("magnitude", "iterative"),
        ("random", "iterative"),
    ],
)
def test_prune_each_criterion_gives_a_loadable_model_at_the_ratio(paths, tmp_path, capsys, criterion, mode):
    out = tmp_path / "out"
    extra = [
        "--criterion",
        criterion,
        "--mode",
        mode,
        "--calib-batches",
        "2",
        "--eval-data",
        paths["eval"],
        "--eval-seq-len",
        "64",
        "--eval-max-windows",
        "3",
    ]
    assert prune(paths, out, *extra) == 0
    report = json.loads((out / "prune_report.json").read_text())
    assert report["criterion"] == criterion and report["mode"] == mode and report["steps"] == 4
    assert [(g["kept"], g["total"]) for g in report["groups"]] == [(3, 6), (512, 1024)] * 5
    assert [(layer["heads"], layer["channels"]) for layer in report["layers"]] == [(3, 512)] * 5 + [(6, 1024)]
    assert report["parameters"]["after"] < report["parameters"]["before"] == 16_913_280
    assert report["masked_fractions"] == {"attention": 0.5, "mlp": 0.5}
    assert report["final_loss"] > 0 and report["wall_time_s"] > 0 and report["peak_memory_bytes"] > 0
    assert not (out / "checkpoint.safetensors").exists()
    model = AutoModelForCausalLM.from_pretrained(out)
    assert sum(p.numel() for p in model.parameters()) == report["parameters"]["after"]
    (reported,) = report["eval"]
    assert (
        reported["windows"] == 3 and reported["seq_len"] == 64 and 1 < reported["perplexity"] < float("inf")
    )
    capsys.readouterr()
    assert (
        main(
            [
                "eval",
                str(out),
                "--data",
                paths["eval"],
                "--seq-len",
                "64",
                "--max-windows",
                "3",
                "--json",
                "--quiet",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["perplexity"] == reported["perplexity"]


def test_interrupt_and_resume_reaches_the_same_model(paths, tmp_path):
    extra = [
        "--steps",
        "6",
        "--save-every",
        "2",
        "--lora-dropout",
        "0.1",
    ]  # dropout: the RNG state must resume too
    assert prune(paths, tmp_path / "whole", *extra) == 0
    assert prune(paths, tmp_path / "split", *extra, "--stop-after", "3") == 0
    assert (tmp_path / "split" / "checkpoint.safetensors").exists()
    assert not (tmp_path / "split" / "prune_report.json").exists()
    assert prune(paths, tmp_path / "split", *extra, "--resume") == 0
    whole = json.loads((tmp_path / "whole" / "prune_report.json").read_text())
    split = json.loads((tmp_path / "split" / "prune_report.json").read_text())
    assert whole["layers"] == split["layers"] and whole["final_loss"] == split["final_loss"]
    a, b = (
        load_file(tmp_path / "whole" / "model.safetensors"),
        load_file(tmp_path / "split" / "model.safetensors"),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_refit_is_on_by_default_and_reported_and_distillation_off(paths, tmp_path):
    out = tmp_path / "out"
    assert prune(paths, out) == 0
    report = json.loads((out / "prune_report.json").read_text())
    run = report["run_config"]
    assert (run["distill_weight"], run["distill_temperature"]) == (0.0, None)
    assert (run["reconstruct"], run["reconstruct_lambda"]) == (True, 0.01)
    samples = run["reconstruct_samples"]  # 64, or every window of a shorter --data
    assert 1 <= samples <= 64
    refits = report["reconstruct"]["consumers"]
    assert report["reconstruct"]["wall_time_s"] > 0
    assert {r["path"].rsplit(".", 1)[1] for r in refits} == {"o_proj", "down_proj"}
    assert all(r["tokens"] == samples * 32 and r["error_after"] < r["error_before"] for r in refits)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3]])).logits).all()


def test_lorashear_prunes_every_layer_with_protection_fade_and_staged_recovery(paths, tmp_path):
    # two shared texts stand in for pretraining and instruction data
    docs = str(shared_path("data", "docs-heldout", "calib.txt"))
    out = tmp_path / "out"
    extra = ["--method", "lorashear", "--recovery-data", docs, "--steps", "8", "--cooldown", "0.5"]
    extra += ["--heldout-windows", "2", "--save-every", "2"]
    assert prune(paths, out, *extra) == 0
    report = json.loads((out / "prune_report.json").read_text())
    assert report["method"] == "lorashear" and report["prune_config"]["layers"] == [0, 1, 2, 3, 4, 5]
    run_config = report["run_config"]
    assert (run_config["protect_fraction"], run_config["protect_by"], run_config["fade_steps"]) == (
        0.1,
        "layer",
        2,
    )
    protect = report["protect"]
    # the analysis' cost: the unpruned pass and one per group (12: 6 layers × attention, MLP), 2 windows each
    assert (protect["passes"], protect["tokens"]) == (13, 13 * 2 * 32) and protect["wall_time_s"] > 0
    protected = [g["group"] for g in protect["groups"] if g["exempt"]]
    assert all(g["protected_units"] == [] for g in protect["groups"])
    assert len(protected) == 2 and {p.rsplit(".", 1)[1] for p in protected} == {"attention", "mlp"}
    kept = {g["name"]: (g["kept"], g["total"]) for g in report["groups"]}
    assert all(kept[name] in ((6, 6), (1024, 1024)) for name in protected)
    assert sorted(kept.values()).count((3, 6)) == 5 and sorted(kept.values()).count((512, 1024)) == 5
    fade = report["fade"]  # warm-up 0.8, cool-down from step 4: the choice at 4 − 2 fades until 4
    assert (
        fade["steps"] == 2 and fade["masked_by_step"] == 4 and all(g["fading"] == 0 for g in fade["groups"])
    )
    assert fade["selections"] == [{"step": 2, "ratio": 0.5}]
    recovery = report["recovery"]
    assert [s["name"] for s in recovery["sources"]] == [paths["data"], docs]
    assert [(s["start_step"], s["end_step"]) for s in recovery["stages"]] == [(4, 6), (6, 8)]
    for stage in recovery["stages"]:  # the rule: the source furthest above the unpruned model's loss
        assert (
            stage["source"] == [paths["data"], docs][max(range(2), key=lambda i: (stage["deviation"][i], -i))]
        )
    assert set(recovery["final_heldout_loss"]) == {paths["data"], docs}
    model = AutoModelForCausalLM.from_pretrained(out)
    assert sum(p.numel() for p in model.parameters()) == report["parameters"]["after"]


def test_refit_and_distillation_can_be_turned_off(paths, tmp_path):
    out = tmp_path / "out"
    assert prune(paths, out, "--no-reconstruct", "--distill-weight", "0") == 0
    report = json.loads((out / "prune_report.json").read_text())
    run = report["run_config"]
    assert (run["distill_weight"], run["reconstruct"], run["reconstruct_samples"]) == (0.0, False, None)
    assert "reconstruct" not in report


def test_resume_refuses_other_settings(paths, tmp_path, capsys):
    out = tmp_path / "out"
    assert prune(paths, out, "--stop-after", "1") == 0
    assert prune(paths, out, "--resume", "--lr", "0.01") == 2
    assert "--lr" in capsys.readouterr().err


def test_info_lists_layers(paths, capsys):
    assert main(["info", paths["model"], "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"] == 16_913_280 and [layer["heads"] for layer in info["layers"]] == [6] * 6


@pytest.fixture
def short_text(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("too short")
    return str(path)


@pytest.fixture
def gpt2_dir(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=16, n_head=2).save_pretrained(tmp_path / "gpt2")
    return str(tmp_path / "gpt2")


# case: (command line after the defaults, which a later flag overrides; the flag the error must name)
BAD_INPUTS = {
    "missing model": (lambda p: ["prune", p["missing"], "--data", p["data"]], "MODEL:"),
    "missing data": (lambda p: ["prune", p["model"], "--data", p["missing"]], "--data"),
    "data too short": (lambda p: ["prune", p["model"], "--data", p["short"]], "--data"),
    "ratio 1": (lambda p: ["prune", p["model"], "--data", p["data"], "--ratio", "1.0"], "--ratio"),
    "ratio negative": (lambda p: ["prune", p["model"], "--data", p["data"], "--ratio", "-0.1"], "--ratio"),
    "too few steps": (
        lambda p: ["prune", p["model"], "--data", p["data"], "--prune-every", "10"],
        "--prune-every",
    ),
    "unsupported architecture": (lambda p: ["prune", p["gpt2"], "--data", p["data"]], "MODEL:"),
    "cuda without a gpu": (
        lambda p: ["prune", p["model"], "--data", p["data"], "--device", "cuda"],
        "--device",
    ),
    "lora rank 0": (lambda p: ["prune", p["model"], "--data", p["data"], "--lora-r", "0"], "--lora-r"),
    "missing eval data": (
        lambda p: ["prune", p["model"], "--data", p["data"], "--eval-data", p["missing"]],
        "--eval-data",
    ),
    "resume without checkpoint": (
        lambda p: ["prune", p["model"], "--data", p["data"], "--resume"],
        "--resume",
    ),
    "reconstruct lambda negative": (
        lambda p: ["prune", p["model"], "--data", p["data"], "--reconstruct", "--reconstruct-lambda", "-1"],
        "--reconstruct-lambda",
    ),
    "reconstruct lambda with the refit off": (
        lambda p: [
            "prune",
            p["model"],
            "--data",
            p["data"],
            "--no-reconstruct",
            "--reconstruct-lambda",
            "0.1",
        ],
        "--reconstruct-lambda",
    ),
    "reconstruct samples beyond the data": (
        lambda p: [
            "prune",
            p["model"],
            "--data",
            p["data"],
            "--reconstruct",
            "--reconstruct-samples",
            "99999999",
        ],
        "--reconstruct-samples",
    ),
    "distill weight above 1": (
        lambda p: ["prune", p["model"], "--data", p["data"], "--distill-weight", "1.5"],
        "--distill-weight",
    ),
    "distill temperature with distillation off": (
        lambda p: [
            "prune",
            p["model"],
            "--data",
            p["data"],
            "--distill-weight",
            "0",
            "--distill-temperature",
            "2",
        ],
        "--distill-temperature",
    ),
    # LoRAShear's parts (loraprune.lorashear)
    "protect fraction 1": (
        lambda p: ["prune", p["model"], "--data", p["data"], "--protect-fraction", "1.0"],
        "--protect-fraction",
    ),
    "protect fraction negative": (
        lambda p: [
            "prune",
            p["model"],
            "--data",
            p["data"],
            "--method",
            "lorashear",
            "--protect-fraction",
            "-0.1",
        ],
        "--protect-fraction",
    ),
    # by layer (the cheap proxy), all six layers: 0.95 protects every attention group and MLP group
    "protect fraction protecting every layer": (
        lambda p: ["prune", p["model"], "--data", p["data"], "--protect-fraction", "0.95", "--layers", "all"],
        "--protect-fraction",
    ),
    "fade longer than the pruning window": (
        lambda p: ["prune", p["model"], "--data", p["data"], "--fade-steps", "4"],
        "--fade-steps",
    ),
    "lorashear's default fade longer than the window": (
        lambda p: ["prune", p["model"], "--data", p["data"], "--method", "lorashear", "--prune-every", "4"],
        "--fade-steps",
    ),
    "fade epsilon without a fade": (
        lambda p: ["prune", p["model"], "--data", p["data"], "--fade-epsilon", "0.1"],
        "--fade-epsilon",
    ),
    "missing recovery data": (
        lambda p: ["prune", p["model"], "--data", p["data"], "--recovery-data", p["missing"]],
        "--recovery-data",
    ),
    "recovery data too short": (
        lambda p: [
            "prune",
            p["model"],
            "--data",
            p["data"],
            "--cooldown",
            "0.5",
            "--recovery-data",
            p["short"],
        ],
        "--recovery-data",
    ),
    "recovery without a cool-down": (
        lambda p: ["prune", p["model"], "--data", p["data"], "--cooldown", "0", "--recovery-data", p["eval"]],
        "--recovery-data",
    ),
    "recovery stages without recovery data": (
        lambda p: ["prune", p["model"], "--data", p["data"], "--recovery-stages", "2"],
        "--recovery-stages",
    ),
    "eval missing data": (lambda p: ["eval", p["model"], "--data", p["missing"]], "--data"),
    "eval missing model": (lambda p: ["eval", p["missing"], "--data", p["data"]], "MODEL:"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_one_line_nonzero_and_nothing_written(paths, tmp_path, short_text, gpt2_dir, capsys, case):
    if case == "cuda without a gpu" and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    build, flag = BAD_INPUTS[case]
    out = tmp_path / "out"
    command, *rest = build(
        {**paths, "missing": str(tmp_path / "nope"), "short": short_text, "gpt2": gpt2_dir}
    )
    args = [command, rest[0], "--out", str(out), *RUN, *rest[1:]] if command == "prune" else [command, *rest]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert flag in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_existing_out_dir_is_left_untouched(paths, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert prune(paths, out) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"


def test_a_ratio_the_kv_groups_cannot_reach_is_warned_with_the_counts(paths, tmp_path, capsys):
    gqa = str(shared_path("fixtures", "tiny-llama-gqa"))  # 3 KV groups a layer
    args = ["prune", gqa, "--data", paths["data"], "--out", str(tmp_path / "out"), *RUN, "--stop-after", "1"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "warning: --ratio 0.5 masks 66.7% of the attention units: each pruned layer loses 2 of 3" in err
