"""The task registry and protocol, the package's import graph, and the toy arithmetic task: generator,
worked solutions, exact checker, tokenizer, shipped models."""

import ast
import dataclasses
import doctest
import json
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given
from hypothesis import strategies as st

import opd_jax
from opd_jax import models, sampling, tasks, tokenization
from opd_jax.tasks import arithmetic, characters, tool_use
from opd_jax.tasks.arithmetic import ArithmeticTask, extract_answer, is_correct

TASKS = [
    ArithmeticTask(),
    ArithmeticTask(digits=1),
    ArithmeticTask(digits=3, operations=("-",)),
    ArithmeticTask(digits=4, operations=("+",), test_fraction=0.5),
]
HELD_OUT_SEED = 2024


def _check_steps(problem):
    """Re-derive every column of the worked solution from the operands."""
    body, marker, answer = problem.solution.partition(">")
    assert marker and answer == str(problem.answer)
    width = max(len(str(problem.a)), len(str(problem.b)))
    columns = body.split(",")
    assert len(columns) == width
    op, carry = problem.op, 0
    for position, column in enumerate(columns):
        match = re.fullmatch(rf"(\d)\{op}(\d)\{op}([01])=([01])(\d)", column)
        assert match, column
        x, y, carry_in, carry_out, digit = map(int, match.groups())
        assert x == problem.a // 10**position % 10 and y == problem.b // 10**position % 10
        assert carry_in == carry
        value = x + y + carry_in if op == "+" else x - y - carry_in
        assert value == (10 * carry_out + digit if op == "+" else digit - 10 * carry_out)
        carry = carry_out


@pytest.mark.parametrize("task", TASKS, ids=lambda t: f"{t.digits}{''.join(t.operations)}")
def test_worked_solutions_are_correct_and_accepted(task):
    problems = task.sample_problems(0, 400)
    for problem in problems:
        assert problem.answer == (problem.a + problem.b if problem.op == "+" else problem.a - problem.b)
        assert problem.prompt == f"{problem.a}{problem.op}{problem.b}="
        assert problem.answer >= 0 and problem.op in task.operations
        low = 0 if task.digits == 1 else 10 ** (task.digits - 1)
        assert low <= min(problem.a, problem.b) and max(problem.a, problem.b) < 10**task.digits
        _check_steps(problem)
        assert extract_answer(problem.solution) == problem.answer
        assert is_correct(problem, problem.solution)
        assert len(problem.prompt) <= task.max_prompt_length
        assert len(problem.solution) + 1 <= task.max_response_length  # + EOS
    assert {p.op for p in problems} == set(task.operations)


def test_edge_problems_carry_and_borrow_through_every_column():
    task = ArithmeticTask(digits=3)
    assert task.make_problem(999, "+", 1).solution == "9+1+0=10,9+0+1=10,9+0+1=10>1000"
    assert task.make_problem(100, "-", 1).solution == "0-1-0=19,0-0-1=19,1-0-1=00>99"
    assert task.make_problem(57, "-", 57).solution == "7-7-0=00,5-5-0=00>0"
    assert task.make_problem(57, "+", 68).solution == "7+8+0=15,5+6+1=12>125"


def test_generator_is_deterministic_per_seed_and_splits_are_disjoint():
    task = ArithmeticTask()
    assert task.sample_problems(7, 50) == task.sample_problems(7, 50)
    assert task.sample_problems(7, 50) != task.sample_problems(8, 50)
    rng = np.random.default_rng(3)
    first, second = task.sample_problems(rng, 10), task.sample_problems(rng, 10)
    assert first != second  # a Generator is advanced in place
    train = {p.prompt for p in task.sample_problems(1, 3000, split="train")}
    test = {p.prompt for p in task.sample_problems(2, 300, split="test")}
    assert train and test and not train & test
    assert all(task.split_of(p.a, p.op, p.b) == "test" for p in task.sample_problems(5, 50, split="test"))
    share = np.mean([task.split_of(p.a, p.op, p.b) == "test" for p in task.sample_problems(9, 4000)])
    assert 0.07 < share < 0.13
    assert task.sample_problems(0, 0) == []
    assert ArithmeticTask.from_dict(json.loads(json.dumps(task.to_dict()))) == task


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(digits=0), "digits must be an integer >= 1"),
        (dict(digits=-2), "digits must be an integer >= 1"),
        (dict(digits=2.0), "digits must be an integer >= 1"),
        (dict(digits=True), "digits must be an integer >= 1"),
        (dict(operations=()), "operations must be distinct symbols"),
        (dict(operations=("*",)), "operations must be distinct symbols"),
        (dict(operations=("+", "+")), "operations must be distinct symbols"),
        (dict(operations="+-"), "not the string"),
        (dict(test_fraction=0.0), "test_fraction must be in"),
        (dict(test_fraction=1.0), "test_fraction must be in"),
    ],
)
def test_bad_task_configs_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ArithmeticTask(**kwargs)


