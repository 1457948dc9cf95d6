"""Issue 28 item 6: generated prompt files and config files fed to the checks ``opd-jax train`` runs
before it writes. Each input either passes or raises :class:`~opd_jax.errors.InputError`, never any
other exception, and a refused run leaves its folder's bytes as they were.

Budget: about 60 s of CI on the shared 2-core machine for the three tests together (the example
counts below; ``deadline=None`` because the first examples pay for imports and the tokenizer).
"""

import hashlib
import json
import pathlib
import shutil
import tempfile

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from opd_jax import data, divergences, launch
from opd_jax.config import SECTIONS, TrainConfig, read_config_file
from opd_jax.errors import InputError

ASSETS = pathlib.Path(__file__).resolve().parents[1] / "opd_jax" / "tasks" / "assets"
FIELDS = sorted(TrainConfig.__dataclass_fields__)
FUZZ = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# --- prompt files ----------------------------------------------------------------------------------

_text = st.text(st.characters(codec="utf-8"), max_size=30) | st.sampled_from(["3+4=", "12+30=", "what is 1+1?", ""])
_json_scalar = st.none() | st.booleans() | st.integers() | st.floats() | _text
_json = st.recursive(_json_scalar, lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(_text | st.sampled_from(["prompt", "messages", "teacher", "role", "content"]),
                                       inner, max_size=3), max_leaves=8)
_message = st.fixed_dictionaries({"role": _json | st.sampled_from(["user", "system"]), "content": _json | _text})
_record = st.one_of(
    st.fixed_dictionaries({"prompt": _json | _text}, optional={"teacher": _json | st.sampled_from(["a", "b"]),
                                                                "answer": _json}),
    st.fixed_dictionaries({"messages": st.lists(_message, max_size=3) | _json},
                          optional={"teacher": st.sampled_from(["a", "b", "c"])}),
    _json,
)
_escaped = st.booleans()  # JSON with \uXXXX escapes (ensure_ascii) or raw UTF-8


@st.composite
def _line(draw) -> bytes:
    kind = draw(st.sampled_from(["json", "json", "json", "bytes", "blank", "surrogate", "long"]))
    if kind == "bytes":
        return draw(st.binary(max_size=40)).replace(b"\n", b" ")
    if kind == "blank":
        return draw(st.sampled_from([b"", b" ", b"\t", b"\r"]))
    if kind == "surrogate":
        return b'{"prompt": "a\\ud8' + draw(st.sampled_from([b"00", b"3d", b"3d\\ude00"])) + b'"}'
    if kind == "long":
        return b'{"prompt": "' + b"1" * draw(st.integers(0, 3000)) + b'"}'
    text = json.dumps(draw(_record), ensure_ascii=draw(_escaped), allow_nan=True)
    return text.encode(draw(st.sampled_from(["utf-8", "utf-8", "utf-16", "latin-1", "utf-8-sig"])),
                       errors="replace")


_prompt_file = st.tuples(st.lists(_line(), max_size=6), st.sampled_from([b"\n", b"\r\n"]), st.booleans())


def _gist(error: Exception) -> str:
    """The kind of a refusal, for hypothesis's statistics (``--hypothesis-show-statistics``)."""
    text = str(error).split(": ", 1)[-1] if "/" in str(error).split(" ", 1)[0] else str(error)
    return " ".join(text.split("[", 1)[0].split()[:4])


def _write(folder: pathlib.Path, name: str, content: bytes) -> pathlib.Path:
    path = folder / name
    path.write_bytes(content)
    return path


def _content(drawn) -> bytes:
    lines, newline, final = drawn
    return newline.join(lines) + (newline if final else b"")


@settings(max_examples=1000, **FUZZ)
@given(drawn=_prompt_file, bound=st.none() | st.integers(1, 400), teachers=st.sampled_from([("a",), ("a", "b")]))
def test_prompt_reader_passes_or_raises_input_error(drawn, bound, teachers):
    with tempfile.TemporaryDirectory() as folder:
        path = _write(pathlib.Path(folder), "p.jsonl", _content(drawn))
        for read in (lambda: data.read_prompt_records(path, max_line_bytes=bound),
                     lambda: data.prompt_teachers(path, teachers, max_line_bytes=bound)):
            try:
                read()
                event("passes")
            except InputError as error:
                assert str(path) in str(error)
                event(f"InputError: {_gist(error)}")


# --- config files ----------------------------------------------------------------------------------

