"""TrainConfig's sections and field metadata, which the CLI is built from."""

import dataclasses
import json

import pytest

from opd_jax.commands import main
from opd_jax.config import SECTIONS, TrainConfig, flatten_sections
from opd_jax.errors import InputError


def test_every_field_has_a_section_and_help_and_a_flag_in_its_group(capsys):
    fields = dataclasses.fields(TrainConfig)
    assert all(f.metadata["section"] in SECTIONS and len(f.metadata["help"]) > 10 for f in fields)
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    positions = [text.index(f"training options: {section}") for section in SECTIONS]
    assert positions == sorted(positions)
    for field in fields:
        if field.name == "eval_every":  # not an option of opd-jax train (no evaluator)
            continue
        flag = "--" + field.name.replace("_", "-")
        section = SECTIONS.index(field.metadata["section"])
        at = text.index(flag + " ", positions[section])  # (the usage line lists every flag first)
        assert positions[section] < at < (positions[section + 1] if section + 1 < len(SECTIONS) else len(text)), flag
        assert " ".join(field.metadata["help"].split())[:30] in text


def test_config_json_is_by_section_and_reads_back_flat_or_by_section():
    config = TrainConfig(divergence="js", gamma=1.0, learning_rate=3e-4, steps=7, clip_ratio_c=3.0)
    sections = json.loads(json.dumps(config.to_json()))
    assert list(sections) == list(SECTIONS)
    assert sections["optimizer"]["learning_rate"] == 3e-4 and sections["objective"]["clip_ratio_c"] == 3.0
    assert TrainConfig.from_dict(sections) == config
    assert TrainConfig.from_dict(config.to_dict()) == config  # flat, as 0.1 wrote config.json


@pytest.mark.parametrize("values, message", [
    ({"objective": {"steps": 3}}, r"unknown training option 'steps' in section \[objective\]; it belongs to \[loop\]"),
    ({"objective": {"gama": 1.0}}, r"unknown training option 'gama' in section \[objective\]; valid: \["),
    ({"lr": 1.0}, r"unknown training option\(s\) \['lr'\]; valid: \["),
    ({"gamma": 1.0, "objective": {"gamma": 0.5}}, r"training option 'gamma' is given twice"),
])
def test_misplaced_or_unknown_options_are_named(values, message):
    with pytest.raises(ValueError, match=message):
        flatten_sections(values)


def test_rollout_slots_are_none_or_positive():
    assert TrainConfig().rollout_slots is None and TrainConfig(rollout_slots=8).rollout_slots == 8
    with pytest.raises(InputError, match=r"rollout_slots must lie in \[1, ∞\); got 0"):
        TrainConfig(rollout_slots=0)