def test_bad_sampling_arguments_are_named():
    task = ArithmeticTask()
    with pytest.raises(ValueError, match="n must be an integer >= 0"):
        task.sample_problems(0, -1)
    with pytest.raises(ValueError, match="split must be"):
        task.sample_problems(0, 3, split="validation")
    tiny = ArithmeticTask(digits=1, operations=("-",), test_fraction=0.001)  # 55 problems, none in test
    assert not any(tiny.split_of(a, "-", b) == "test" for a in range(10) for b in range(a + 1))
    with pytest.raises(ValueError, match="'test' split of .* looks empty"):
        tiny.sample_problems(0, 1, split="test")
    with pytest.raises(ValueError, match="subtraction needs a >= b"):
        task.make_problem(3, "-", 5)
    with pytest.raises(ValueError, match="unknown operation"):
        task.make_problem(3, "*", 5)


def test_checker_rejects_wrong_and_malformed_answers():
    problem = ArithmeticTask().make_problem(57, "+", 68)
    body = problem.solution.rpartition(">")[0]
    assert is_correct(problem, ">125") and extract_answer("junk>125") == 125
    for response in [
        body + ">124", body + ">-125", body + ">0125", body + ">125 ", body + "> 125", body + ">12>125",
        body + ">125<pad>", body + ">", body, "125", "", "   ", ">>", ">-", ">-0", ">+125", ">1e3", ">١٢٥",
    ]:
        assert not is_correct(problem, response), response
    assert extract_answer(">-7") == -7 and extract_answer(">0") == 0 and extract_answer(">-0") is None
    assert extract_answer(None) is None and not is_correct(problem, None)


@given(st.text(max_size=40))
def test_checker_never_raises(text):
    problem = ArithmeticTask().make_problem(12, "-", 3)
    assert isinstance(is_correct(problem, text), bool)
    answer = extract_answer(text)
    assert answer is None or text.partition(">")[2] == str(answer)


@pytest.fixture(scope="module")
def tokenizer():
    return arithmetic.build_tokenizer()


def test_tokenizer_round_trips_every_character(tokenizer, tmp_path):
    assert len(tokenizer) == len(arithmetic.SPECIAL_TOKENS) + len(arithmetic.ALPHABET)
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert tokenizer.bos_token_id is None and not getattr(tokenizer, "chat_template", None)
    texts = [p.prompt + p.solution for task in TASKS for p in task.sample_problems(1, 100)]
    texts.append(arithmetic.ALPHABET)
    encoded = tokenizer(texts, add_special_tokens=True)["input_ids"]
    for text, ids in zip(texts, encoded):
        assert len(ids) == len(text) and tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids) == text
    assert tokenizer.encode("7?") == [tokenizer.convert_tokens_to_ids("7"), tokenizer.unk_token_id]
    assert tokenizer.decode([*tokenizer.encode("12"), tokenizer.eos_token_id]) == "12<eos>"

    tokenizer.save_pretrained(tmp_path)
    loaded = tokenization.load_tokenizer(tmp_path)
    assert loaded.encode(texts[0]) == encoded[0] and loaded.get_vocab() == tokenizer.get_vocab()
    assert (loaded.pad_token_id, loaded.eos_token_id) == (0, 1)
    prompts = ["57+68=", "3-2="]
    for use_chat_template in (False, True):
        tokens, mask = tokenization.encode_prompts(loaded, prompts, max_length=8, use_chat_template=use_chat_template)
        for row, prompt in enumerate(prompts):
            assert tokens[row][mask[row]].tolist() == tokenizer.encode(prompt)
            assert mask[row, -1] and np.all(tokens[row][~mask[row]] == tokenizer.pad_token_id)