# No generated value names an importable module: a divergence 'module:attribute' imports it.
_safe_text = st.text(st.characters(codec="utf-8", exclude_characters=":"), max_size=12)
_value = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(-3, 300), st.floats(), st.floats(0, 2), _safe_text,
    st.sampled_from(["none", "None", "auto", *divergences.names(), "no_such_module_x:f", ".relative:f",
                     "opd_jax.divergences:names", "opd_jax.divergences:get", "token", "sequence", "opd_plus",
                     "stop_grad", "leave_one_out", "cosine", "vllm"]),
    st.lists(st.integers(), max_size=2), st.dictionaries(_safe_text, st.integers(), max_size=2),
)
_key = st.sampled_from(FIELDS) | _safe_text
_config = st.dictionaries(_key, _value, max_size=6) | st.dictionaries(
    st.sampled_from([*SECTIONS, "objective"]), st.dictionaries(_key, _value, max_size=4), max_size=3)


def _toml_value(value) -> str:
    if value is None:
        return '"none"'
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return {"inf": "inf", "-inf": "-inf", "nan": "nan"}.get(str(value), repr(value))
    if isinstance(value, (int, list)):
        return json.dumps(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {v}" for k, v in value.items()) + "}"
    return json.dumps(value)


def _toml(values: dict) -> str:
    tables = {k: v for k, v in values.items() if k in SECTIONS and isinstance(v, dict)}
    lines = [f"{json.dumps(k)} = {_toml_value(v)}" for k, v in values.items() if k not in tables]
    for section, table in tables.items():
        lines += [f"[{section}]", *(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in table.items())]
    return "\n".join(lines) + "\n"


@settings(max_examples=1000, **FUZZ)
@given(values=_config, form=st.sampled_from(["json", "toml", "json", "raw", "yaml"]), raw=st.binary(max_size=60))
def test_config_reader_and_validation_pass_or_raise_input_error(values, form, raw):
    with tempfile.TemporaryDirectory() as folder:
        if form == "json":
            path = _write(pathlib.Path(folder), "c.json", json.dumps(values).encode())
        elif form == "toml":
            path = _write(pathlib.Path(folder), "c.toml", _toml(values).encode("utf-8", "surrogatepass"))
        elif form == "yaml":
            path = _write(pathlib.Path(folder), "c.yaml", b"steps: 3\n")
        else:
            path = _write(pathlib.Path(folder), "c.toml" if raw[:1] < b"\x80" else "c.json", raw)
        try:
            TrainConfig.from_dict(read_config_file(path), source=f"{path}: ")
            event("passes")
        except InputError as error:
            assert str(path) in str(error)
            event(f"InputError: {_gist(error)}")


# --- launch.check on the toy models -----------------------------------------------------------------

@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz_models")
    for name in ("teacher", "student"):
        shutil.copytree(ASSETS / name, root / name)
    return root


def _snapshot(folder: pathlib.Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*"))}


_toy_prompt = st.text(st.sampled_from("0123456789+-=,> \n0123456789+-=,> \nab?é"), min_size=1, max_size=20)
_toy_line = st.builds(lambda p: json.dumps({"prompt": p}).encode(), _toy_prompt)


@settings(max_examples=200, **FUZZ)
@given(drawn=st.lists(st.one_of(_toy_line, _toy_line, _toy_line, _line()), min_size=1, max_size=4)
       .map(lambda lines: (lines, b"\n", True)),
       config=st.one_of(st.just({}), _config), max_prompt_length=st.integers(1, 70), allow=st.booleans())
def test_launch_check_passes_or_raises_input_error_and_writes_nothing(models, drawn, config, max_prompt_length,
                                                                      allow):
    with tempfile.TemporaryDirectory() as folder:
        folder = pathlib.Path(folder)
        prompts = _write(folder, "p.jsonl", _content(drawn))
        before = _snapshot(models), _snapshot(folder)
        try:  # responses short enough for the toy models' 64 positions, mostly
            train = TrainConfig.from_dict({**config, "max_new_tokens": 4} if "max_new_tokens" not in config else config)
        except InputError:
            train = TrainConfig(max_new_tokens=4)
        spec = launch.RunSpec(
            train=train, output=folder / "run",
            models=launch.Models(student=models / "student", teachers={"teacher": models / "teacher"}),
            data=launch.Data(prompts=prompts, max_prompt_length=max_prompt_length, allow_unknown_tokens=allow))
        try:
            launch.check(spec)
            event("passes")
        except InputError as error:
            event(f"InputError: {_gist(error)}")
        assert (_snapshot(models), _snapshot(folder)) == before
