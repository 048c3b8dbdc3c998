"""Documentation references resolve: every ``docs/<file>.md`` (and ``section N``) named in the
source, the tests and the docs exists, and every test or file the maths notes cite exists."""

import re

import pytest

from conftest import REPO

SOURCES = [p for d in ("src", "tests", "benchmarks", "scripts") for p in (REPO / d).rglob("*.py")]
DOCS = sorted((REPO / "docs").glob("*.md"))
NUM = r"(\d+(?:\.\d+)?)"
REF = re.compile(rf"(?<![\w/])docs/([\w.-]+\.md)(?:,?\s+sections?\s+{NUM}(?:\s*-\s*{NUM})?)?")
HEADING = re.compile(r"^#{2,4}\s+(\d+(?:\.\d+)*)\.?\s", re.M)


def _sections(path):
    return set(HEADING.findall(path.read_text()))


def _refs(path):
    text = path.read_text()
    for m in REF.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        yield f"{path.relative_to(REPO)}:{line}", m.group(1), [s for s in m.group(2, 3) if s]


def test_docs_exist_and_are_cited():
    assert (REPO / "docs" / "maths.md") in DOCS
    cited = {name for p in SOURCES for _, name, _ in _refs(p)}
    assert "maths.md" in cited


@pytest.mark.parametrize("path", SOURCES + DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_docs_reference_resolves(path):
    bad = []
    for where, name, sections in _refs(path):
        target = REPO / "docs" / name
        if not target.is_file():
            bad.append(f"{where}: docs/{name} does not exist")
            continue
        missing = [s for s in sections if s not in _sections(target)]
        if missing:
            bad.append(f"{where}: docs/{name} has no section {', '.join(missing)}")
    # the notes the docstrings used to cite were never in the repository
    stale = "MATH" + ".md"
    bad += [f"{path.relative_to(REPO)}: cites {stale}" for _ in range(path.read_text().count(stale))]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_docs_internal_references_resolve(doc):
    """``section N`` inside a doc, and the tests / files it cites (``tests/x.py::test_name``)."""
    text = doc.read_text()
    sections = _sections(doc)
    missing = sorted({s for s in re.findall(r"\bsections? (\d+(?:\.\d+)?)", text) if s not in sections})
    assert not missing, f"{doc.name}: no section(s) {missing}"
    for path, func in re.findall(r"`((?:src|tests|benchmarks|docs|results)/[\w./-]+)(?:::(\w+))?`", text):
        assert (REPO / path).exists(), f"{doc.name} cites {path}, which does not exist"
        if func:
            assert f"def {func}(" in (REPO / path).read_text(), f"{doc.name} cites {path}::{func}"
