"""Several teachers routed per prompt: each row's advantages come from its own teacher, the
per-teacher metrics are those of its rows, and the CLI reads routes from a prompt file."""

import json
import re
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from opd_jax import models, step, train
from opd_jax.commands import main
from opd_jax.config import TrainConfig
from opd_jax.sampling import SamplingConfig, generate, score

HELPERS = pathlib.Path(__file__).parent / "helpers"
sys.path.insert(0, str(HELPERS))
import tiny_run  # noqa: E402
from hf_fixtures import make_qwen3_folder  # noqa: E402

CONFIG = TrainConfig(**(tiny_run.TRAIN | dict(steps=2, checkpoint_every=2, baseline="none")))


def _teachers():
    """Two teachers far from the student and from each other."""
    teachers = {}
    for name, seed in (("near", 1), ("far", 7)):
        teacher = models.Decoder(tiny_run.CONFIG, rngs=nnx.Rngs(seed))
        teacher.embedding[...] = teacher.embedding[...] * (30 if name == "near" else -30)
        teachers[name] = teacher
    return teachers


@pytest.fixture(scope="module")
def scored():
    """One rollout, prepared with both teachers routed by row and with each teacher alone."""
    student, _, prompts = tiny_run.models_and_prompts()
    teachers = _teachers()
    tokens, mask = prompts.batch(0, 8, seed=0)
    rollout = generate(student, tokens, mask, jax.random.key(0), SamplingConfig(8, stop_ids=(3,)))
    index_B = jnp.asarray([0, 1, 1, 0, 0, 0, 1, 0], jnp.int32)
    graph, params = nnx.split(student)
    optimizer = step.make_optimizer(CONFIG)
    routed = step.make_train_step(CONFIG, graph, {n: nnx.graphdef(t) for n, t in teachers.items()}, optimizer)
    both, metrics = routed.prepare(params, {n: nnx.state(t) for n, t in teachers.items()}, rollout, None, index_B)
    alone = {}
    for name, teacher in teachers.items():
        single = step.make_train_step(CONFIG, graph, nnx.graphdef(teacher), optimizer)
        alone[name] = single.prepare(params, nnx.state(teacher), rollout, None)[0]
    return student, teachers, rollout, np.asarray(index_B), both, jax.device_get(metrics), alone


def test_each_row_gets_the_advantages_of_its_own_teacher(scored):
    _, _, _, index_B, both, _, alone = scored
    for teacher_index, name in enumerate(("near", "far")):
        rows = index_B == teacher_index
        np.testing.assert_allclose(np.asarray(both.advantages)[rows], np.asarray(alone[name].advantages)[rows],
                                   rtol=1e-6, atol=1e-6)
    # the teachers disagree (JS advantages are bounded, so by 0.04 per token: 10^4 times the
    # tolerance), so a swapped route could not pass
    near, far = (np.asarray(alone[n].advantages) for n in ("near", "far"))
    assert np.abs(near - far)[np.asarray(both.response_mask_BxT)].mean() > 1e-2


def test_the_per_teacher_metrics_are_those_of_their_rows(scored):
    """Against float64 numpy from separate scoring passes of the student and each teacher."""
    student, teachers, rollout, index_B, _, metrics, _ = scored
    response = np.asarray(rollout.response_mask)
    student_logp = np.asarray(score(student, rollout.tokens, rollout.token_mask), np.float64)
    for teacher_index, name in enumerate(("near", "far")):
        rows = index_B == teacher_index
        teacher_logp = np.asarray(score(teachers[name], rollout.tokens, rollout.token_mask), np.float64)
        own = response & rows[:, None]
        expected_kl = (student_logp - teacher_logp)[own].mean()
        assert metrics[f"teacher_kl/{name}"] == pytest.approx(expected_kl, rel=1e-5)
        assert metrics[f"rows/{name}"] == rows.sum()
        assert metrics[f"response_length/{name}"] == pytest.approx(own.sum() / rows.sum())
    assert metrics["teacher_kl/near"] != pytest.approx(metrics["teacher_kl/far"], rel=0.1)


def test_a_routed_run_logs_per_teacher_metrics_and_checks_routes(tmp_path):
    student, _, prompts = tiny_run.models_and_prompts()
    routes = np.arange(len(prompts.tokens)) % 2
    routed = train.PromptSet(prompts.tokens, prompts.mask, routes)
    result = train.train(CONFIG, student, tiny_run.CONFIG, _teachers(), routed, tmp_path / "run", stop_ids=(3,),
                         progress=False)
    records = [r for r in result.history if "loss" in r]
    for position, record in zip((0, 4), records):
        expected = routes[routed.indices(position, CONFIG.prompts_per_step, CONFIG.seed)]
        assert record["rows/near"] == CONFIG.group_size * np.sum(expected == 0)
        assert record["rows/far"] == CONFIG.group_size * np.sum(expected == 1)
    with pytest.raises(ValueError, match=r"teacher_ids must lie in \[0, 2\)"):
        train.train(CONFIG, student, tiny_run.CONFIG, _teachers(),
                    train.PromptSet(prompts.tokens, prompts.mask, routes + 1), tmp_path / "bad", progress=False)
    assert not (tmp_path / "bad").exists()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    return (root, make_qwen3_folder(root / "a", seed=1, layers=1), make_qwen3_folder(root / "b", seed=3, layers=1),
            make_qwen3_folder(root / "student", seed=2, layers=1))


def _write(path, lines):
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def _train(folders, prompts, output, *teacher_flags):
    root, a, b, student = folders
    flags = [x for flag in teacher_flags for x in ("--teacher", flag.format(a=a, b=b))]
    return main(["train", *flags, "--student", str(student), "--prompts", str(prompts), "--output", str(output),
                 "--quiet", "--steps", "2", "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens",
                 "4", "--max-prompt-length", "32"])


def test_cli_routes_prompts_by_their_teacher_key(folders, tmp_path):
    prompts = _write(tmp_path / "p.jsonl", [{"prompt": "add the numbers", "teacher": "a"},
                                           {"prompt": "the answer is", "teacher": "b"}])
    assert _train(folders, prompts, tmp_path / "run", "a={a}", "b={b}") == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in records if "loss" in r]
    assert all(r["rows/a"] == 2 and r["rows/b"] == 2 for r in trained)
    identity = json.loads((tmp_path / "run" / "run_identity.json").read_text())
    assert {"teacher:a", "teacher:b"} <= identity.keys()


@pytest.mark.parametrize("lines, flags, expected", [
    ([{"prompt": "x", "teacher": "a"}, {"prompt": "y", "teacher": "c"}], ("a={a}", "b={b}"),
     r"p\.jsonl:2: teacher 'c' names no --teacher; given: a, b"),
    ([{"prompt": "x", "teacher": "a"}, {"prompt": "y"}], ("a={a}", "b={b}"),
     r"p\.jsonl:2: no 'teacher' key; with several teachers each prompt names one of: a, b"),
    ([{"prompt": "x"}], ("{a}", "{b}"), r"--teacher: with several teachers each needs a name"),
    ([{"prompt": "x"}], ("a={a}", "a={b}"), r"--teacher: each name once; repeated: a"),
])
def test_cli_route_errors_name_the_line_and_write_nothing(folders, tmp_path, capsys, lines, flags, expected):
    prompts = _write(tmp_path / "p.jsonl", lines)
    with pytest.raises(SystemExit) as exit_info:
        _train(folders, prompts, tmp_path / "run", *flags)
    assert exit_info.value.code == 2
    assert re.search(expected, capsys.readouterr().err)
    assert not (tmp_path / "run").exists()
