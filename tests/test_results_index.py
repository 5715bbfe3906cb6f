"""bench/results/index.jsonl: every committed run has its row, and every row finds its file."""
import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
import results_index  # noqa: E402


def test_every_result_in_the_folder_has_its_row_and_every_row_its_file():
    rows = results_index.read()
    files = {p.stem for p in results_index.RESULTS.glob("*.json")}
    assert files and files <= {r["file"] for r in rows}
    for r in rows:
        # A current run is in the folder; an older one names the commit that still holds it.
        assert r["file"] in files or len(r.get("last_commit", "")) >= 7, r["file"]
        assert r["date"] and r["kind"] and r["cells"], r["file"]


def test_a_rows_cells_are_its_runs_numbers(tmp_path, monkeypatch):
    monkeypatch.setattr(results_index, "INDEX", tmp_path / "index.jsonl")
    run = results_index.RESULTS / "cpu-sweep-2026-12-07-xeon-amx.json"
    row = results_index.append(run)
    records = json.loads(run.read_text())["records"]
    cpp = [r for r in records if r["method"] == "msplora" and r["backend"] == "cpp"]
    assert row["kind"] == "sweep" and len(row["cells"]) == len(cpp) == 8
    first = cpp[0]
    assert f"{float(first['fwd_bwd_ms']):.2f} ms" in row["cells"][0]
    assert f"x peft {float(first['vs_peft_lora']):.3f}" in row["cells"][0]
    results_index.append(run)  # the same run again replaces its row
    assert [r["file"] for r in results_index.read()] == [run.stem]
