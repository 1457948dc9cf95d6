"""The exact bias of cross-tokenizer OPD estimators, two tokenizers beside one (float64 enumeration).

Student pieces {a, b, ab}; teacher pieces {a, b, ba, bb}, then {a, b, aab} (greedy longest match,
which reads two characters ahead for "aab"); horizon 3 with EOS: 40 responses. Each cell is the relative error ‖E[∇L] − ∇J‖ / ‖∇J‖ of an estimator's expected
gradient against the objective named in its column (see opd_jax.exact_cross); "characters": the
teacher's log-probs factored over the characters of the text (opd_jax.teacher_bytes, the loop's
default); "spread" / "last": how a chunk's log-ratio reaches its student tokens
(opd_jax.alignment.aligned_teacher_logp). "one tokenizer" is the same student and teacher policy
family with the teacher scoring the student's own tokens.

    .venv/bin/python experiments/cross_tokenizer_bias.py [--output experiments/results/cross_tokenizer/bias.md]
"""

from __future__ import annotations

import argparse
import pathlib

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402

from opd_jax import exact  # noqa: E402
from opd_jax import exact_cross as xc  # noqa: E402

DIVERGENCES = ("reverse_kl", "forward_kl", "js", "total_variation", "squared_hellinger", "pearson_chi2", "neyman_chi2")
COLUMNS = ("seq OPD+ vs J_seq", "seq stop-grad vs J_seq", "tok OPD+ γ=0 vs J_bytes (characters)",
           "tok OPD+ γ=1 vs J_bytes (characters)", "tok OPD+ γ=0 vs J_chunk (spread)",
           "tok OPD+ γ=1 vs J_chunk (spread)", "tok OPD+ γ=0 vs J_chunk (last)", "tok OPD+ γ=1 vs J_chunk (last)",
           "one tokenizer: tok OPD+ γ=0 vs J_tok", "one tokenizer: tok OPD+ γ=1 vs J_tok", "∇J_seq vs ∇J_text")


def bias_row(name: str, cross: xc.CrossProblem, same: xc.CrossProblem, table) -> list[float]:
    """The relative errors of :data:`COLUMNS` for one divergence."""
    def logits_fn(t):
        return exact.tabular_logits(t, cross.space)

    def grad(problem, objective):
        return jax.grad(lambda t: xc.cross_objective(logits_fn(t), problem, divergence=name, objective=objective))(table)

    def error(problem, target, **estimator):
        estimate = xc.cross_estimator_gradient(logits_fn, table, problem, divergence=name, **estimator)
        return exact.compare_gradients(estimate, target)[0]

    sequence, chunk, one = grad(cross, "sequence"), grad(cross, "chunk"), grad(same, "chunk")
    characters = grad(cross, "bytes")
    return [error(cross, sequence, level="sequence", estimator="opd_plus"),
            error(cross, sequence, level="sequence", estimator="stop_grad"),
            *(error(cross, characters, level="token", estimator="opd_plus", gamma=g, credit="characters")
              for g in (0.0, 1.0)),
            *(error(cross, chunk, level="token", estimator="opd_plus", gamma=g, credit=credit)
              for credit in ("spread", "last") for g in (0.0, 1.0)),
            *(error(same, one, level="token", estimator="opd_plus", gamma=g) for g in (0.0, 1.0)),
            exact.compare_gradients(sequence, grad(cross, "text"))[0]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=pathlib.Path, help="also write the table (Markdown) here")
    args = parser.parse_args()
    student = xc.PieceTokenizer(("a", "b", "ab"))
    same = xc.make_problem(student, None, horizon=3, seed=0)
    table = 0.7 * jax.random.normal(jax.random.key(1), (same.space.num_states, student.vocab_size), jnp.float64)
    sections = []
    for teacher, title in ((("a", "b", "ba", "bb"), "settled by the next character"),
                           (("a", "b", "aab"), "reading two characters ahead")):
        cross = xc.make_problem(student, xc.PieceTokenizer(teacher), horizon=3, seed=0)
        lines = [f"Teacher pieces {{{', '.join(teacher)}}} (greedy match {title}):", "",
                 "| divergence | " + " | ".join(COLUMNS) + " |", "|---|" + "---:|" * len(COLUMNS)]
        for name in DIVERGENCES:
            lines.append(f"| {name} | " + " | ".join(f"{v:.2e}" for v in bias_row(name, cross, same, table)) + " |")
        sections.append("\n".join(lines) + "\n")
    table_text = "\n".join(sections)
    print(table_text)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(f"`.venv/bin/python experiments/cross_tokenizer_bias.py`\n\n{table_text}")


if __name__ == "__main__":
    main()
