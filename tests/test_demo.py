"""The embedded default (`opd-jax demo`), `opd-jax eval`, and the grid helpers behind them."""

import argparse
import dataclasses
import json
import pathlib

import numpy as np
import pytest

from opd_jax import demo, tasks
from opd_jax.commands import main
from opd_jax.tasks import tool_use


def test_grid_crosses_axes_and_seeds_with_joint_axes():
    specs = demo.grid(
        tasks.DEMO_CONFIG,
        {"divergence": ["reverse_kl", "forward_kl"], ("level", "gamma"): [("token", 1.0), ("sequence", 0.0)]},
        seeds=[3, 4],
    )
    assert len(specs) == 8
    assert [s.variation for s in specs[:4]] == ["reverse_kl/token/gamma=1"] * 2 + ["reverse_kl/sequence/gamma=0"] * 2
    assert [(s.config.divergence, s.config.level, s.config.gamma, s.config.seed) for s in specs[:2]] == [
        ("reverse_kl", "token", 1.0, 3), ("reverse_kl", "token", 1.0, 4)]
    assert len({s.folder for s in specs}) == 8 and all("/" not in s.folder for s in specs)
    # Every other field comes from the base config.
    assert all(s.config.learning_rate == tasks.DEMO_CONFIG.learning_rate for s in specs)


def test_grid_rejects_unknown_axes_and_invalid_combinations():
    with pytest.raises(ValueError, match="unknown grid axis.*'lr'"):
        demo.grid(tasks.DEMO_CONFIG, {"lr": [1e-3]}, [0])
    with pytest.raises(ValueError, match="takes no parameters"):
        demo.grid(tasks.DEMO_CONFIG, {("divergence", "beta"): [("js", 0.3)]}, [0])


def test_summary_is_the_mean_and_sample_std_over_seeds():
    records = [
        {"variation": "a", "seed": 0, "accuracy": 0.2, "accuracy_before": 0.1, "config": {}},
        {"variation": "b", "seed": 0, "accuracy": 0.9, "config": {}},
        {"variation": "a", "seed": 1, "accuracy": 0.6, "accuracy_before": 0.1, "config": {}},
        {"variation": "a", "seed": 2, "accuracy": 0.7, "accuracy_before": 0.1, "config": {}},
    ]
    a, b = demo.summarize(records)
    assert (a["variation"], a["seeds"], b["seeds"]) == ("a", [0, 1, 2], [0])
    assert a["accuracy"] == pytest.approx(0.5)
    assert a["accuracy_std"] == pytest.approx(np.sqrt(((0.2 - 0.5) ** 2 + 0.1**2 + 0.2**2) / 2))
    assert (b["accuracy"], b["accuracy_std"]) == (0.9, 0.0)
    table = demo.format_table([a, b], [("accuracy", "acc")])
    assert "| a | 3 | 0.100 ± 0.000 → 0.500 ± 0.265 |" in table
    assert "| b | 1 | – → 0.900 |" in table


