"""`edgefleet demo --quick` runs end to end: trains, signs, serves, hot-swaps, loses nothing."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from edgefleet.cli import cli


def test_demo_quick_end_to_end(tmp_path: Path):
    result = CliRunner().invoke(cli, ["demo", "--quick", "--json", "--workdir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["lost"] == 0
    assert summary["errors"] == 0
    assert summary["sent"] == summary["answered"] > 0
    assert set(summary["answered_by_version"]) == {"1", "2"}, "the hot swap did not happen"
    assert min(summary["accuracy"].values()) > 0.8
    assert (tmp_path / "digits-v2" / "manifest.sig").exists()
