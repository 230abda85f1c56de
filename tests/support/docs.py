"""Reading the project's Markdown: README.md and docs/*.md, as GitHub renders them.

Shared by the tests that hold the docs to the code: links and anchors (tests/unit/test_docs.py),
the architecture diagram against the synthesized template (tests/infra/test_infra_diagram.py) and
the commands the docs show (tests/integration/test_docs_commands.py). Whatever docs/*.md exist are
read, so a page added later is held to the same rules.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
README = ROOT / "README.md"

# `<!-- docs-test: run NAME -->` on the line before a fence: the block is run, as written, by
# tests/integration/test_docs_commands.py (its runner NAME says what the block needs first).
RUN_MARK = re.compile(r"^<!--\s*docs-test:\s*run\s+([\w-]+)\s*-->\s*$")
FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`\s]*)")


def doc_files() -> list[Path]:
    """README.md and every docs/*.md, in a stable order."""
    return [README, *sorted(DOCS.glob("*.md"))]


def relative(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


@dataclass(frozen=True)
class Block:
    """A fenced code block: its info string (language), its lines, where it starts (the fence's
    1-based line number) and the run mark before it, if any."""

    path: Path
    info: str
    lines: tuple[str, ...]
    line: int
    run: str | None

    @property
    def where(self) -> str:
        return f"{relative(self.path)}:{self.line}"

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


def blocks(path: Path) -> list[Block]:
    """Every fenced code block of a Markdown file."""
    found: list[Block] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    index = 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if not opening:
            index += 1
            continue
        fence = opening["fence"]
        previous = lines[index - 1].strip() if index else ""
        mark = RUN_MARK.match(previous)
        body: list[str] = []
        end = index + 1
        while end < len(lines) and not re.match(
            rf"^ {{0,3}}{re.escape(fence[0])}{{{len(fence)},}}\s*$", lines[end]
        ):
            body.append(lines[end])
            end += 1
        found.append(
            Block(
                path=path,
                info=opening["info"].lower(),
                lines=tuple(body),
                line=index + 1,
                run=mark[1] if mark else None,
            )
        )
        index = end + 1
    return found


def prose_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, line) of the lines outside fenced code blocks."""
    inside: str | None = None
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        opening = FENCE.match(line)
        if inside is None and opening:
            inside = opening["fence"]
            continue
        if inside is not None:
            if re.match(rf"^ {{0,3}}{re.escape(inside[0])}{{{len(inside)},}}\s*$", line):
                inside = None
            continue
        yield number, line


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: its text without markup, lower case, punctuation other
    than hyphens and underscores dropped, spaces made hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = text.replace("`", "").replace("*", "")
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file, with GitHub's -1, -2 suffixes for repeats."""
    seen: dict[str, int] = {}
    found: set[str] = set()
    for _, line in prose_lines(path):
        heading = re.match(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not heading:
            continue
        slug = github_slug(heading[1])
        if slug in seen:
            seen[slug] += 1
            found.add(f"{slug}-{seen[slug]}")
        else:
            seen[slug] = 0
            found.add(slug)
    return found


LINK = re.compile(r"(?<!\!)\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
IMAGE = re.compile(r"!\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


@dataclass(frozen=True)
class Link:
    path: Path
    line: int
    target: str

    @property
    def where(self) -> str:
        return f"{relative(self.path)}:{self.line}"


def paragraphs(path: Path) -> Iterator[tuple[int, str]]:
    """(first line number, text) of each paragraph of prose, its lines joined by spaces, so that
    a link wrapped across lines reads as one."""
    start, lines = 0, []
    for number, line in [*prose_lines(path), (0, "")]:
        if line.strip():
            if not lines:
                start = number
            lines.append(line.strip())
        elif lines:
            yield start, " ".join(lines)
            lines = []


def links(path: Path) -> list[Link]:
    """The Markdown links and images of a file's prose (code spans and fenced blocks left out)."""
    found = []
    for number, text in paragraphs(path):
        without_code = re.sub(r"`[^`]*`", "", text)
        for pattern in (LINK, IMAGE):
            for match in pattern.finditer(without_code):
                found.append(Link(path, number, match[1]))
    return found


def mermaid_blocks(path: Path) -> list[Block]:
    return [block for block in blocks(path) if block.info == "mermaid"]