def test_the_demo_and_eval_commands_offer_the_registered_tasks_with_their_own_settings(monkeypatch):
    from opd_jax.commands import build_parser

    def task_choices(parser, command):
        (subparsers,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        (task,) = [a for a in subparsers.choices[command]._actions if a.dest == "task"]
        return task.choices

    def help_of(parser, command, dest):
        (subparsers,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        return next(a.help for a in subparsers.choices[command]._actions if a.dest == dest)

    names = ["arithmetic", "arithmetic_cross_tokenizer", "arithmetic_vllm", "tool_use", "tool_use_vllm"]
    assert task_choices(build_parser(), "demo") == task_choices(build_parser(), "eval") == names
    assert ("arithmetic runs/demo, arithmetic_cross_tokenizer runs/demo-arithmetic_cross_tokenizer, arithmetic_vllm "
            "runs/demo-arithmetic_vllm, tool_use runs/demo-tool_use, tool_use_vllm runs/demo-tool_use_vllm") in " ".join(
        help_of(build_parser(), "demo", "output").split())
    assert ("arithmetic 200, arithmetic_cross_tokenizer 200, arithmetic_vllm 200, tool_use 40, tool_use_vllm 40"
            in help_of(build_parser(), "demo", "steps"))
    assert "(arithmetic_vllm, tool_use_vllm)" in help_of(build_parser(), "demo", "rollout_backend")
    # A task registered later is offered too, with its own demo settings (here the default output folder).
    chess = dataclasses.replace(tasks.get_task("arithmetic"), name="chess", demo=tasks.DemoSettings())
    monkeypatch.setitem(tasks._registry, "chess", chess)
    assert task_choices(build_parser(), "demo") == sorted([*names, "chess"])
    assert "chess runs/demo-chess" in help_of(build_parser(), "demo", "output")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    output = tmp_path_factory.mktemp("demo") / "out"
    assert main(["demo", "--steps", "2", "--divergence", "forward_kl", "--estimator", "opd_plus",
                 "--estimator", "stop_grad", "--output", str(output), "--quiet"]) == 0
    return output


def test_demo_writes_the_table_results_curves_and_exported_students(demo_run):
    results = json.loads((demo_run / "results.json").read_text())
    assert [r["variation"] for r in results["runs"]] == ["forward_kl/opd_plus", "forward_kl/stop_grad"]
    for record in results["runs"]:
        assert record["config"]["steps"] == 2 and record["config"]["divergence"] == "forward_kl"
        for key in ("accuracy", "teacher_kl", "response_length"):
            assert np.isfinite(record[key]) and np.isfinite(record[f"{key}_before"])
        assert 0.0 <= record["accuracy"] <= 1.0
        # The shipped student starts weak: the evaluation before training sees it so.
        assert record["accuracy_before"] < 0.5 and record["teacher_kl_before"] > 0.5
    table = (demo_run / "results.md").read_text()
    assert "| forward_kl/opd_plus | 1 |" in table and "| forward_kl/stop_grad | 1 |" in table
    assert (demo_run / "curves.png").stat().st_size > 10_000
    for folder in ("forward_kl-opd_plus-seed0", "forward_kl-stop_grad-seed0"):
        steps = [r["step"] for r in map(json.loads, (demo_run / folder / "metrics.jsonl").read_text().splitlines())]
        assert steps == sorted(steps) and steps[-1] == 2


def test_eval_of_an_exported_student_reproduces_the_demo_numbers(demo_run, tmp_path, capsys):
    record = json.loads((demo_run / "results.json").read_text())["runs"][0]
    output = tmp_path / "metrics.json"
    assert main(["eval", "--model", str(demo_run / "forward_kl-opd_plus-seed0" / "student"),
                 "--json", str(output)]) == 0
    measured = json.loads(output.read_text())
    for key in ("accuracy", "response_length", "teacher_kl"):
        assert measured[key] == pytest.approx(record[key], rel=1e-5, abs=1e-6), key
    assert "accuracy" in capsys.readouterr().out


def test_rerunning_the_demo_reuses_finished_runs(demo_run):
    before = json.loads((demo_run / "results.json").read_text())["runs"]
    assert main(["demo", "--steps", "2", "--divergence", "forward_kl", "--estimator", "opd_plus",
                 "--output", str(demo_run), "--quiet"]) == 0
    after = json.loads((demo_run / "results.json").read_text())["runs"]
    assert [r["accuracy"] for r in after] == [before[0]["accuracy"]]
    lines = (demo_run / "forward_kl-opd_plus-seed0" / "metrics.jsonl").read_text().splitlines()
    assert len([r for r in map(json.loads, lines) if "loss" in r]) == 2  # no step trained twice


def test_bad_demo_and_eval_input_is_named_and_nothing_is_overwritten(tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.write_text("keep me")
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--output", str(taken), "--quiet"])
    assert exit_info.value.code == 2 and "is a file" in capsys.readouterr().err
    assert taken.read_text() == "keep me"
    with pytest.raises(SystemExit):
        main(["eval", "--model", str(tmp_path / "absent")])
    assert str(tmp_path / "absent") in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["demo", "--divergence", "alpha"])  # needs a parameter: only in the grid script
    assert "invalid choice" in capsys.readouterr().err



def test_grid_script_runs_parametrised_divergences_over_seeds(tmp_path):
    import runpy

    script = pathlib.Path(__file__).parents[1] / "experiments" / "opd_grid.py"
    main = runpy.run_path(str(script))["main"]
    assert main(["--divergences", "alpha_0.5", "--estimators", "opd_plus", "--forms", "sequence", "--seeds", "0", "1",
                 "--baseline", "leave_one_out", "--steps", "1", "--eval-problems", "32", "--output", str(tmp_path),
                 "--quiet"]) == 0
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert [(r["config"]["alpha"], r["config"]["level"], r["config"]["baseline"], r["seed"]) for r in runs] == [
        (0.5, "sequence", "leave_one_out", 0), (0.5, "sequence", "leave_one_out", 1)]
    assert "| alpha/alpha=0.5/opd_plus/sequence/gamma=0 | 2 | " in (tmp_path / "results.md").read_text()


def test_tool_use_demo_trains_with_its_own_settings_and_eval_reproduces_it(tmp_path, capsys):
    output = tmp_path / "tool_use"
    assert main(["demo", "--task", "tool_use", "--steps", "1", "--divergence", "js", "--estimator", "opd_plus",
                 "--eval-problems", "32", "--output", str(output), "--quiet"]) == 0
    (record,) = json.loads((output / "results.json").read_text())["runs"]
    config = record["config"]
    assert (config["prompts_per_step"], config["learning_rate"], config["steps"]) == (
        tool_use.DEMO.config.prompts_per_step, tool_use.DEMO.config.learning_rate, 1)
    assert config["max_new_tokens"] == tool_use.toy_task().max_response_length + 4
    for key in ("accuracy", "call_validity", "call_exactness", "teacher_kl", "response_length"):
        assert np.isfinite(record[key]) and np.isfinite(record[f"{key}_before"]), key
    assert "call validity before → after" in (output / "results.md").read_text()
    # The exported student evaluated on the same held-out questions gives the demo's numbers.
    metrics = tmp_path / "metrics.json"
    assert main(["eval", "--task", "tool_use", "--model", str(output / "js-opd_plus-seed0" / "student"),
                 "--problems", "32", "--json", str(metrics)]) == 0
    measured = json.loads(metrics.read_text())
    for key in ("accuracy", "call_validity", "response_length", "teacher_kl"):
        assert measured[key] == pytest.approx(record[key], rel=1e-5, abs=1e-6), key
    assert "call_validity" in capsys.readouterr().out
    # An arithmetic demo into the tool-use folder is refused before anything is trained or written.
    before = (output / "results.json").read_text()
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--output", str(output), "--steps", "1", "--quiet"])
    assert exit_info.value.code == 2 and "holds results of task 'tool_use'" in capsys.readouterr().err
    assert (output / "results.json").read_text() == before


def test_demo_rollout_backend_vllm_runs_the_tasks_vllm_variant_or_names_the_tasks_that_have_one(capsys):
    from opd_jax.commands.demo import _task_for_backend

    assert _task_for_backend("tool_use", "vllm") == "tool_use_vllm"
    assert _task_for_backend("arithmetic", "vllm") == "arithmetic_vllm"
    assert _task_for_backend("arithmetic_vllm", "vllm") == "arithmetic_vllm"
    assert _task_for_backend("tool_use", None) == _task_for_backend("tool_use", "jax") == "tool_use"
    # The variant keeps the task's teacher and problems, with a student vLLM's CPU attention serves.
    plain, variant = tasks.get_task("tool_use"), tasks.get_task("tool_use_vllm")
    assert variant.model_path("teacher") == plain.model_path("teacher")
    student = json.loads((variant.model_path("student") / "config.json").read_text())
    assert student["head_dim"] == 32 and variant.demo.config.rollout_backend == "vllm"
    assert dataclasses.replace(variant.demo.config, rollout_backend="jax") == plain.demo.config
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--task", "arithmetic_cross_tokenizer", "--rollout-backend", "vllm"])
    assert exit_info.value.code == 2
    assert ("--rollout-backend vllm: task 'arithmetic_cross_tokenizer' ships no student vLLM serves; allowed tasks: "
            "arithmetic, tool_use") in capsys.readouterr().err
