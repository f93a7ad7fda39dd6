"""Text that users read cites papers and docs pages, never the project's internals.

The package, its docs, experiments, benchmarks and README must not refer to the
specification's section numbers, issue numbers, the people or tools that built it,
or paths outside the repository: users have none of these.
"""

import pathlib
import re

import pytest


ROOT = pathlib.Path(__file__).resolve().parent.parent
FOLDERS = ("jpc", "docs", "experiments", "benchmarks")
SUFFIXES = {".py", ".md", ".ipynb", ".yml", ".toml"}
FORBIDDEN = re.compile(
    r"SPEC\s*§|\bSPEC\.md\b|\b[Ii]ssues? #?\d+\b|\bother agents?\b|\.\./shared"
)


def _user_files() -> list[pathlib.Path]:
    files = [ROOT / "README.md", ROOT / "mkdocs.yml"]
    for folder in FOLDERS:
        files += [
            p
            for p in (ROOT / folder).rglob("*")
            if p.suffix in SUFFIXES and ".ipynb_checkpoints" not in p.parts
        ]
    return files


def test_pattern_catches_internal_references():
    """The pattern itself: each kind of reference is caught, ordinary text is not."""
    for text in (
        "see SPEC §4.1",
        "(issue 12)",
        "Issue #3",
        "other agents",
        "../shared",
    ):
        assert FORBIDDEN.search(text), text
    for text in ("PC issues a prediction", "shared weights", "Whittington & Bogacz"):
        assert not FORBIDDEN.search(text), text


@pytest.mark.parametrize("path", _user_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_internal_references(path):
    lines = path.read_text(errors="ignore").splitlines()
    hits = [f"{i}: {line.strip()[:120]}" for i, line in enumerate(lines, 1)
            if FORBIDDEN.search(line)]  # fmt: skip
    assert not hits, (
        f"{path.relative_to(ROOT)} cites internal references:\n" + "\n".join(hits)
    )
