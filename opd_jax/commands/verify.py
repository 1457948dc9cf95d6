"""``opd-jax verify``: enumerate every response of small random tabular problems and print, for each
divergence × estimator × level × discount, how far the estimator's expected gradient is from the
exact gradient of the objective it claims to follow (float64)."""

from __future__ import annotations

import argparse
import csv
import io
import json
import pathlib
import sys

from opd_jax.commands.flags import fail, positive_int

_CASES_HELP = """\
rows: token level  = estimators stop_grad and opd_plus at gamma 0 and 1, and full_vocab (the
                     GKD-style per-state gradient), all compared with the exact gradient of J_tok;
      sequence level = stop_grad and opd_plus, compared with the exact gradient of J_seq.
rel. error = |g - g*| / |g*| (largest over the seeds) and cosine = cos(g, g*) (range over the seeds).
"""


def _parse_divergence(text: str) -> tuple[str, dict[str, float]]:
    """``"alpha:alpha=0.5"`` -> ``("alpha", {"alpha": 0.5})``, validated by ``divergences.get``."""
    from opd_jax import divergences

    name, _, rest = text.partition(":")
    params: dict[str, float] = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        try:
            if not sep:
                raise ValueError
            params[key.strip()] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"--divergence {text!r}: parameters must be written NAME:key=value[,key=value]"
            ) from None
    try:
        divergences.get(name, **params)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"--divergence {text!r}: {error}") from None
    return name, params


def add_parser(subparsers) -> None:
    verify = subparsers.add_parser(
        "verify",
        help="exact bias report of every estimator (float64 enumeration)",
        description=(
            "Enumerate every response of random tabular student/teacher pairs and compare each "
            "estimator's expected gradient with the exact gradient of its objective, in float64."
        ),
        epilog=_CASES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verify.add_argument("--vocab-size", type=positive_int(2), default=3, help="vocabulary size V (default 3)")
    verify.add_argument("--horizon", type=positive_int(1), default=3, help="response length T (default 3)")
    verify.add_argument("--no-eos", action="store_true", help="no EOS token (default: token V-1 ends a response)")
    verify.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1, 2], help="problem seeds (default 0 1 2); rows summarise over them"
    )
    verify.add_argument(
        "--divergence",
        action="append",
        type=_parse_divergence,
        metavar="NAME[:key=value]",
        help="divergence to report, repeatable, e.g. js or alpha:alpha=0.5 (default: all nine, "
        "generalized_js and alpha at several values)",
    )
    verify.add_argument("--json", type=pathlib.Path, metavar="PATH", help="also write the rows as JSON")
    verify.add_argument("--csv", type=pathlib.Path, metavar="PATH", help="also write the rows as CSV")
    verify.add_argument("--quiet", action="store_true", help="no progress bar")


def format_table(rows) -> str:
    """The bias report as a Markdown table."""
    lines = [
        "| divergence | level | estimator | γ | target | max rel. error | cosine (min … max) | verdict |",
        "|---|---|---|---|---|---:|:---:|---|",
    ]
    for row in rows:
        gamma = "–" if row.gamma is None else f"{row.gamma:g}"
        verdict = "exact" if row.unbiased else "biased"
        lines.append(
            f"| {row.divergence} | {row.level} | {row.estimator} | {gamma} | {row.target} "
            f"| {row.relative_error:.2e} | {row.cosine_min:+.4f} … {row.cosine_max:+.4f} | {verdict} |"
        )
    return "\n".join(lines)


def _write_outputs(rows, metadata: dict, json_path: pathlib.Path | None, csv_path: pathlib.Path | None) -> None:
    records = [
        {
            "divergence": r.divergence,
            "level": r.level,
            "estimator": r.estimator,
            "gamma": r.gamma,
            "target": r.target,
            "relative_error": r.relative_error,
            "cosine_min": r.cosine_min,
            "cosine_max": r.cosine_max,
            "unbiased": r.unbiased,
        }
        for r in rows
    ]
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps({"problem": metadata, "rows": records}, indent=2) + "\n")
    if csv_path is not None:
        csv_path.parent.mkdir(parents=True, exist_ok=True)
        # Rendered in memory, then written whole: a bucket object (gs://) has no line-by-line writes.
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
        csv_path.write_text(text.getvalue())


def _check_writable(path: pathlib.Path | None, flag: str) -> None:
    if path is not None and path.is_dir():
        fail("verify", f"{flag} {path} is a directory; give a file path")


def run(args: argparse.Namespace) -> int:
    import jax

    jax.config.update("jax_enable_x64", True)
    from tqdm import tqdm

    from opd_jax import exact

    _check_writable(args.json, "--json")
    _check_writable(args.csv, "--csv")
    divergences = tuple(args.divergence) if args.divergence else exact.DEFAULT_DIVERGENCES
    with tqdm(total=len(divergences), desc="divergences", disable=args.quiet, file=sys.stderr) as bar:
        rows = exact.bias_report(
            seeds=tuple(args.seeds),
            vocab_size=args.vocab_size,
            horizon=args.horizon,
            eos=not args.no_eos,
            divergences=divergences,
            progress=lambda done, total: bar.update(done - bar.n),
        )
    metadata = {
        "vocab_size": args.vocab_size,
        "horizon": args.horizon,
        "eos": not args.no_eos,
        "seeds": list(args.seeds),
        "dtype": "float64",
    }
    eos = f"EOS = token {args.vocab_size - 1}" if not args.no_eos else "no EOS"
    print(
        f"Exact bias report: V = {args.vocab_size}, T = {args.horizon}, {eos}, seeds {args.seeds}, "
        "float64; largest error and range of cosines over the seeds.\n"
    )
    print(format_table(rows))
    _write_outputs(rows, metadata, args.json, args.csv)
    return 0
