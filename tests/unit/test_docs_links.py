"""Every relative link in the README, docs/ and bench/RESULTS.md leads to a file that exists, and
every #anchor to a heading of that file: pages move and get renamed, and a dangling link is the
first thing a reader hits. Only the links are checked, never the wording."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = sorted([ROOT / "README.md", ROOT / "bench" / "RESULTS.md", *(ROOT / "docs").glob("*.md")])

FENCE = re.compile(r"^```.*?^```", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"\[[^\]\n]*\]\(([^)\s]+)\)")


def prose(text: str) -> str:
    """The text without code blocks and code spans, where brackets are code, not links."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def anchor(heading: str) -> str:
    """GitHub's id for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = INLINE_CODE.sub(lambda m: m.group(0)[1:-1], heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    headings = re.findall(r"^#{1,6} (.+)$", FENCE.sub("", page.read_text()), re.M)
    return {anchor(h) for h in headings}


def relative_links(page: Path) -> list[str]:
    links = LINK.findall(prose(page.read_text()))
    return [link for link in links if not re.match(r"[a-z][a-z0-9+.-]*:", link)]  # http:, mailto: ...


def dangling_links(page: Path) -> list[str]:
    dangling = []
    for link in relative_links(page):
        path, _, fragment = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        if not target.exists():
            dangling.append(f"{link} (no such file)")
        elif fragment and target.suffix == ".md" and fragment not in anchors(target):
            dangling.append(f"{link} (no heading with that anchor)")
    return dangling


def test_the_pages_exist():
    assert (ROOT / "docs").is_dir() and len(PAGES) > 2, PAGES


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    assert not dangling_links(page), f"{page.relative_to(ROOT)}: dangling links: {dangling_links(page)}"


def test_a_dangling_link_or_anchor_is_found(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "other.md").write_text("# Other page\n\n```\n# not a heading\n```\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# A `code` heading: here\n\n"
        "[gone](missing.md) [bad](#nowhere) [ok](#a-code-heading-here) [web](https://example.org/x)\n"
        "[there](docs/other.md#other-page) [not there](docs/other.md#not-a-heading) `[code](missing.md)`\n"
        "```\n[fenced](missing.md)\n```\n"
    )
    assert dangling_links(page) == [
        "missing.md (no such file)",
        "#nowhere (no heading with that anchor)",
        "docs/other.md#not-a-heading (no heading with that anchor)",
    ]
