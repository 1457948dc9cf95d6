"""The README's Python blocks run as written, in order, as one script (issue 28 item 5).

They run in a fresh interpreter in a temporary folder, so ``runs/mine`` lands there and a custom
generator defined in the script is importable as ``__main__:my_generator``, as for a user's script.
"""

import json
import pathlib
import re
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_readme_python_blocks_run_as_written(tmp_path):
    blocks = python_blocks((REPO / "README.md").read_text(encoding="utf-8"))
    assert len(blocks) >= 2, "the README's usage examples are gone"
    script = tmp_path / "readme.py"
    script.write_text("\n\n".join(blocks), encoding="utf-8")
    completed = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                               timeout=900)
    assert completed.returncode == 0, completed.stderr[-4000:]
    config = json.loads((tmp_path / "runs" / "mine" / "config.json").read_text())
    assert config["objective"]["divergence"] == "__main__:my_generator"  # the custom generator, recorded
    steps = [json.loads(line) for line in (tmp_path / "runs" / "mine" / "metrics.jsonl").read_text().splitlines()]
    assert max(r.get("step", 0) for r in steps) == 2
