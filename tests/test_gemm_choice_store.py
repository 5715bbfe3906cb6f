"""The cpp backend's timed GEMM choices kept on disk (csrc/cpu/choice_store.h): every process on
one machine picks alike, so two runs of the same script give the same bits."""
import json
import os
import subprocess
import sys

import pytest

import msplora_kernels as mk

pytestmark = pytest.mark.skipif("cpp" not in mk.available_backends("cpu"), reason="needs the compiled cpp backend")

# One training step of a layer at shapes where every GEMM is timed (cold and hot), in a fresh
# process: the digest of its output and every gradient, bit for bit, and the choices it made.
_STEP = """
import hashlib, json, sys
import torch
import msplora_kernels as mk
from msplora_kernels.ops.native import gemm_choice_file, gemm_choices

dtype = getattr(torch, sys.argv[1])
torch.manual_seed(1234)
layer = mk.MSPLoraLinear(768, 512, ranks=(8, 4, 2), dropout=0.1, backend="cpp", dtype=dtype).train()
with torch.no_grad():
    for level in layer.levels:
        level.B.normal_(std=0.05)
x = torch.randn(1536, 768, dtype=dtype, requires_grad=True)
dy = torch.randn(1536, 512, dtype=dtype)
torch.manual_seed(99)
y = layer(x)
y.backward(dy)
digest = hashlib.sha256()
for t in [y, x.grad] + [p.grad for p in layer.parameters() if p.requires_grad]:
    digest.update(t.detach().contiguous().view(torch.uint8).numpy().tobytes())
print(json.dumps({"digest": digest.hexdigest(), "choices": gemm_choices(),
                  "file": str(gemm_choice_file()) if gemm_choice_file() else None}))
"""


def _env(cache, **settings):
    env = dict(os.environ, XDG_CACHE_HOME=str(cache))
    env.pop("MSPLORA_CPU_GEMM_STORE", None)  # the default: disk
    env.update({f"MSPLORA_{name.upper()}": value for name, value in settings.items()})
    return env


def _start(cache, dtype="float32", **settings):
    return subprocess.Popen([sys.executable, "-c", _STEP, dtype], env=_env(cache, **settings), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _result(proc):
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def _rewrite_picks(path, candidate):
    """Every stored row names `candidate`; returns the rows there were."""
    rows = [row.split("\t") for row in open(path).read().splitlines()]
    with open(path, "w") as f:
        for row in rows:
            f.write("\t".join(row[:7] + [candidate] + row[8:]) + "\n")
    return rows


def _picks(choices):
    return sorted(line.split(" (")[0] for line in choices)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_second_process_reads_the_first_ones_choices_and_gives_the_same_bits(tmp_path, dtype):
    first = _result(_start(tmp_path, dtype))
    assert first["file"] and first["file"].startswith(str(tmp_path)), first["file"]
    timed = [line for line in first["choices"] if "(cold: " in line or "(hot: " in line]
    assert len(timed) >= 6, first["choices"]  # the frozen and adapter GEMMs, each timed once
    rows = open(first["file"]).read().splitlines()
    assert len(rows) == len(timed) and all(len(row.split("\t")) == 9 for row in rows), rows
    second = _result(_start(tmp_path, dtype))
    assert all("(stored: " in line for line in second["choices"] if "(the only one" not in line), second["choices"]
    # The same picks; the first may list more: the choices made while it timed one pass against two.
    assert set(_picks(second["choices"])) <= set(_picks(first["choices"]))
    assert second["digest"] == first["digest"]
    assert open(first["file"]).read().splitlines() == rows  # nothing timed or written again


def test_two_processes_starting_together_make_one_pick(tmp_path):
    # The file is locked from the look-up to the append: the one that waits reads the other's pick.
    procs = [_start(tmp_path) for _ in range(2)]
    a, b = (_result(p) for p in procs)
    picks_a, picks_b = set(_picks(a["choices"])), set(_picks(b["choices"]))
    assert picks_a <= picks_b or picks_b <= picks_a, (picks_a, picks_b)
    assert a["digest"] == b["digest"]
    keys = ["\t".join(row.split("\t")[:7]) for row in open(a["file"]).read().splitlines()]
    assert len(keys) == len(set(keys)), "a GEMM and shape class was stored twice"


def test_the_stored_pick_is_what_runs(tmp_path):
    # Rewrite every stored pick to aten:plain: the next process must run exactly what a process
    # with cpu_gemm="aten:plain" runs (the same bits), though its own timing might pick otherwise.
    first = _result(_start(tmp_path))
    _rewrite_picks(first["file"], "aten:plain")
    forced = _result(_start(tmp_path))
    assert all(line.split(" -> ")[1].startswith("aten:plain (stored: ") for line in forced["choices"]
               if "(the only one" not in line), forced["choices"]
    plain = _result(_start(tmp_path / "other", cpu_gemm="aten:plain"))
    assert forced["digest"] == plain["digest"]


def test_a_row_naming_a_candidate_this_process_cannot_take_is_timed_again(tmp_path):
    first = _result(_start(tmp_path))
    rows = _rewrite_picks(first["file"], "no-such-candidate")
    again = _result(_start(tmp_path))
    assert not any("(stored: " in line for line in again["choices"]), again["choices"]
    # Its new picks are appended; the last row for a key wins from then on.
    assert len(open(first["file"]).read().splitlines()) == 2 * len(rows)
    third = _result(_start(tmp_path))
    assert set(_picks(third["choices"])) <= set(_picks(again["choices"])) and third["digest"] == again["digest"]


def test_process_store_keeps_nothing_on_disk(tmp_path):
    result = _result(_start(tmp_path, cpu_gemm_store="process"))
    assert result["file"] is None
    assert not (tmp_path / "msplora_kernels" / "gemm-choices").exists() or not any(
        (tmp_path / "msplora_kernels" / "gemm-choices").iterdir())
    assert any("(cold: " in line or "(hot: " in line for line in result["choices"])
