"""Every results table in the docs agrees with the JSON it came from.

Each folder of ``experiments/results/`` keeps an experiment's numbers in ``results.json``
(``pod_scale``: ``depth`` / ``remat`` / ``sizing.json``), and its Markdown tables are rendered from
that JSON by the experiment's own code; README.md and docs/*.md copy some of those tables by hand.
Here every ``results.md`` is rendered again from its JSON with that code, and every copied table is
read back, number by number at the precision it prints, so a number edited by hand, or left behind
when an experiment is rerun, fails. JSON and Markdown only: no training, no compilation.
``experiments/results/README.md`` names the command that regenerates each folder.
"""

import json
import pathlib
import re
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
sys.path.insert(0, str(ROOT / "experiments"))
sys.path.append(str(ROOT / "experiments" / "benchmarks"))  # last: its module names (sampling, loss) are generic

import importlib.util  # noqa: E402

import overlap  # noqa: E402  experiments/benchmarks/overlap.py
import pod_scale  # noqa: E402
import sampler_vs_vllm  # noqa: E402
import stale_bias  # noqa: E402
import tool_use_grid  # noqa: E402

from opd_jax import demo, tasks  # noqa: E402
from opd_jax.tasks.tool_use import ToolUseTask  # noqa: E402

GIB = 2**30
NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:e[-+]\d+)?")
#: Result folders written by opd_jax.demo.write_results (opd-jax demo, opd_grid.py, exopd.py).
DEMO_GRIDS = ("demo", "demo_cross_tokenizer", "demo_vllm", "exopd", "grid_forms", "grid_seq_loo", "tool_use_long",
              "tool_use_vllm")
SAMPLER_RUNS = ("results", "idle_rerun", "recheck_8x512_n128", "recheck2_8x512_n128")
#: experiments/benchmarks/loss.py runs: all default cases, and issue 23's shape after / before its change.
LOSS_RUNS = ("results", "issue23", "issue23_before")
#: The representative pod-scale step: the first row of the sizing table.
REPRESENTATIVE_STEP = "qwen3-1.7b|8192|v5p-64"
DEMO_HEADER = "| run | accuracy before → after | teacher KL before → after | length before → after |"
BEFORE_AFTER = ("accuracy", "teacher_kl", "response_length")


