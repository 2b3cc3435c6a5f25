"""Every run records the code that made it: version + commit, "unknown" outside a checkout."""

from __future__ import annotations

import subprocess

from dinocell import __version__
from dinocell import provenance as prov


def test_provenance_names_version_and_this_checkout_commit() -> None:
    p = prov.provenance()
    assert p["dinocell_version"] == __version__
    head = subprocess.run(
        ["git", "-C", str(prov.Path(prov.__file__).parent), "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    if head:  # a checkout: the commit is HEAD (maybe +dirty)
        assert p["git_commit"].split("+")[0] == head
    else:
        assert p["git_commit"] == "unknown"


def test_outside_a_checkout_the_commit_is_unknown(monkeypatch, tmp_path) -> None:
    prov.git_commit.cache_clear()
    monkeypatch.setattr(prov, "__file__", str(tmp_path / "dinocell" / "provenance.py"))
    try:
        assert prov.git_commit() == "unknown"
    finally:
        prov.git_commit.cache_clear()
