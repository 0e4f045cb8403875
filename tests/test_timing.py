"""The benchmarks' result files (``timing.save_results``): dated names, JSON rows and the table."""

from __future__ import annotations

import datetime as dt
import json

from mta_rewrite.timing import results_name, save_results


def test_results_are_dated_tagged_and_written_whole(tmp_path):
    today = dt.date.today().isoformat()
    assert results_name("exact_sites") == f"exact_sites_{today}"
    assert results_name("exact_sites", "rerun") == f"exact_sites_{today}_rerun"
    rows = [{"model": "m", "ms": 1.5}]
    save_results(tmp_path, "r", rows, "some CPU", "| a |\n|---|\n")
    assert json.loads((tmp_path / "r.json").read_text()) == {"date": today, "machine": "some CPU", "rows": rows}
    assert (tmp_path / "r.md").read_text() == "| a |\n|---|\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "r.md"]  # no temporary files left