# --- the shipped toy models -------------------------------------------------------------------


@pytest.fixture(scope="module")
def shipped():
    loaded = {}
    for role in ("teacher", "student"):
        folder = arithmetic.toy_model_path(role)
        model, config = models.from_pretrained(folder)
        loaded[role] = (model, config, tokenization.load_tokenizer(folder))
    return loaded


@pytest.fixture(scope="module")
def held_out():
    return arithmetic.toy_task().sample_problems(HELD_OUT_SEED, 64, split="test")


def test_shipped_assets_are_small_and_consistent(shipped, tokenizer):
    # Every shipped toy model (arithmetic, its vLLM variant, tool use, the digit-pair teacher) is float32
    # and under 1.3 MB; the package stays small.
    total = sum(f.stat().st_size for f in arithmetic.ASSETS_DIR.rglob("*") if f.is_file())
    assert total < 7_000_000
    metadata = json.loads((arithmetic.ASSETS_DIR / "metadata.json").read_text())
    assert arithmetic.toy_task() == ArithmeticTask.from_dict(metadata["task"])
    (_, teacher_config, teacher_tok), (_, student_config, student_tok) = shipped["teacher"], shipped["student"]
    tokenization.check_compatible(teacher_tok, student_tok, teacher_config, student_config)
    for config, loaded in ((teacher_config, teacher_tok), (student_config, student_tok)):
        assert loaded.get_vocab() == tokenizer.get_vocab()
        assert config.vocab_size == len(tokenizer) and config.eos_token_id == (tokenizer.eos_token_id,)
        assert config.pad_token_id == tokenizer.pad_token_id
    assert student_config.num_layers * student_config.hidden_size < teacher_config.num_layers * teacher_config.hidden_size
    for role in ("teacher", "student"):
        assert metadata["models"][role]["held_out"]["greedy_mean_response_length"] <= 24


def test_shipped_teacher_is_strong_and_student_weak_on_held_out_problems(shipped, held_out):
    teacher, _, tok = shipped["teacher"]
    student, _, _ = shipped["student"]
    budget = arithmetic.toy_task().max_response_length + 2
    teacher_result = arithmetic.evaluate(teacher, tok, held_out, max_new_tokens=budget, batch_size=64)
    student_result = arithmetic.evaluate(student, tok, held_out, max_new_tokens=budget, batch_size=64)
    assert teacher_result.accuracy >= 0.9, teacher_result.accuracy
    assert 0.05 <= student_result.accuracy <= 0.5, student_result.accuracy
    # The student's mistakes are arithmetic, not format: it stops and writes an answer.
    assert student_result.finished.mean() >= 0.9
    for result in (teacher_result, student_result):
        assert result.correct.shape == result.finished.shape == result.response_lengths.shape == (64,)
        assert 18 <= result.mean_response_length <= 24
        assert np.all(result.correct <= result.finished)
        assert result.accuracy == pytest.approx(np.mean([is_correct(p, r) for p, r in zip(held_out, result.responses)]))
    # A partly filled last batch gives the same greedy responses as one full batch.
    split = arithmetic.evaluate(student, tok, held_out, max_new_tokens=budget, batch_size=48)
    assert split.responses == student_result.responses


