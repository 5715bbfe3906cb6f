"""The index of committed benchmark runs: bench/results/index.jsonl, one JSON line per run.

bench/results/ keeps the current result of each kind of machine; every run committed there is
also a row here (date, commit measured, machine, what ran, its headline cells), so that older runs
can leave the folder and stay findable: a row whose file is gone names `last_commit`, the commit
where `git show <last_commit>:bench/results/<file>.json` still gives it.

    python bench/results_index.py bench/results/cpu-sweep-....json   # append the run's row
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
INDEX = RESULTS / "index.jsonl"


def _kind(command: str, data: dict) -> str:
    if "summary" in data or "arch" in data:
        return "compile"
    if "runs" in data:
        return "gemm floor"
    for flag, kind in (("--sweep", "sweep"), ("--model", "model step"), ("generate.py", "generate"),
                       ("profile_ops", "op profile"), ("several_adapters.py", "several adapters")):
        if flag in command:
            return kind
    return "layer"


def _cells(data: dict) -> list[str]:
    """The numbers a reader compares runs by: the fused op against the frozen layer and PEFT for the
    layer benchmarks, tokens/s against the merged model for generation, the counts for compiles."""
    if "summary" in data:
        return [f"sm{arch}: " + ", ".join(f"{k} {v}" for k, v in counts.items()) for arch, counts in data["summary"].items()]
    if "runs" in data:  # gemm_floor.py: the GEMMs' medians per case
        return [f"{run['case']} {name} {t['median']:.2f} ms" for run in data["runs"] for name, t in run["timings"].items()]
    if "arch" in data:  # an early compile report: launches per architecture, and its problems
        return [f"sm{data['arch']}: {len(data['records'])} launches, {len(data.get('problems', []))} problems"]
    cells = []
    for r in data.get("records", []):
        if "vs_one_loaded" in r:
            cells.append(f"{r['kind']} {r['adapters']}: {float(r['ms']):.2f} ms, x one loaded {float(r['vs_one_loaded']):.3f}")
        elif r.get("kind") == "generate" and r.get("method") == "msplora_unmerged":
            cells.append(f"{r['targets']} batch {r['batch']}: x merged tokens/s {float(r['vs_merged_tokens_per_s']):.3f}")
        elif str(r.get("method", "")).startswith("msplora") and r.get("backend") not in (None, "None", "torch") \
                and r.get("method") != "msplora_naive":
            where = " ".join(str(r[k]) for k in ("case", "quantize", "dtype") if r.get(k) not in (None, "None"))
            linear = r.get("vs_fastest_linear") if r.get("vs_fastest_linear") not in (None, "None") else r.get("vs_linear")
            cells.append(f"{where} p{r.get('dropout')} {r['method']}[{r['backend']}] {float(r['fwd_bwd_ms']):.2f} ms, "
                         f"x linear {float(linear):.3f}, x peft {float(r['vs_peft_lora']):.3f}")
    return cells


def row(path: Path) -> dict:
    """The index row of one result file (its JSON)."""
    path = Path(path)
    data = json.loads(path.read_text())
    meta = data.get("meta") or (data["runs"][0]["meta"] if data.get("runs") else data)
    command = str(meta.get("command", ""))
    return {
        "file": path.stem,
        "date": str(meta.get("date") or re.search(r"\d{4}-\d{2}-\d{2}", path.stem).group())[:10],
        "commit": str(meta.get("git_commit") or "")[:10],
        "machine": str(meta.get("device_name") or meta.get("device") or ""),
        "torch": meta.get("torch"),
        "kind": _kind(command, data),
        "command": command,
        "cells": _cells(data),
    }


def read() -> list[dict]:
    if not INDEX.exists():
        return []
    return [json.loads(line) for line in INDEX.read_text().splitlines() if line.strip()]


def append(path: Path) -> dict:
    """Add the run's row (replacing a row of the same file), and return it."""
    new = row(path)
    rows = [r for r in read() if r["file"] != new["file"]] + [new]
    INDEX.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return new


def in_results(path) -> bool:
    """Whether a result file is written into bench/results/, where runs are committed."""
    return Path(path).resolve().parent == RESULTS


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", type=Path, help="result JSON files to add to the index")
    for path in p.parse_args(argv).files:
        print(json.dumps(append(path)))


if __name__ == "__main__":
    main()
