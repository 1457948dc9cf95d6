"""The toy tool-use task: tools, checker, multi-turn rollouts, masking, shipped models, training."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from opd_jax import models, step, train
from opd_jax.objectives import importance_surrogate
from opd_jax.sampling import Rollout, SamplingConfig, token_log_probs
from opd_jax.tasks import tool_use
from opd_jax.tasks.tool_use import ToolUseTask, Vocabulary, check_response, execute_call

VOCAB = Vocabulary()
EOS = "$"  # stands for the EOS token in scripted turns
TINY = models.DecoderConfig("qwen3", len(VOCAB), 32, 64, 2, 4, 2, 8, qk_norm=True, max_position_embeddings=128,
                            eos_token_id=(VOCAB.eos_id,), pad_token_id=VOCAB.pad_id)


# ------------------------------------------------------------------------------------------
# Tools and checker


@pytest.mark.parametrize(
    "turn, output",
    [
        ("[calc:12*7]", "84"),
        ("[calc:99+1]", "100"),
        ("[calc:3-5]", "-2"),
        ("[calc:0*123456]", "0"),
        ("[look:a]", "21"),
        ("[look:k]", "35"),
        ("[conv:5,km,m]", "5000"),
        ("[conv:5,m,km]", "0.005"),
        ("[conv:90,min,h]", "1.5"),
        ("[conv:7,h,s]", "25200"),
        ("[conv:0,g,kg]", "0"),
        # unknown tools
        ("[calk:12*7]", "err:tool"),
        ("[search:k]", "err:tool"),
        # malformed or invalid arguments
        ("[calc:12**7]", "err:args"),
        ("[calc:012*7]", "err:args"),
        ("[calc:12*]", "err:args"),
        ("[calc:]", "err:args"),
        ("[calc:1234567*2]", "err:args"),
        ("[look:K]", "err:args"),
        ("[look:ab]", "err:args"),
        ("[look:]", "err:args"),
        ("[conv:5,km,kg]", "err:args"),
        ("[conv:5,km]", "err:args"),
        ("[conv:5,km,m,m]", "err:args"),
        ("[conv:-5,km,m]", "err:args"),
        ("[conv:5,mi,m]", "err:args"),
        # not exactly one call
        ("calc:12*7]", "err:form"),
        ("x[calc:12*7]", "err:form"),
        ("[calc12*7]", "err:form"),
        ("[[calc:12*7]", "err:form"),
        ("[:12*7]", "err:form"),
        ("]", "err:form"),
        ("", "err:form"),
        ("[calc:12*7] ", "err:form"),
    ],
)
def test_executor(turn, output):
    assert execute_call(turn) == output
    assert tool_use.tool_output(turn) == "=" + output


def test_executor_never_raises_on_junk():
    rng = np.random.default_rng(0)
    alphabet = tool_use.ALPHABET + "<>"
    for _ in range(2000):
        text = "[" + "".join(rng.choice(list(alphabet), size=rng.integers(0, 12))) + "]"
        assert isinstance(execute_call(text), str)
    assert execute_call(None) == "err:form"


def test_lookup_table_and_reference_solutions():
    assert len(tool_use.LOOKUP_TABLE) == 26 and len(set(tool_use.LOOKUP_TABLE.values())) == 26
    assert all(10 <= v <= 99 for v in tool_use.LOOKUP_TABLE.values())
    task = ToolUseTask()
    assert task.make_problem("calc", 23, "*", 47).solution == "[calc:23*47]=1081>1081"
    assert task.make_problem("look", "k", "*", 7).solution == "[look:k]=35[calc:35*7]=245>245"
    assert task.make_problem("look2", "k", "+", "q").solution == "[look:k]=35[look:q]=79[calc:35+79]=114>114"
    assert task.make_problem("conv", 5, "km", "m").solution == "[conv:5,km,m]=5000>5000"
    problems = task.sample_problems(0, 3000)
    assert {p.kind for p in problems} == set(tool_use.KINDS)
    for p in problems:
        check = check_response(p, p.solution)
        assert check.well_formed and check.calls_valid and check.calls_exact and check.answer_correct, p
        assert len(p.prompt) <= task.max_prompt_length
        assert len(p.solution) + 1 <= task.max_response_length
        assert "".join(text for text, _ in tool_use.transcript_segments(p)) == p.solution
        assert p.answer >= 0
    train_set = {p.prompt for p in task.sample_problems(1, 3000, split="train")}
    test_set = {p.prompt for p in task.sample_problems(2, 300, split="test")}
    assert train_set and test_set and not train_set & test_set
    assert ToolUseTask.from_dict(json.loads(json.dumps(task.to_dict()))) == task
    with pytest.raises(ValueError, match="kinds must be"):
        ToolUseTask(kinds=("calc", "web"))
    with pytest.raises(ValueError, match="non-negative"):
        task.make_problem("calc", 3, "-", 50)


@pytest.mark.parametrize(
    "transcript, well_formed, valid, exact, correct",
    [
        ("[look:k]=35[calc:35*7]=245>245", True, True, True, True),
        # right answer without the calls: correct answer, invalid calls
        (">245", True, False, False, True),
        # valid calls with other arguments (35*8), wrong answer
        ("[look:k]=35[calc:35*8]=280>280", True, True, False, False),
        # right calls, answer copied wrong
        ("[look:k]=35[calc:35*7]=245>254", True, True, True, False),
        # an error from a bad call stays in the transcript: calls not valid, answer may still be right
        ("[look:K]=err:args[look:k]=35[calc:35*7]=245>245", True, False, False, True),
        ("[calk:35*7]=err:tool>245", True, False, False, True),
        # a tool output that is not what the tool returns
        ("[look:k]=36[calc:36*7]=252>252", False, False, False, False),
        # junk between calls, missing answer, non-canonical answer, unterminated call
        ("[look:k]=35x[calc:35*7]=245>245", False, False, False, True),
        ("[look:k]=35[calc:35*7]=245", False, False, False, False),
        ("[look:k]=35[calc:35*7]=245>0245", False, False, False, False),
        ("[look:k]=35[calc:35*7", False, False, False, False),
        ("", False, False, False, False),
    ],
)
def test_checker(transcript, well_formed, valid, exact, correct):
    problem = ToolUseTask().make_problem("look", "k", "*", 7)
    check = check_response(problem, transcript)
    assert (check.well_formed, check.calls_valid, check.calls_exact, check.answer_correct) == (
        well_formed, valid, exact, correct)


def test_tokenizer_matches_vocabulary(tmp_path):
    from opd_jax import tokenization

    tokenizer = tool_use.build_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    loaded = tokenization.load_tokenizer(tmp_path)
    for tok in (tokenizer, loaded):
        text = "k*7?[look:k]=35[calc:35*7]=245>245 5km in m?"
        assert tok(text, add_special_tokens=True)["input_ids"] == VOCAB.encode(text)
        assert tok.decode(VOCAB.encode(text)) == text
        assert (tok.eos_token_id, tok.pad_token_id, len(tok)) == (VOCAB.eos_id, VOCAB.pad_id, len(VOCAB))
    assert VOCAB.decode(VOCAB.encode("]")) == "]" and VOCAB.close_id == VOCAB.encode("]")[0]


# ------------------------------------------------------------------------------------------
# Multi-turn rollouts with a scripted policy


def scripted_generate(turns_for):
    """A ``generate`` stand-in: ``turns_for(prompt) -> [turn texts]``; turn k is written after k
    tool outputs (``$`` is EOS). Like ``generate`` it stops at the first stop id."""

    def generate_fn(model, tokens, mask, key, config):
        tokens, mask = np.asarray(tokens), np.asarray(mask)
        rows, width = tokens.shape
        new = np.full((rows, config.max_new_tokens), config.pad_id, np.int32)
        new_mask = np.zeros((rows, config.max_new_tokens), bool)
        for row in range(rows):
            context = VOCAB.decode(tokens[row][mask[row]])
            prompt = context[: context.index("?") + 1]
            done_turns = context[len(prompt):].count("]")
            turns = turns_for(prompt)
            text = turns[min(done_turns, len(turns) - 1)]
            ids = [VOCAB.eos_id if c == EOS else VOCAB.encode(c)[0] for c in text][: config.max_new_tokens]
            stops = [i for i, t in enumerate(ids) if t in config.stop_ids]
            ids = ids[: stops[0] + 1] if stops else ids
            new[row, : len(ids)] = ids
            new_mask[row, : len(ids)] = True
        logp = np.where(new_mask, -0.25, 0.0).astype(np.float32)
        return Rollout(
            tokens=jnp.asarray(np.concatenate([tokens, new], 1)),
            token_mask=jnp.asarray(np.concatenate([mask, new_mask], 1)),
            response_mask=jnp.asarray(np.concatenate([np.zeros_like(mask), new_mask], 1)),
            sampling_logp=jnp.asarray(np.concatenate([np.zeros(mask.shape, np.float32), logp], 1)),
        )

    return generate_fn


def run_script(script: dict[str, list[str]], budget: int = 48):
    problems = list(script)
    tokens, mask = tool_use.encode_prompts([ToolUseTask().make_problem(*p) for p in problems], 11)
    prompt_of = {ToolUseTask().make_problem(*p).prompt: script[p] for p in problems}
    rollout_fn = tool_use.make_rollout_fn(generate_fn=scripted_generate(lambda prompt: prompt_of[prompt]))
    config = SamplingConfig(max_new_tokens=budget, stop_ids=(VOCAB.eos_id,), pad_id=VOCAB.pad_id)
    rollout = rollout_fn(None, tokens, mask, jax.random.key(0), config)
    return tokens, mask, rollout


def pieces(rollout, row, prompt_length=11):
    """The response of a row as (text, from_model) runs."""
    ids = np.asarray(rollout.tokens[row, prompt_length:])
    real = np.asarray(rollout.token_mask[row, prompt_length:])
    by_model = np.asarray(rollout.response_mask[row, prompt_length:])
    assert not (by_model & ~real).any()
    assert real[: real.sum()].all(), "response tokens are contiguous"
    runs = []
    for token, model_token in zip(ids[real], by_model[real]):
        char = VOCAB.decode([token])
        if runs and runs[-1][1] == model_token:
            runs[-1][0] += char
        else:
            runs.append([char, model_token])
    return [tuple(r) for r in runs]


def test_rollout_inserts_tool_outputs_as_context_only():
    script = {
        ("look", "k", "*", 7): ["[look:k]", "[calc:35*7]", ">245$"],
        ("conv", 5, "km", "m"): ["[conv:5,km,m]", ">5000$"],
        ("look2", "k", "+", "q"): ["[look:k]", "[look:q]", "[calc:35+79]", ">114$"],
    }
    tokens, mask, rollout = run_script(script)
    assert rollout.tokens.shape == (3, 11 + 48)
    np.testing.assert_array_equal(rollout.tokens[:, :11], tokens)
    np.testing.assert_array_equal(rollout.token_mask[:, :11], mask)
    assert not np.asarray(rollout.response_mask[:, :11]).any()
    assert pieces(rollout, 0) == [("[look:k]", True), ("=35", False), ("[calc:35*7]", True), ("=245", False),
                                  (">245<eos>", True)]
    assert pieces(rollout, 1) == [("[conv:5,km,m]", True), ("=5000", False), (">5000<eos>", True)]
    assert [p for p in pieces(rollout, 2) if not p[1]] == [("=35", False), ("=79", False), ("=114", False)]
    # Sampling log-probs only at model tokens.
    np.testing.assert_array_equal(np.asarray(rollout.sampling_logp) != 0, np.asarray(rollout.response_mask))
    for row, problem in enumerate(script):
        problem = ToolUseTask().make_problem(*problem)
        transcript = "".join(t for t, _ in pieces(rollout, row)).removesuffix("<eos>")
        assert transcript == problem.solution and check_response(problem, transcript).calls_exact


def test_bad_calls_become_error_messages_in_context():
    script = {
        ("calc", 12, "*", 70): ["[calk:12*70]", "[calc:12**70]", "12*70]", "[calc:12*70[calc:12*70]", "[calc:12*70]",
                                ">840$"],
    }
    _, _, rollout = run_script(script, budget=110)
    runs = pieces(rollout, 0)
    tool_runs = [text for text, model in runs if not model]
    assert tool_runs == ["=err:tool", "=err:args", "=err:form", "=err:form", "=840"]
    # An unclosed call does not end the turn; the turn runs on to the next "]" and is rejected whole.
    assert runs[6] == ("[calc:12*70[calc:12*70]", True)
    transcript = "".join(t for t, _ in runs).removesuffix("<eos>")
    check = check_response(ToolUseTask().make_problem("calc", 12, "*", 70), transcript)
    assert check.answer_correct and not check.calls_valid


def test_rollout_budget_and_turns_that_never_stop():
    script = {
        ("calc", 99, "*", 99): ["[calc:99*99]"],  # calls forever
        ("calc", 11, "+", 11): ["1" * 200],  # never stops a turn
        ("calc", 12, "+", 12): ["[calc:12+12]", ">24$"],
    }
    _, _, rollout = run_script(script, budget=31)
    real = np.asarray(rollout.token_mask[:, 11:]).sum(1)
    by_model = np.asarray(rollout.response_mask[:, 11:]).sum(1)
    assert real[0] == 31  # the budget holds model tokens and tool outputs together (12 + 5 + 12 + 2)
    runs = pieces(rollout, 0)
    assert runs[-1] == ("=9", False)  # the last tool output is cut at the budget
    assert (real[1], by_model[1]) == (31, 31) and len(pieces(rollout, 1)) == 1
    assert pieces(rollout, 2)[-1] == (">24<eos>", True) and real[2] == len("[calc:12+12]=24>24") + 1


def test_rows_finishing_at_different_turns_in_buckets():
    task = ToolUseTask()
    problems = task.sample_problems(3, 21)
    script = {}
    for p in problems:
        turns = [text for text, model in tool_use.transcript_segments(p) if model]
        script[p.prompt] = turns[:-1] + [turns[-1] + EOS]
    tokens, mask = tool_use.encode_prompts(problems, 11)
    rollout_fn = tool_use.make_rollout_fn(generate_fn=scripted_generate(lambda prompt: script[prompt]))
    rollout = rollout_fn(None, tokens, mask, jax.random.key(0), SamplingConfig(48, stop_ids=(VOCAB.eos_id,)))
    for row, p in enumerate(problems):
        transcript = "".join(t for t, _ in pieces(rollout, row)).removesuffix("<eos>")
        assert transcript == p.solution


# ------------------------------------------------------------------------------------------
# Masking: tool outputs get no advantage and no gradient; the teacher sees the student's context


def _tiny_models():
    student = models.Decoder(TINY, rngs=nnx.Rngs(0))
    teacher = models.Decoder(TINY, rngs=nnx.Rngs(1))
    teacher.embedding[...] = teacher.embedding[...] * 20  # far from the student: large log-ratios
    return student, teacher


@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl", "js"])
@pytest.mark.parametrize("estimator", ["stop_grad", "opd_plus"])
@pytest.mark.parametrize("gamma, level", [(0.0, "token"), (1.0, "token"), (0.0, "sequence")])
def test_tool_outputs_get_no_advantage_and_no_gradient(divergence, estimator, gamma, level):
    script = {
        ("look", "k", "*", 7): ["[look:k]", "[calc:35*7]", ">245$"],
        ("calc", 12, "*", 70): ["[calk:12*70]", "[calc:12*70]", ">840$"],
    }
    _, _, rollout = run_script(script)
    tool_positions = np.array(rollout.token_mask & ~rollout.response_mask)
    tool_positions[:, :11] = False
    assert tool_positions.sum() == len("=35=245") + len("=err:tool=840")
    student, teacher = _tiny_models()
    config = train.TrainConfig(divergence=divergence, estimator=estimator, gamma=gamma, level=level)
    graphdef, params = nnx.split(student)
    teacher_logp = token_log_probs(teacher, rollout.tokens, rollout.token_mask)
    old_logp = token_log_probs(student, rollout.tokens, rollout.token_mask)
    assert np.all(np.asarray(teacher_logp)[tool_positions] != 0)  # the teacher did score them

    def advantages_for(teacher_logp):
        # The training loop's own advantage function.
        return step.config_advantage_fn(config)(old_logp, teacher_logp, rollout.response_mask)

    def loss(logp, advantages):
        return importance_surrogate(logp, old_logp, advantages, rollout.response_mask).sum()

    advantages = advantages_for(teacher_logp)
    if advantages.ndim == 2:
        assert np.all(np.asarray(advantages)[tool_positions] == 0)
    grad_logp = np.asarray(jax.grad(loss)(old_logp, advantages))
    assert np.all(grad_logp[tool_positions] == 0) and np.all(grad_logp[:, :11] == 0)
    assert np.count_nonzero(grad_logp[np.asarray(rollout.response_mask)]) > 0

    # Whatever the teacher says about tool outputs cannot change the update.
    perturbed = jnp.where(tool_positions, teacher_logp - 7.0, teacher_logp)
    advantages_perturbed = advantages_for(perturbed)
    np.testing.assert_array_equal(np.asarray(advantages_perturbed), np.asarray(advantages))

    if not (divergence == "forward_kl" and estimator == "opd_plus") and level != "sequence":
        return  # the parameter gradients (slow on CPU) are checked on a subset of the cases

    def param_loss(params, advantages):
        logp = token_log_probs(nnx.merge(graphdef, params), rollout.tokens, rollout.token_mask)
        return loss(logp, advantages)

    grads = jax.grad(param_loss)(params, advantages)
    grads_perturbed = jax.grad(param_loss)(params, advantages_perturbed)
    jax.tree.map(np.testing.assert_array_equal, grads, grads_perturbed)
    assert sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(grads)) > 0


def test_rollout_tokens_reproduce_the_context_the_student_sampled_in():
    """Re-scoring the final tokens/mask gives the log-probs the student sampled with, turn after
    turn, so a teacher fed the same tokens/mask scores exactly the context the student saw."""
    student, _ = _tiny_models()
    problems = ToolUseTask().sample_problems(5, 8)
    tokens, mask = tool_use.encode_prompts(problems, 11)
    # A random student rarely writes a complete call: script the first turn, sample the rest.
    from opd_jax.sampling import generate

    def first_turn_scripted(model, tokens, mask, key, config):
        context = [VOCAB.decode(np.asarray(t)[np.asarray(m)]) for t, m in zip(tokens, mask)]
        if all("]" not in c for c in context):
            return scripted_generate(lambda prompt: ["[look:k]"])(model, tokens, mask, key, config)
        return generate(model, tokens, mask, key, config)

    rollout_fn = tool_use.make_rollout_fn(generate_fn=first_turn_scripted)
    config = SamplingConfig(40, temperature=1.0, stop_ids=(VOCAB.eos_id,), pad_id=VOCAB.pad_id)
    rollout = rollout_fn(student, tokens, mask, jax.random.key(1), config)
    scripted_turn = np.zeros(rollout.tokens.shape, bool)
    scripted_turn[:, 11 : 11 + len("[look:k]")] = True
    sampled = np.asarray(rollout.response_mask) & ~scripted_turn
    assert sampled.sum() > 8 * 5
    assert np.asarray(rollout.token_mask & ~rollout.response_mask)[:, 11:].sum() >= 8 * 3  # the "=35" outputs
    rescored = np.asarray(token_log_probs(student, rollout.tokens, rollout.token_mask))
    np.testing.assert_allclose(rescored[sampled], np.asarray(rollout.sampling_logp)[sampled], atol=2e-4)


# ------------------------------------------------------------------------------------------
# Shipped models and training


def test_shipped_models_teacher_beats_student():
    teacher, teacher_config = models.from_pretrained(tool_use.toy_model_path("teacher"))
    student, _ = models.from_pretrained(tool_use.toy_model_path("student"))
    assert teacher_config.vocab_size == len(VOCAB) and teacher_config.max_position_embeddings >= 11 + 2 * 49
    tool_use.ToyToolUse().tokenizer()  # the shipped tokenizer matches the Vocabulary (raises otherwise)
    problems = tool_use.toy_task().sample_problems(7, 64, split="test")
    good = tool_use.evaluate(teacher, problems, batch_size=64)
    weak = tool_use.evaluate(student, problems, batch_size=64)
    assert good.accuracy >= 0.85 and good.call_validity >= 0.9
    assert weak.accuracy <= 0.6 and good.accuracy >= weak.accuracy + 0.3
    for problem, transcript, check in zip(problems, good.transcripts, good.checks):
        assert check == check_response(problem, transcript)
    with pytest.raises(ValueError, match="role"):
        tool_use.toy_model_path("assistant")


def test_train_end_to_end_with_the_tool_rollout(tmp_path):
    setup = tool_use.ToyToolUse().setup(train_problems=64, eval_problems=16)
    seen = []

    def recording_rollout(*args):
        rollout = setup.rollout_fn(*args)
        seen.append(rollout)
        return rollout

    config = train.TrainConfig(divergence="forward_kl", estimator="opd_plus", prompts_per_step=4, group_size=2,
                               max_new_tokens=setup.max_new_tokens, learning_rate=3e-4, steps=2,
                               checkpoint_every=2)
    result = train.train(config, setup.student, setup.student_config, setup.teacher, setup.prompts, tmp_path / "run",
                         stop_ids=setup.stop_ids, pad_id=setup.pad_id, rollout_fn=recording_rollout,
                         evaluate=setup.evaluate, progress=False)
    assert len(seen) == 2
    steps = [r for r in result.history if "teacher_kl" in r]
    evals = [r for r in result.history if "eval_accuracy" in r]
    assert [r["step"] for r in steps] == [1, 2] and len(evals) == 2
    assert {"eval_call_validity", "eval_teacher_kl", "eval_response_length"} <= set(evals[0])
    rollout = seen[0]
    prompt_length = setup.prompts.tokens.shape[1]
    assert np.asarray(rollout.token_mask & ~rollout.response_mask)[:, prompt_length:].any()
    # The logged teacher-KL of step 1 is the teacher scoring the rollout's own tokens and mask
    # (tool outputs included as context); scoring with the tool outputs dropped gives another value.
    start, _ = models.from_pretrained(tool_use.toy_model_path("student"))
    student_logp = token_log_probs(start, rollout.tokens, rollout.token_mask)
    teacher_logp = token_log_probs(setup.teacher, rollout.tokens, rollout.token_mask)
    mask = rollout.response_mask
    kl = float(jnp.sum(jnp.where(mask, student_logp - teacher_logp, 0)) / jnp.sum(mask))
    assert steps[0]["teacher_kl"] == pytest.approx(kl, rel=1e-4, abs=1e-5)
    in_prompt = jnp.arange(rollout.tokens.shape[1])[None, :] < prompt_length
    without_tools = token_log_probs(setup.teacher, rollout.tokens, rollout.token_mask & (in_prompt | mask))
    kl_without = float(jnp.sum(jnp.where(mask, student_logp - without_tools, 0)) / jnp.sum(mask))
    assert abs(kl_without - kl) > 1e-3
    assert (result.output_dir / "student" / "model.safetensors").is_file()
    assert all(np.isfinite(r["loss"]) for r in steps)


def test_the_registered_task_gives_the_setup_the_grid_needs():
    from opd_jax import tasks

    task = tasks.get_task("tool_use")
    assert isinstance(task, tasks.Task) and task.name == "tool_use"
    setup = task.setup(train_problems=32, eval_problems=8)
    assert isinstance(setup, tasks.TaskSetup) and setup.name == "tool_use"
    assert setup.prompts.tokens.shape == (32, ToolUseTask().max_prompt_length)
    assert setup.stop_ids == (VOCAB.eos_id,) and setup.pad_id == VOCAB.pad_id
    assert setup.max_new_tokens == ToolUseTask().max_response_length + 4
    assert setup.prompts.tokens.shape[1] + 2 * setup.max_new_tokens <= setup.student.config.max_position_embeddings
    assert task.model_path("teacher") == tool_use.toy_model_path("teacher")
    train_prompts = {p.prompt for p in task.problems("train", 200, 0)}
    held_out = task.problems("test", 50, 1)
    assert not train_prompts & {p.prompt for p in held_out}
    assert all(task.check(p, p.solution) for p in held_out) and not task.check(held_out[0], ">-1")
    metrics = task.evaluator(setup.tokenizer, None, eval_problems=8)(setup.teacher)
    assert set(metrics) == {"accuracy", "call_validity", "call_exactness", "response_length", "transcript_length"}
    with pytest.raises(ValueError, match="does not match"):
        task.evaluator(tasks.get_task("arithmetic").tokenizer(), None)


def test_grid_script_runs_reuses_finished_runs_and_reports_references(tmp_path):
    import pathlib
    import runpy

    script = pathlib.Path(__file__).parents[1] / "experiments" / "tool_use_grid.py"
    main = runpy.run_path(str(script))["main"]
    argv = ["--out", str(tmp_path), "--divergences", "js", "--estimators", "opd_plus", "--seeds", "0", "--steps", "1",
            "--prompts-per-step", "4", "--group-size", "2", "--train-problems", "16", "--eval-problems", "8"]
    assert main(argv) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    (run,) = results["runs"]
    assert (run["variation"], run["seed"]) == ("js/opd_plus", 0)
    assert set(results["reference"]) == {"student (start)", "teacher"}
    assert results["reference"]["teacher"]["teacher_kl"] == pytest.approx(0.0, abs=1e-6)  # the teacher against itself
    assert "| js/opd_plus | 1 |" in (tmp_path / "results.md").read_text()
    assert main(argv) == 0  # the finished run is read back, not trained again
    assert json.loads((tmp_path / "results.json").read_text())["runs"] == [run]