def _loss_benchmark():
    """experiments/benchmarks/loss.py, loaded by path: a module named ``loss`` could be anything."""
    spec = importlib.util.spec_from_file_location("loss_benchmark", ROOT / "experiments" / "benchmarks" / "loss.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load(folder: str, name: str = "results.json"):
    return json.loads((RESULTS / folder / name).read_text())


def read(path: str) -> str:
    return (ROOT / path).read_text()


# --- Markdown tables ------------------------------------------------------------------------------


def _normal(line: str) -> str:
    return " ".join(line.split())


def find_table(text: str, header: str, *, after: str | None = None, prefix: bool = False) -> list[list[str]]:
    """Body rows (stripped cells) of the first Markdown table whose header row is ``header``.

    Args:
      text: Markdown.
      header: the header row, e.g. ``"| run | seeds |"``; whitespace and indentation are ignored.
      after: start looking at the first occurrence of this text.
      prefix: ``header`` need only start the header row (for headers that print a number).
    """
    if after is not None:
        assert after in text, f"marker {after!r} not found"
        text = text[text.index(after):]
    lines = text.splitlines()
    wanted = _normal(header)
    for index, line in enumerate(lines):
        line = _normal(line)
        if line == wanted or (prefix and line.startswith(wanted)):
            rows = []
            for row in lines[index + 2:]:  # after the header and its |---| line
                if not row.strip().startswith("|"):
                    break
                rows.append([cell.strip() for cell in row.strip().strip("|").split("|")])
            return rows
    raise AssertionError(f"no table with header {header!r}")


def header_line(text: str, start: str) -> str:
    """The (whitespace-normalised) table header row that begins with ``start``."""
    return next(_normal(line) for line in text.splitlines() if _normal(line).startswith(_normal(start)))


def _as_printed(value: float, printed: str) -> str:
    """``value`` formatted with the precision (and notation) of ``printed``."""
    mantissa = printed.split("e")[0]
    decimals = len(mantissa.split(".")[1]) if "." in mantissa else 0
    text = f"{value:.{decimals}e}" if "e" in printed else f"{value:.{decimals}f}"
    return text.lstrip("-") if float(text) == 0 else text


def cell_problems(where: str, cell: str, expected: list[float]) -> list[str]:
    """The numbers printed in ``cell``, in order, must be ``expected`` rounded as printed."""
    printed = NUMBER.findall(cell.replace("**", ""))
    if len(printed) != len(expected):
        return [f"{where}: {cell!r} prints {len(printed)} numbers, results.json has {len(expected)}: {expected}"]
    wanted = [_as_printed(value, text) for value, text in zip(expected, printed)]
    if wanted != printed:
        return [f"{where}: {cell!r} prints {printed}, results.json gives {wanted}"]
    return []


def rows_problems(where: str, rows: list[list[str]], expected: dict, key, skip: int = 1) -> list[str]:
    """Check every row against ``expected[key(row)]`` (one list of numbers per cell after the first
    ``skip`` label cells), and that every key of ``expected`` has a row."""
    problems, seen = [], set()
    for cells in rows:
        name = key(cells)
        if name not in expected:
            problems.append(f"{where}: row {cells[0]!r} is not in results.json ({sorted(expected)})")
            continue
        seen.add(name)
        values = cells[skip:]
        if len(values) != len(expected[name]):
            problems.append(f"{where}: row {cells[0]!r} has {len(values)} number cells, expected {len(expected[name])}")
            continue
        for cell, numbers in zip(values, expected[name]):
            problems += cell_problems(f"{where}, row {' | '.join(cells[:skip])!r}", cell, numbers)
    problems += [f"{where}: no row for {name!r} of results.json" for name in expected if name not in seen]
    return problems


def same_rows_problems(where: str, rows: list[list[str]], rendered: list[list[str]]) -> list[str]:
    """A table copied verbatim: the same rows as the table rendered from the JSON."""
    problems = [f"{where}: {' | '.join(mine)!r} != rendered {' | '.join(theirs)!r}"
                for mine, theirs in zip(rows, rendered) if mine != theirs]
    if len(rows) != len(rendered):
        problems.append(f"{where}: {len(rows)} rows, the rendered table has {len(rendered)}")
    return problems


def variation(cells: list[str]) -> str:
    """``forward_kl / stop_grad`` -> ``forward_kl/stop_grad``."""
    return cells[0].replace(" ", "")


# --- results.md and the other rendered files, from their JSON -------------------------------------


@pytest.mark.parametrize("folder", DEMO_GRIDS)
def test_demo_grid_results_md_is_rendered_from_results_json(folder):
    results = load(folder)
    assert results["summary"] == demo.summarize(results["runs"]), "summary is not the runs' mean ± std"
    table = demo.format_table(results["summary"], tasks.get_task(results["task"]).demo.columns)
    assert (RESULTS / folder / "results.md").read_text() == f"# {results['task']}: OPD vs OPD+\n\n{table}\n"


def test_tool_use_results_md_is_rendered_from_results_json():
    results = load("tool_use")
    # Summarised by an earlier summarize that kept fewer metrics: the ones it kept must agree.
    for stored, recomputed in zip(results["summary"], demo.summarize(results["runs"]), strict=True):
        assert stored == {key: recomputed[key] for key in stored}
    assert load("tool_use", "reference.json") == results["reference"]
    budget = ToolUseTask().max_response_length + 4  # the setup's response budget
    assert (RESULTS / "tool_use" / "results.md").read_text() == tool_use_grid.markdown(results, budget)


def test_stale_bias_results_md_is_rendered_from_results_json():
    text = stale_bias.results_markdown(load("stale_bias"))
    assert (RESULTS / "stale_bias" / "results.md").read_text() == text


@pytest.mark.parametrize("name", SAMPLER_RUNS)
def test_sampler_vs_vllm_md_is_rendered_from_json(name):
    text = sampler_vs_vllm.report(load("sampler_vs_vllm", f"{name}.json"))
    assert (RESULTS / "sampler_vs_vllm" / f"{name}.md").read_text() == text


@pytest.mark.parametrize("name", LOSS_RUNS)
def test_loss_md_is_rendered_from_json(name):
    text = _loss_benchmark().report(load("loss", f"{name}.json"))
    assert (RESULTS / "loss" / f"{name}.md").read_text() == text


def test_overlap_results_md_table_is_rendered_from_results_json():
    # results.md adds the command and the machine by hand; the table is the script's.
    header = "| mode | sample | wait | score + update | step | step / max | step / max (phases alone) |"
    rendered = find_table(overlap.markdown(load("overlap")["results"]), header)
    text = (RESULTS / "overlap" / "results.md").read_text()
    assert not same_rows_problems("overlap/results.md", find_table(text, header), rendered)


@pytest.mark.parametrize("name", ["depth", "remat", "sizing"])
def test_pod_scale_md_is_rendered_from_json(name):
    rendered = getattr(pod_scale, f"{name}_markdown")(load("pod_scale", f"{name}.json"))
    assert (RESULTS / "pod_scale" / f"{name}.md").read_text() == rendered + "\n"


@pytest.mark.parametrize("path", sorted((RESULTS / "plan_defaults").glob("*.json")), ids=lambda p: p.stem)
def test_plan_reports_are_rendered_from_their_json(path):
    """Each `opd-jax plan --json` report is its .md beside it (opd_jax.plan.format_report)."""
    from opd_jax import plan

    assert path.with_suffix(".md").read_text() == plan.format_report(json.loads(path.read_text())) + "\n"


def test_the_plan_with_no_memory_flags_is_quoted_as_reported():
    """docs/pod_scale.md quotes the representative plan's report verbatim, and it fits."""
    from opd_jax import plan

    report = json.loads((RESULTS / "plan_defaults" / "representative_v5p-64.json").read_text())
    assert report["fits"] and report["batch"]["logit_chunk_size"] == 1024
    assert report["train_config"]["loop"]["logit_chunk_size"] == 1024
    assert plan.format_report(report) in (ROOT / "docs" / "pod_scale.md").read_text()


# --- tables copied into README.md and docs/*.md ---------------------------------------------------


def demo_problems(text: str, where: str) -> list[str]:
    """The demo's table (README.md "Headline results", docs/demo.md) against demo/results.json."""
    expected = {row["variation"]: [[row[f"{key}_before"], row[key], row[f"{key}_std"]] for key in BEFORE_AFTER]
                for row in load("demo")["summary"]}
    return rows_problems(where, find_table(text, DEMO_HEADER), expected, variation)


@pytest.mark.parametrize("path", ["README.md", "docs/demo.md"])
def test_demo_table(path):
    assert not demo_problems(read(path), path)


def test_demo_table_check_fails_on_a_changed_number():
    text = read("README.md")
    assert "1.818 → **12.105 ± 1.059**" in text
    changed = text.replace("1.818 → **12.105 ± 1.059**", "1.818 → **12.104 ± 1.059**")
    assert any("12.104" in problem and "12.105" in problem for problem in demo_problems(changed, "README.md"))
    assert demo_problems(text.replace("| js / opd_plus |", "| js / opd_pluss |"), "README.md")  # a renamed run
    row = next(line for line in text.splitlines() if line.startswith("| js / opd_plus |"))
    assert demo_problems(text.replace(row + "\n", ""), "README.md")  # a missing run


@pytest.mark.parametrize("path", ["docs/cross_tokenizer.md", "docs/demo.md"])
def test_demo_cross_tokenizer_table(path):
    expected = {row["variation"]: [[row[f"{key}_before"], row[key], row[f"{key}_std"]]
                                   for key in ("accuracy", "response_length")]
                for row in load("demo_cross_tokenizer")["summary"]}
    rows = find_table(read(path), "| run | accuracy before → after | length before → after |")
    assert len(rows) == len(expected) and not rows_problems(path, rows, expected, variation)


def test_demo_vllm_table():
    expected = {row["variation"]: [[len(row["seeds"])]]
                + [[row[f"{key}_before"], row[key], row[f"{key}_std"]] for key in BEFORE_AFTER]
                for row in load("demo_vllm")["summary"]}
    header = "| run | seeds | accuracy before → after | teacher KL before → after | length before → after |"
    assert not rows_problems("docs/vllm.md", find_table(read("docs/vllm.md"), header), expected, variation)


def test_exopd_table():
    names = {"js / opd_plus": "js/opd_plus", "reverse_kl / stop_grad (= ExOPD at λ = 1)": "reverse_kl/stop_grad"}
    results = load("exopd")
    expected = {row["variation"]: [[row[f"{key}_before"], row[key]] for key in ("accuracy", "teacher_kl")]
                for row in results["summary"]}
    for row in results["summary"]:
        assert row["seeds"] == [0], "the docs table prints no ± std"
        if row["variation"].startswith("exopd/scale_"):
            names[f"ExOPD, λ = {row['variation'].removeprefix('exopd/scale_')}"] = row["variation"]
    rows = find_table(read("docs/objectives.md"), "| run | accuracy before → after | teacher KL before → after |")
    assert not rows_problems("docs/objectives.md", rows, expected, lambda cells: names.get(cells[0], cells[0]))


def test_grid_forms_table():
    """docs/demo.md: one row per (form, estimator), accuracy, KL per token × length per divergence."""
    summary = {row["variation"]: row for row in load("grid_forms")["summary"]}
    forms = {"token, γ = 1": "token/gamma=1", "sequence": "sequence/gamma=0"}
    expected = {
        (form, estimator): [[summary[f"{divergence}/{estimator}/{variation_form}"][key] for key in BEFORE_AFTER]
                            for divergence in ("reverse_kl", "forward_kl", "js")]
        for form, variation_form in forms.items() for estimator in ("stop_grad", "opd_plus")
    }
    text = read("docs/demo.md")
    rows = find_table(text, "| form | estimator | reverse KL: accuracy, KL per token × length | forward KL | JS |")
    problems = rows_problems("docs/demo.md", rows, expected, lambda cells: tuple(cells[:2]), skip=2)
    (start,) = re.findall(r"\(start: ([^)]*)\)", text)
    first = next(iter(summary.values()))
    problems += cell_problems("docs/demo.md (start: …)", start, [first[f"{key}_before"] for key in BEFORE_AFTER])
    assert not problems


def test_tool_use_table():
    results = load("tool_use")
    columns = [key for key, _ in tool_use_grid.COLUMNS]
    expected = {name: [[]] + [[metrics[key]] for key in columns] for name, metrics in results["reference"].items()}
    expected |= {row["variation"]: [[len(row["seeds"])]] + [[row[key], row[f"{key}_std"]] for key in columns]
                 for row in results["summary"]}
    header = "| run | seeds | answer acc. | call validity | exact calls | teacher-KL | length |"
    rows = find_table(read("docs/tool_use.md"), header)
    # "49.0 (budget)": every seed at the response budget, i.e. a standard deviation of 0.
    rows = [[cell.replace(" (budget)", " ± 0.0") for cell in cells] for cells in rows]
    key = lambda cells: cells[0] if cells[0] in results["reference"] else variation(cells)  # noqa: E731
    assert not rows_problems("docs/tool_use.md", rows, expected, key)


def test_tool_use_long_table():
    summary = load("tool_use_long")["summary"]
    columns = ("accuracy", "call_validity", "teacher_kl")
    expected = {row["variation"]: [[row[key], row[f"{key}_std"]] for key in columns] for row in summary}
    text = read("docs/tool_use.md")
    header = "| run | answer acc. | call validity | teacher-KL"
    problems = rows_problems("docs/tool_use.md", find_table(text, header, prefix=True), expected, variation)
    (before,) = {row["teacher_kl_before"] for row in summary}
    problems += cell_problems("docs/tool_use.md, header", header_line(text, header).split("|")[-2], [before])
    assert not problems


def test_overlap_table():
    header = "| mode | sample | wait | score + update | step | step / max | step / max (phases alone) |"
    rendered = find_table(overlap.markdown(load("overlap")["results"]), header)
    assert not same_rows_problems("docs/overlap.md", find_table(read("docs/overlap.md"), header), rendered)


def test_stale_bias_summary_tables():
    """docs/overlap.md copies the summary of stale_bias/results.md: each caption and the table under it."""
    rendered = stale_bias.summary_markdown(load("stale_bias"))
    text = read("docs/overlap.md")
    captions = [line for line in rendered.splitlines() if line and not line.startswith("|")]
    assert captions
    problems = []
    for caption in captions:
        if caption not in text:
            problems.append(f"docs/overlap.md: no caption {caption!r}")
            continue
        header = next(line for line in rendered[rendered.index(caption):].splitlines() if line.startswith("|"))
        problems += same_rows_problems(f"docs/overlap.md, the table under {caption[:50]!r}…",
                                       find_table(text, header, after=caption),
                                       find_table(rendered, header, after=caption))
    assert not problems


@pytest.mark.parametrize("name, after", [
    ("results", "`.venv/bin/python experiments/benchmarks/sampler_vs_vllm.py --profile --json"),
    ("idle_rerun", "**The idle-machine rerun**"),
], ids=["results", "idle_rerun"])
def test_sampler_vs_vllm_tables(name, after):
    header = "| model | batch × new | opd_jax tok/s | vLLM tok/s | ratio (ours / vLLM) |"
    rendered = find_table(sampler_vs_vllm.report(load("sampler_vs_vllm", f"{name}.json")), header, prefix=True)
    rows = find_table(read("docs/performance.md"), header, after=after, prefix=True)
    assert not same_rows_problems(f"docs/performance.md ({name})", rows, rendered)


LOSS_HEADER = "| B×T×V | side | median s | speed-up vs TRL | peak RSS Δ MiB | memory vs TRL | XLA temp MiB |"


@pytest.mark.parametrize("name, after", [
    ("results", "`.venv/bin/python experiments/benchmarks/loss.py --rounds 2`"),
    ("issue23", "**Issue 23's shape, after.**"),
    ("issue23_before", "**Issue 23's shape, before.**"),
], ids=list(LOSS_RUNS))
def test_loss_tables(name, after):
    """docs/performance.md copies the loss benchmark's tables verbatim."""
    rendered = find_table(_loss_benchmark().report(load("loss", f"{name}.json")), LOSS_HEADER, prefix=True)
    rows = find_table(read("docs/performance.md"), LOSS_HEADER, after=after, prefix=True)
    assert not same_rows_problems(f"docs/performance.md (loss, {name})", rows, rendered)


def test_sampler_vs_vllm_recheck_table():
    expected = {}
    for label, name in (("recheck 1", "recheck_8x512_n128"), ("recheck 2", "recheck2_8x512_n128")):
        for row in load("sampler_vs_vllm", f"{name}.json")["results"]:
            expected[(label, f"{row['batch']} × {row['new_tokens']}")] = [
                [row["opd_jax_tokens_per_s"]], [row["vllm_tokens_per_s"]], [row["ratio"]],
                [100 * row["opd_jax_other_load"], 100 * row["vllm_other_load"]]]
    header = "| run | batch × new | opd_jax tok/s | vLLM tok/s | ratio | other CPU (ours / vLLM) |"
    rows = find_table(read("docs/performance.md"), header)
    assert not rows_problems("docs/performance.md (rechecks)", rows, expected, lambda cells: tuple(cells[:2]), skip=2)


@pytest.mark.parametrize("name", ["depth", "remat", "sizing"])
def test_pod_scale_tables(name):
    rendered = getattr(pod_scale, f"{name}_markdown")(load("pod_scale", f"{name}.json"))
    lines = rendered.splitlines()
    header = next(line for line in lines if line.startswith("| "))
    text = read("docs/pod_scale.md")
    if not lines[0].startswith("|"):
        assert lines[0] in text, f"caption {lines[0]!r} not in docs/pod_scale.md"
    assert not same_rows_problems(f"docs/pod_scale.md ({name})", find_table(text, header), find_table(rendered, header))


def test_pod_scale_representative_step():
    """docs/pod_scale.md's per-program table and the sentences of README.md and docs/pod_scale.md."""
    step = load("pod_scale", "sizing.json")[REPRESENTATIVE_STEP]
    memory = step["device_memory_bytes"]
    expected = {name: [[p["executions"]], [p["total_bytes"] / GIB], [100 * p["total_bytes"] / memory],
                       [p["compile_seconds"]], [p["roofline_seconds"]]] for name, p in step["programs"].items()}
    text = read("docs/pod_scale.md")
    header = "| program | runs per step | peak + resident GiB per chip | of chip | compile s | roofline s |"
    rows = find_table(text, header)
    problems = rows_problems("docs/pod_scale.md", rows, expected, lambda cells: cells[0])
    largest = 100 * max(p["total_bytes"] for p in step["programs"].values()) / memory
    for where, pattern in (("README.md", r"using (\d+%) of a chip, estimated step time ([\d.]+) s"),
                           ("docs/pod_scale.md", r"the largest uses (\d+%)\);\s+estimated step time ([\d.]+) s")):
        (found,) = re.findall(pattern, read(where))
        problems += cell_problems(where, " ".join(found), [largest, step["estimated_step_seconds"]])
    assert not problems


def test_every_results_folder_has_its_command_in_the_readme():
    rows = find_table((RESULTS / "README.md").read_text(), "| folder | command | writes | time |")
    listed = {cells[0].strip("`/") for cells in rows if cells[0]}
    assert listed == {path.name for path in RESULTS.iterdir() if path.is_dir()}
