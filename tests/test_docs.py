"""The user documentation: a short README, and relative links that point at existing files."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README_MAX_LINES = 200
# [text](target) outside code; the target up to the first space or closing parenthesis.
_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
_CODE_SPAN = re.compile(r"`[^`\n]*`")


def markdown_files() -> list[Path]:
    """README.md and every Markdown file under docs/ and results/."""
    files = [REPO / "README.md"]
    for folder in ("docs", "results"):
        files += sorted((REPO / folder).rglob("*.md"))
    return files


def relative_links(text: str) -> list[str]:
    """Link targets that are paths in the repository (not URLs, mail or in-page anchors)."""
    prose = _CODE_SPAN.sub("", _FENCE.sub("", text))
    targets = [m.group(1) for m in _LINK.finditer(prose)]
    return [t for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:", t) and not t.startswith("#")]


def test_readme_is_short() -> None:
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines"


def test_docs_and_results_exist() -> None:
    assert (REPO / "docs" / "README.md").is_file()
    assert (REPO / "results" / "README.md").is_file()


def test_link_parser_finds_relative_links_only() -> None:
    text = (
        "See [a](docs/a.md), [b](../b.md#part) and [web](https://flower.ai), [x](#here), "
        "![img](pic.png), `[code](not/a/link.md)`.\n```\n[fenced](nor/this.md)\n```\n"
    )
    assert relative_links(text) == ["docs/a.md", "../b.md#part"]


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(path: Path) -> None:
    missing = []
    for target in relative_links(path.read_text()):
        file_part = target.split("#", 1)[0]
        if not (path.parent / file_part).exists():
            missing.append(target)
    assert not missing, f"{path.relative_to(REPO)} links to missing files: {missing}"
