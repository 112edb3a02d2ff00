"""Every file the repository's text cites is one the repository holds.

Scanned: the tracked (and not ignored) Python, Markdown, YAML and TOML files and the Makefile.
Checked in them:
- a cited Markdown file (`docs/method.md`, `README.md`, `method.md`), with its `#anchor` if any;
- a cited repository path with an extension (`distillrun/method/losses.py`, `docs/...`,
  `conf/experiment/omit3.yaml`);
- in Markdown, every relative link `[text](path#anchor)` and `(#anchor)`, as GitHub resolves it.
A path resolves from the repository root or from the citing file's folder; an anchor must be
the GitHub slug of a heading of the target file.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml"}
NAMES = {"Makefile"}
SKIPPED_DIRS = {".git", ".venv", "outputs", "__pycache__", ".pytest_cache", ".ruff_cache"}

# .md names that are not this repository's files: what distillrun writes into run folders, and
# a file of another repository that a comment cites (osmr/imgclsmob, in tests/test_cifar.py).
WRITTEN_BY_DISTILLRUN = {"report.md", "model.md"}
ELSEWHERE = {"chainer_/README.md"}

_PATH_CHARS = r"[\w.-]"
# A cited .md file: a path ending in .md, not part of a longer path, URL or placeholder path.
MD_REF = re.compile(rf"(?<![\w./<>{{}}:-])((?:{_PATH_CHARS}+/)*{_PATH_CHARS}+\.md)(?!\w)(#[\w-]+)?")
# A cited repository path: a top-level folder of the repository, then a file with an extension.
TOP_DIRS = "distillrun|tests|conf|docs|hydra_plugins"
REPO_PATH = re.compile(
    rf"(?<![\w./<>{{}}:-])((?:{TOP_DIRS})/(?:{_PATH_CHARS}+/)*[\w-]+\.[a-z]+)(#[\w-]+)?\b"
)
MD_LINK = re.compile(r"!?\[[^\]\n]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^\s*(```|~~~)")


def scanned_files() -> list[Path]:
    """The files git would carry (tracked, or new and not ignored); without git, a walk."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.splitlines()
        files = [ROOT / line for line in out]
    except (OSError, subprocess.CalledProcessError):
        files = [p for p in ROOT.rglob("*") if not SKIPPED_DIRS & set(p.relative_to(ROOT).parts)]
    return sorted(f for f in files if f.is_file() and (f.suffix in SUFFIXES or f.name in NAMES))


def without_fences(path: Path, text: str) -> str:
    """A Markdown file's text without its fenced code blocks (examples, not citations); other
    files' text as it is."""
    if path.suffix != ".md":
        return text
    kept, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
        kept.append("" if fenced or FENCE.match(line) else line)
    return "\n".join(kept)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of a Markdown file's headings (a repeated heading gets -1, -2, ...)."""
    seen: dict[str, int] = {}
    found = set()
    for line in without_fences(path, path.read_text(encoding="utf-8")).splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        base = slug(m.group(1).replace("`", ""))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def resolve(target: str, citing: Path, from_root: bool = True) -> Path | None:
    """The file a cited path names, from the citing file's folder or the root; None if neither."""
    bases = [citing.parent, ROOT] if from_root else [citing.parent]
    for base in bases:
        candidate = (base / target).resolve()
        if candidate.exists():
            return candidate
    return None


def problems_in(path: Path, text: str | None = None) -> list[str]:
    """Why each citation in `path` (or in `text`, read as if it stood there) is broken."""
    text = without_fences(path, path.read_text(encoding="utf-8") if text is None else text)
    where = path.relative_to(ROOT)
    found = []

    def check(target: str, anchor: str | None, from_root: bool = True) -> None:
        file = resolve(target, path, from_root) if target else path
        if file is None:
            found.append(f"{where}: cites {target}, which the repository does not hold")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            found.append(f"{where}: cites {target or where}#{anchor}, a heading {file.name} lacks")

    cited = {(m.group(1), m.group(2)) for m in MD_REF.finditer(text)}
    cited |= {(m.group(1), m.group(2)) for m in REPO_PATH.finditer(text)}
    for target, anchor in sorted(cited, key=str):
        if target in WRITTEN_BY_DISTILLRUN or target in ELSEWHERE:
            continue
        check(target, anchor[1:] if anchor else None)
    if path.suffix == ".md":
        for m in MD_LINK.finditer(re.sub(r"`[^`\n]*`", "", text)):  # inline code holds no links
            link = m.group(1)
            if re.match(r"^[a-z][a-z0-9+.-]*:", link):  # https:, mailto:, ...
                continue
            target, _, anchor = link.partition("#")
            check(target, anchor or None, from_root=False)
    return list(dict.fromkeys(found))  # a link's path is also a cited path: report it once


def test_every_cited_file_and_heading_exists() -> None:
    files = scanned_files()
    assert ROOT / "README.md" in files and ROOT / "docs" / "method.md" in files
    # This file cites broken paths on purpose, in the test below.
    problems = [p for f in files if f != Path(__file__).resolve() for p in problems_in(f)]
    assert not problems, "\n".join(problems)


def test_a_bogus_citation_is_caught() -> None:
    """The checker itself: each kind of broken citation is reported, and sound ones are not."""
    text = (
        "# Fake\n\nSee docs/method.md#the-loss, [it](method.md#ensembles),\n"
        "distillrun/method/losses.py.\n"
        "Broken: docs/nothing.md, METHOD.md section 3, docs/method.md#no-such-heading,\n"
        "[gone](missing.md), [here](#nowhere), `distillrun/nothing.py`.\n"
        "```\n[in code](not-checked.md)\n```\n"
    )
    problems = problems_in(ROOT / "docs" / "design.md", text)  # as if it stood there
    joined = "\n".join(problems)
    for broken in ("docs/nothing.md", "METHOD.md", "no-such-heading", "missing.md", "nowhere"):
        assert broken in joined
    assert "distillrun/nothing.py" in joined
    assert "the-loss" not in joined and "ensembles" not in joined and "losses.py" not in joined
    assert "not-checked" not in joined
    assert len(problems) == 6, joined


def test_heading_anchors_follow_github() -> None:
    assert slug("The paper's numbers beside ours") == "the-papers-numbers-beside-ours"
    assert slug("The T^2 factor") == "the-t2-factor"
    assert slug("The CIFAR-100 benchmark (CRD, DKD)") == "the-cifar-100-benchmark-crd-dkd"
    assert slug("Trackers: logger=") == "trackers-logger"
