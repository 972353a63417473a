"""Load, CI size: readers (status --json, report, ad-hoc SQL) in other processes while a writer
inserts through Store at full speed; no "database is locked" reaches anyone and no row is lost.
The long run is `benchmarks/load.py` (results in benchmarks/RESULTS.md)."""

from __future__ import annotations

import pytest
from load import load

pytestmark = pytest.mark.slow


def test_readers_never_see_locked_and_the_writer_loses_nothing(tmp_path):
    res = load(tmp_path / "load", seconds=6.0, readers=3, batch=96)
    print(res)
    assert all(n > 0 for n in res["reader_calls"].values()), res  # every kind of reader really ran
    assert res["locked_errors_at_readers"] == 0 and res["other_reader_errors"] == 0, res["errors"]
    assert res["writer_errors"] == 0, res["errors"]
    assert res["rows_written"] == res["rows_stored"] > 0
    assert res["integrity"] == "ok"
    # readers cost the writer CPU on a 2-core machine, but never stall it
    assert res["writer_rows_per_s_with_readers"] > 0