def test_evaluate_counts_unfinished_responses_wrong_and_checks_input(shipped, held_out):
    teacher, _, tok = shipped["teacher"]
    truncated = arithmetic.evaluate(teacher, tok, held_out[:8], max_new_tokens=6, batch_size=8)
    assert truncated.accuracy == 0.0 and not truncated.finished.any()
    assert np.all(truncated.response_lengths == 6)
    sampled = arithmetic.evaluate(
        teacher, tok, held_out[:8], max_new_tokens=24, batch_size=8, key=jax.random.key(1), temperature=1.0
    )
    assert sampled.accuracy >= 0.5
    with pytest.raises(ValueError, match="at least one problem"):
        arithmetic.evaluate(teacher, tok, [], max_new_tokens=24)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        arithmetic.evaluate(teacher, tok, held_out, max_new_tokens=24, batch_size=0)
    with pytest.raises(ValueError, match="exceeds the model's max_position_embeddings"):
        arithmetic.evaluate(teacher, tok, held_out[:2], max_new_tokens=1000)
    with pytest.raises(ValueError, match="role must be"):
        arithmetic.toy_model_path("assistant")


# --- the registry, the Task protocol, the import graph ----------------------------------------


def test_registry_names_tasks_and_refuses_unknown_taken_and_incomplete_ones():
    assert tasks.task_names() == ("arithmetic", "arithmetic_vllm", "tool_use", "tool_use_vllm",
                                  "arithmetic_cross_tokenizer")
    assert tasks.get_task("arithmetic") is tasks.TASKS["arithmetic"]
    assert all(isinstance(task, tasks.Task) and task.name == name for name, task in tasks.TASKS.items())
    with pytest.raises(ValueError, match="unknown task 'chess'; registered: arithmetic, arithmetic_vllm, tool_use, "
                                         "tool_use_vllm, arithmetic_cross_tokenizer"):
        tasks.get_task("chess")
    with pytest.raises(ValueError, match="'arithmetic' is already registered"):
        tasks.register_task("arithmetic", tasks.get_task("tool_use"))
    with pytest.raises(ValueError,
                       match=r"not a Task: it lacks \['check', 'demo', 'evaluator', 'model_path', 'problems'"):
        tasks.register_task("half", type("Half", (), {"name": "half", "tokenizer": None, "setup": None})())
    with pytest.raises(ValueError, match="non-empty string"):
        tasks.register_task("", tasks.get_task("arithmetic"))
    with pytest.raises(TypeError):
        tasks.TASKS["mine"] = tasks.get_task("arithmetic")  # read-only
    assert tasks.task_names() == ("arithmetic", "arithmetic_vllm", "tool_use", "tool_use_vllm",
                                  "arithmetic_cross_tokenizer")
    assert doctest.testmod(tasks).failed == 0


def test_arithmetic_task_gives_the_setup_the_grid_needs():
    task = tasks.get_task("arithmetic")
    setup = task.setup(train_problems=32, eval_problems=16)
    assert isinstance(setup, tasks.TaskSetup) and setup.name == "arithmetic"
    toy = arithmetic.toy_task()
    assert setup.prompts.tokens.shape == setup.prompts.mask.shape == (32, toy.max_prompt_length)
    assert (setup.stop_ids, setup.pad_id, setup.max_new_tokens) == ((1,), 0, toy.max_response_length + 2)
    assert setup.rollout_fn is sampling.generate
    assert task.model_path("student") == arithmetic.toy_model_path("student")
    assert task.tokenizer().get_vocab() == arithmetic.build_tokenizer().get_vocab()
    train_prompts = {p.prompt for p in task.problems("train", 500, 0)}
    held_out = task.problems("test", 50, 1)
    assert not train_prompts & {p.prompt for p in held_out}
    assert all(task.check(p, p.solution) for p in held_out) and not task.check(held_out[0], ">-1")
    metrics = setup.evaluate(setup.teacher)
    assert set(metrics) == {"accuracy", "response_length", "teacher_kl"} and metrics["accuracy"] >= 0.9
    assert metrics["teacher_kl"] == pytest.approx(0.0, abs=1e-6)  # the teacher against itself
    assert set(task.evaluator(setup.tokenizer, None, eval_problems=8)(setup.student)) == {"accuracy", "response_length"}


SHIPPED_TOKENIZERS = [
    (arithmetic.build_tokenizer, arithmetic.ASSETS_DIR / "student"),
    (arithmetic.build_tokenizer, arithmetic.ASSETS_DIR / "teacher"),
    (arithmetic.build_tokenizer, arithmetic.VLLM_ASSETS_DIR / "student"),
    (arithmetic.build_tokenizer, arithmetic.VLLM_ASSETS_DIR / "teacher"),
    (tool_use.build_tokenizer, tool_use.ASSETS_DIR / "student"),
    (tool_use.build_tokenizer, tool_use.ASSETS_DIR / "teacher"),
]


