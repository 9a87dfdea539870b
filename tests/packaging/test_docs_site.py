"""The documentation site as MkDocs builds it (`mkdocs build --strict`, also run by `make
test` as `make docs-build`): it builds without a warning (a broken link or anchor fails), and
every alert's `runbook_url` lands on a section of the built runbooks page — the placeholder base
(`prometheusRule.runbookBaseUrl` replaces it) is where the site serves docs/runbooks.md."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import urllib.parse
from pathlib import Path

from tests.support.operator_kit import RUNBOOK_BASE, alert_rules

REPO = Path(__file__).resolve().parents[2]
MKDOCS = Path(sys.executable).parent / "mkdocs"


def test_the_site_builds_strictly_and_holds_every_runbook_anchor(tmp_path: Path) -> None:
    site = tmp_path / "site"
    built = subprocess.run(
        [str(MKDOCS), "build", "--strict", "--quiet", "--site-dir", str(site)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert built.returncode == 0, built.stderr
    # The placeholder is a site's root followed by the runbooks page's own path.
    page = urllib.parse.urlsplit(RUNBOOK_BASE).path.strip("/")
    html = (site / page / "index.html").read_text(encoding="utf-8")
    ids = set(re.findall(r'\bid="([^"]+)"', html))
    for rule in alert_rules():
        url = rule["annotations"]["runbook_url"]
        base, _, anchor = url.partition("#")
        assert base == RUNBOOK_BASE, url
        assert anchor in ids, f"{rule['alert']}: no section #{anchor} on the built runbooks page"
    # Every page of the nav is built (nothing left out of the site).
    for markdown in (REPO / "docs").glob("*.md"):
        name = markdown.stem
        built_page = site / "index.html" if name == "index" else site / name / "index.html"
        assert built_page.exists(), markdown.name
