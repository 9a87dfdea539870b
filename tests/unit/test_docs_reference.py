"""The documentation's generated blocks (broker/reference.py): each says what the code says
now — the configuration reference, the metrics reference, the reason table, the example files
and the `policy explain` output — and every generated block in docs/ is registered."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from broker import reference
from broker.reference import BLOCKS, Block, begin_marker, end_marker, stale
from tests.support.cli import REPO

FIX = "run `make docs-gen` (python -m broker.reference) and commit the pages it rewrites"


def test_the_generated_blocks_are_current() -> None:
    found = stale()
    assert not found, f"stale generated blocks: {', '.join(found)}; {FIX}"


def test_a_changed_block_is_stale(tmp_path: Path) -> None:
    """The check can fail: a page whose block was edited by hand is reported."""
    [block] = [b for b in BLOCKS if b.name == "reasons"]
    page = tmp_path / block.page
    page.parent.mkdir(parents=True)
    shutil.copy(REPO / block.page, page)
    assert stale(tmp_path, [block]) == []
    page.write_text(page.read_text().replace("| `RATE_LIMITED`", "| `RATE_LIMIT`"))
    assert stale(tmp_path, [block]) == [f"{block.page}: reasons"]
    # Rewriting fills it again, and leaves the rest of the page alone.
    text = reference.generate(tmp_path, [block])[page]
    assert text == (REPO / block.page).read_text()


def test_one_more_block_is_one_line(tmp_path: Path) -> None:
    page = tmp_path / "docs" / "new.md"
    page.parent.mkdir(parents=True)
    page.write_text(f"# New\n\n{begin_marker('answer')}\nold\n{end_marker('answer')}\n\nafter\n")
    block = Block("docs/new.md", "answer", lambda: "42\n")
    assert stale(tmp_path, [block]) == ["docs/new.md: answer"]
    text = reference.generate(tmp_path, [block])[page]
    assert text == f"# New\n\n{begin_marker('answer')}\n42\n{end_marker('answer')}\n\nafter\n"


def test_every_generated_block_in_the_docs_is_registered() -> None:
    registered = {(b.page, b.name) for b in BLOCKS}
    for path in sorted((REPO / "docs").glob("*.md")):
        page = str(path.relative_to(REPO))
        for name in re.findall(
            r"^<!-- BEGIN GENERATED: (\S+) -->$", path.read_text(), re.MULTILINE
        ):
            assert (page, name) in registered, f"{page}: block {name} is in no Block of BLOCKS"
            assert path.read_text().count(end_marker(name)) == 1, (page, name)


def test_the_docs_name_only_metrics_the_broker_exports() -> None:
    """A metric named anywhere in the README or the docs (prose, PromQL, runbooks) is one a
    fresh broker's registry has: a renamed or removed metric cannot linger in the text. The
    changelog is history and may name removed ones."""
    from broker.config import MetricsSettings

    families = reference.metric_families(reference.broker_registry(MetricsSettings()))
    labels = {label for _, _, names in families.values() for label in names}
    documents = [REPO / "README.md", *(REPO / "docs").glob("*.md")]
    unknown = set()
    for path in documents:
        if path.name == "changelog.md":
            continue
        for name in re.findall(
            r"\b((?:token_broker|grpc_server|process|python)_\w+)", path.read_text()
        ):
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            if name.endswith("_") or name in labels or {name, base} & set(families):
                continue
            unknown.add(f"{path.name}: {name}")
    assert not unknown, sorted(unknown)
