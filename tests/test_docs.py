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


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation but - and _ dropped, spaces made -."""
    import re

    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_the_guides_links_within_a_page_reach_its_headings_and_its_contents_lists_every_section():
    import re

    for doc in ("docs/user-guide.md", "README.md", "docs/architecture.md", "docs/benchmarks.md"):
        text = (ROOT / doc).read_text()
        body = re.sub(r"```.*?```", "", text, flags=re.S)  # a '#' line in a code block is no heading
        headings = re.findall(r"^#{1,6} (.+)$", body, flags=re.M)
        anchors = {_slug(h) for h in headings}
        links = set(re.findall(r"\]\(#([^)]+)\)", text))
        assert links <= anchors, f"{doc}: links to no heading: {sorted(links - anchors)}"
    guide = (ROOT / "docs" / "user-guide.md").read_text()
    sections = [h for h in re.findall(r"^## (.+)$", re.sub(r"```.*?```", "", guide, flags=re.S), flags=re.M)]
    listed = re.findall(r"^- \[.+\]\(#([^)]+)\)$", guide, flags=re.M)
    assert listed == [_slug(h) for h in sections], "the user guide's contents list is not its sections, in order"
