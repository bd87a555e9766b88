"""A plain clone explains itself: the README's layout is the repo's listing, and every document points only at
files that exist in the repo.

- The "Layout" section of README.md names each top-level entry of the repo (tracked or not ignored, dotfiles
  left out) once, and nothing else.
- Every relative link in README.md and docs/*.md resolves to a file or folder inside the repo.
- No document points outside the repo (``../shared``, absolute machine paths).
- Every repo path quoted in backticks (``workers/core/queue.py``) exists, so a renamed file cannot leave a
  stale mention behind.
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```.*?^```[ \t]*$", re.S | re.M)
CODE_SPAN = re.compile(r"`([^`\n]+)`")
INLINE_LINK = re.compile(r"\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^\s*\[[^\]\n]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$", re.M)
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
REPO_PATH = re.compile(r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)+/?$")
OUTSIDE = ("../shared", "/work/")


def repo_files() -> list[str]:
    """Paths git would put in a clone or a commit: tracked, plus untracked ones not ignored; deleted ones out."""
    try:
        listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                                cwd=ROOT, capture_output=True, check=True).stdout.decode()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git work tree: the repo's file list is unknown")
    return [path for path in listed.split("\0") if path and (ROOT / path).exists()]


def top_level_entries() -> set[str]:
    return {path.split("/")[0] for path in repo_files()}


def layout_entries(readme: str) -> list[str]:
    """First word of each unindented line of the code block under ``## Layout``, without a trailing ``/``."""
    match = re.search(r"^## Layout[ \t]*\n(.*?)(?=^#{1,2} |\Z)", readme, re.S | re.M)
    assert match, "README.md has no '## Layout' section"
    block = FENCE.search(match.group(1))
    assert block, "README.md's Layout section has no code block listing the entries"
    lines = block.group(0).splitlines()[1:-1]
    return [line.split()[0].rstrip("/") for line in lines if line.strip() and not line[0].isspace()]


def prose(document: Path) -> str:
    """The document without its fenced code blocks (a link inside one is text, not a link)."""
    return FENCE.sub("", document.read_text())


def links(document: Path) -> list[str]:
    text = CODE_SPAN.sub("", prose(document))
    return INLINE_LINK.findall(text) + REFERENCE_LINK.findall(text)


def quoted_repo_paths(document: Path, tops: set[str]) -> set[str]:
    """Words in backticks that name a path under one of the repo's top-level entries."""
    found = set()
    for span in CODE_SPAN.findall(prose(document)):
        for word in span.split():
            word = word.removeprefix("./").rstrip(",;:.)")
            if REPO_PATH.match(word) and word.split("/")[0] in tops:
                found.add(word)
    return found


def test_the_layout_section_lists_every_top_level_entry_once_and_nothing_else() -> None:
    listed = layout_entries((ROOT / "README.md").read_text())
    wanted = {name for name in top_level_entries() if not name.startswith(".")}
    assert sorted(name for name in set(listed) if listed.count(name) > 1) == [], "listed twice"
    assert sorted(wanted - set(listed)) == [], "in the repo, missing from README.md's Layout"
    assert sorted(set(listed) - wanted) == [], "in README.md's Layout, not in the repo"


def test_the_documents_exist() -> None:
    assert {p.name for p in DOCUMENTS} >= {"README.md", "architecture.md", "contract.md"}


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_points_at_a_file_in_the_repo(document: Path) -> None:
    broken = []
    for target in links(document):
        if SCHEME.match(target) or target.startswith("#"):
            continue
        path = (document.parent / target.split("#")[0]).resolve()
        if not path.is_relative_to(ROOT) or not path.exists():
            broken.append(target)
    assert broken == []


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_document_points_outside_the_repo(document: Path) -> None:
    text = document.read_text()
    assert [marker for marker in OUTSIDE if marker in text] == []


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_quoted_repo_path_exists(document: Path) -> None:
    missing = sorted(path for path in quoted_repo_paths(document, top_level_entries()) if not (ROOT / path).exists())
    assert missing == []


def test_the_readers_find_what_they_look_for(tmp_path: Path) -> None:
    readme = "# x\n\n## Layout\n\n```\ncommon/   the kernel\n          more about it\nMakefile  make\n```\n\n## Next\n"
    assert layout_entries(readme) == ["common", "Makefile"]
    page = tmp_path / "page.md"
    page.write_text("[a](docs/a.md) [b](https://x.org) `[c](no.md)` [d]: ../d.md\n\n```\n[e](e.md)\n```\n"
                    "see `workers/core/queue.py`, `var/log` and `GET /health`\n")
    assert links(page) == ["docs/a.md", "https://x.org"]
    assert quoted_repo_paths(page, {"workers", "docs"}) == {"workers/core/queue.py"}
