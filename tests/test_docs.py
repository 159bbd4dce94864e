"""docs/reference.md is generated from the code (scripts/make_reference.py); it must not drift."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_reference_matches_the_code():
    result = subprocess.run([sys.executable, "scripts/make_reference.py", "--check"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr.strip()


def test_every_magic_is_in_the_reference():
    from qlora_magic.front.magics import QloraMagics

    text = (ROOT / "docs" / "reference.md").read_text()
    names = {name for kind in QloraMagics.magics.values() for name in kind}
    assert names and all(f"### %{name}\n" in text for name in names)