@pytest.mark.parametrize("build, folder", SHIPPED_TOKENIZERS,
                         ids=[str(folder.relative_to(arithmetic.ASSETS_DIR)) for _, folder in SHIPPED_TOKENIZERS])
def test_the_tasks_one_character_tokenizer_builds_the_shipped_tokenizer_files(build, folder, tmp_path):
    # The shipped checkpoints depend on these ids: the shared construction must write the same files.
    build().save_pretrained(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert json.loads((tmp_path / name).read_text()) == json.loads((folder / name).read_text()), name
    shipped = tokenization.load_tokenizer(folder)
    alphabet = arithmetic.ALPHABET if build is arithmetic.build_tokenizer else tool_use.ALPHABET
    vocabulary = characters.CharacterVocabulary(alphabet)
    assert shipped.get_vocab() == {token: i for i, token in enumerate(vocabulary.tokens)}
    assert shipped(alphabet + "~", add_special_tokens=True)["input_ids"] == vocabulary.encode(alphabet + "~")
    vocabulary.check_tokenizer(shipped, "this")


def test_character_vocabulary_ids_and_bad_alphabets():
    vocabulary = characters.CharacterVocabulary("ab")
    assert (vocabulary.pad_id, vocabulary.eos_id, vocabulary.unk_id, len(vocabulary)) == (0, 1, 2, 5)
    assert vocabulary.encode("ba?") == [4, 3, 2] and vocabulary.decode([3, 1, 0, 2]) == "a<eos><pad><unk>"
    with pytest.raises(ValueError, match=r"distinct; repeated: \['a'\]"):
        characters.CharacterVocabulary("aba")
    with pytest.raises(ValueError, match="non-empty string"):
        characters.CharacterVocabulary("")
    with pytest.raises(ValueError, match="does not match the arithmetic task"):
        characters.CharacterVocabulary(arithmetic.ALPHABET).check_tokenizer(tool_use.build_tokenizer(), "arithmetic")


def test_the_demo_settings_live_on_the_registered_tasks():
    arithmetic_task, vllm_task, tool_task = (tasks.get_task(n) for n in ("arithmetic", "arithmetic_vllm", "tool_use"))
    assert isinstance(arithmetic_task.demo, tasks.DemoSettings)
    assert arithmetic_task.demo.config == tasks.DEMO_CONFIG and arithmetic_task.demo.output_folder("arithmetic") == (
        pathlib.Path("runs/demo"))
    assert vllm_task.demo.config == dataclasses.replace(tasks.DEMO_CONFIG, rollout_backend="vllm")
    assert vllm_task.demo.output_folder("arithmetic_vllm") == pathlib.Path("runs/demo-arithmetic_vllm")
    assert tool_task.demo is tool_use.DEMO and tool_task.demo.output_folder("tool_use") == pathlib.Path(
        "runs/demo-tool_use")
    assert (tool_task.demo.config.steps, tool_task.demo.config.prompts_per_step) == (40, 32)
    assert ("call_validity", "call validity") in tool_task.demo.columns
    assert ("call_validity", "call validity") not in arithmetic_task.demo.columns
    # A task without its own output folder gets one named after it.
    assert tasks.DemoSettings().output_folder("chess") == pathlib.Path("runs/demo-chess")


def _tiny(seed):
    config = models.DecoderConfig("qwen3", 24, 32, 48, 1, 4, 2, 8, max_position_embeddings=32)
    return models.Decoder(config, rngs=nnx.Rngs(seed))


def test_teacher_kl_is_the_mean_log_ratio_over_response_tokens():
    student, teacher = _tiny(0), _tiny(1)
    tokens = jnp.tile(jnp.arange(3, 8)[None], (16, 1))
    mask = jnp.ones_like(tokens, bool)
    key = jax.random.key(7)
    kwargs = dict(max_new_tokens=6, stop_ids=(1,), pad_id=0)
    assert tasks.teacher_kl(student, student, tokens, mask, key, **kwargs) == pytest.approx(0.0, abs=1e-6)
    # The same samples scored independently by both models' full forward passes.
    rollout = sampling.generate(student, tokens, mask, key, sampling.SamplingConfig(temperature=1.0, **kwargs))
    gap = sampling.score(student, rollout.tokens, rollout.token_mask) - sampling.score(
        teacher, rollout.tokens, rollout.token_mask)
    expected = float(jnp.sum(jnp.where(rollout.response_mask, gap, 0.0)) / jnp.sum(rollout.response_mask))
    assert tasks.teacher_kl(student, teacher, tokens, mask, key, **kwargs) == pytest.approx(expected, rel=1e-5)


def _import_graph(package: pathlib.Path) -> dict[str, set[str]]:
    """``module -> the opd_jax modules it imports``, from the source: every ``import`` statement,
    function-level ones included (a lazy import still makes the lower module depend on the upper).
    ``from opd_jax.x import y`` counts as importing ``opd_jax.x.y`` when that is a module."""

    def name_of(path):
        parts = path.relative_to(package.parent).with_suffix("").parts
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

    modules = {name_of(path): path for path in package.rglob("*.py")}

    def module_of(name):  # the innermost module that defines ``name``
        while name not in modules:
            name = name.rpartition(".")[0]
        return name

    graph = {}
    for name, path in modules.items():
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {module_of(a.name) for a in node.names if a.name.split(".")[0] == "opd_jax"}
            elif isinstance(node, ast.ImportFrom):
                base = node.module
                if node.level:  # relative: from the package of this module, level - 1 packages up
                    parts = here.split(".")[: len(here.split(".")) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                if base.split(".")[0] == "opd_jax":
                    targets |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else module_of(base)
                                for a in node.names}
        graph[name] = targets - {name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (as a path that returns to its start), or ``None``."""
    state: dict[str, str] = {}  # "open" while on the current path, then "done"
    path: list[str] = []

    def visit(node):
        state[node] = "open"
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return path[path.index(target) :] + [target]
            if target not in state and (found := visit(target)):
                return found
        state[node] = "done"
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_package_has_no_import_cycle_and_tasks_do_not_import_the_demo():
    graph = _import_graph(pathlib.Path(opd_jax.__file__).parent)
    assert {"opd_jax.demo", "opd_jax.rollouts", "opd_jax.tasks", "opd_jax.tasks.tool_use.environment"} <= set(graph)
    assert "opd_jax.tasks.base" in graph["opd_jax.demo"] and "opd_jax.rollouts" in graph["opd_jax.tasks.tool_use.environment"]
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))
    below_the_loop = {name for name in graph if name.startswith("opd_jax.tasks")} | {"opd_jax.rollouts"}
    for name in below_the_loop:
        assert "opd_jax.demo" not in graph[name], name
    # The command line sits on top: only it (and python -m opd_jax) imports opd_jax.commands.
    assert "opd_jax.commands.train" in graph["opd_jax.commands"]
    library = {name for name in graph if not name.startswith("opd_jax.commands")} - {"opd_jax.__main__"}
    for name in library:
        assert not {target for target in graph[name] if target.startswith("opd_jax.commands")}, name


def test_the_import_graph_check_sees_lazy_and_relative_imports(tmp_path):
    package = tmp_path / "opd_jax"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("from opd_jax import low\n")
    (package / "low.py").write_text("import numpy\n\ndef f():\n    from opd_jax.sub import high\n")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "high.py").write_text("from .. import low\nfrom . import mid\nfrom opd_jax.low import f\n")
    (package / "sub" / "mid.py").write_text("from ..sub.high import g\n")
    graph = _import_graph(package)
    assert graph == {"opd_jax": {"opd_jax.low"}, "opd_jax.low": {"opd_jax.sub.high"}, "opd_jax.sub": set(),
                     "opd_jax.sub.high": {"opd_jax.low", "opd_jax.sub.mid"}, "opd_jax.sub.mid": {"opd_jax.sub.high"}}
    assert _cycle(graph) == ["opd_jax.low", "opd_jax.sub.high", "opd_jax.low"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
