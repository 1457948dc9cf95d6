"""The opd-jax command line: help, the verify report and its files, and bad arguments."""

import csv
import json

import pytest

from opd_jax.commands import main


def test_help_lists_verify_and_its_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["verify", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--vocab-size", "--horizon", "--no-eos", "--seeds", "--divergence", "--json", "--csv"):
        assert option in text


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "verify" in capsys.readouterr().out


def test_verify_reports_opd_plus_exact_and_forward_kl_stop_grad_reversed(tmp_path, capsys):
    json_path, csv_path = tmp_path / "out" / "report.json", tmp_path / "report.csv"
    argv = ["verify", "--vocab-size", "2", "--horizon", "2", "--seeds", "0", "1", "--quiet",
            "--divergence", "reverse_kl", "--divergence", "forward_kl",
            "--json", str(json_path), "--csv", str(csv_path)]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "| forward_kl | sequence | opd_plus |" in table

    report = json.loads(json_path.read_text())
    assert report["problem"] == {"vocab_size": 2, "horizon": 2, "eos": True, "seeds": [0, 1], "dtype": "float64"}
    rows = {(r["divergence"], r["level"], r["estimator"], r["gamma"]): r for r in report["rows"]}
    assert len(rows) == 14
    for divergence in ("reverse_kl", "forward_kl"):
        assert rows[(divergence, "token", "opd_plus", 1.0)]["relative_error"] <= 1e-10
        assert rows[(divergence, "sequence", "opd_plus", None)]["relative_error"] <= 1e-10
    assert rows[("reverse_kl", "sequence", "stop_grad", None)]["relative_error"] <= 1e-10
    assert rows[("forward_kl", "sequence", "stop_grad", None)]["cosine_max"] < 0

    with csv_path.open() as handle:
        csv_rows = list(csv.DictReader(handle))
    assert [r["divergence"] for r in csv_rows] == [r["divergence"] for r in report["rows"]]
    assert float(csv_rows[0]["relative_error"]) == pytest.approx(report["rows"][0]["relative_error"], rel=1e-12)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["verify", "--divergence", "nope"], "valid names"),
        (["verify", "--divergence", "alpha:alpha=1"], "alpha"),
        (["verify", "--divergence", "alpha:0.5"], "key=value"),
        (["verify", "--vocab-size", "1"], "integer >= 2"),
        (["verify", "--horizon", "0"], "integer >= 1"),
    ],
)
def test_bad_arguments_fail_before_any_work_with_a_named_reason(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_output_path_that_is_a_directory_is_refused_and_left_untouched(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("data")
    with pytest.raises(SystemExit) as exit_info:
        main(["verify", "--quiet", "--divergence", "reverse_kl", "--json", str(tmp_path)])
    assert exit_info.value.code == 2 and "is a directory" in capsys.readouterr().err
    assert (tmp_path / "keep.txt").read_text() == "data"
