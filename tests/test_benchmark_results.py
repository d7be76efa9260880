"""benchmarks/results.py: the GPU scripts' results file survives a failing section and is written
after each one (a device call cut by its time limit keeps what finished)."""

from __future__ import annotations

import json

from benchmarks.results import Results


def test_sections_record_results_errors_and_save(tmp_path):
    r = Results(str(tmp_path / "a.json"))
    r.path = str(tmp_path / "b.json")  # main() sets it from --out after the decorators ran

    @r.section
    def good(res, x):
        res["x"] = x

    @r.section
    def bad(res):
        raise RuntimeError("no GPU here")

    good(3)
    assert json.loads((tmp_path / "b.json").read_text())["good"]["x"] == 3
    bad()
    saved = json.loads((tmp_path / "b.json").read_text())
    assert "RuntimeError: no GPU here" in saved["bad"]["error"] and "wall_s" in saved["good"]
    assert not (tmp_path / "a.json").exists()
