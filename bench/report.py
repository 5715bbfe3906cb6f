"""Output of bench/throughput.py: run metadata, ratios, the aligned table, JSON and the bar chart."""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

import msplora_kernels as mk
from msplora_kernels.ops.cpu_info import cpu_info, cpu_label
from msplora_kernels.ops.backends import triton_gemm_choices
from msplora_kernels.ops.native import gemm_choices

import results_index  # bench/'s own, beside this file


def device_name(device) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name()
    return f"{cpu_label()}, {torch.get_num_threads()} threads"


def metadata(device, dtype) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
        # Uncommitted code changes; the results being written are not a change to the code.
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                     ":!bench/results"], cwd=root, capture_output=True, text=True).stdout.strip())
    except OSError:
        commit, dirty = None, None
    # A copy of the tree without .git (a remote GPU machine) passes its commit in the environment.
    commit = commit or os.environ.get("MSPLORA_GIT_COMMIT")
    return {
        "device": str(device),
        "device_name": device_name(device),
        "cpu_isa": cpu_info()["isa"],
        "dtype": str(dtype).replace("torch.", ""),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        # What the cpp backend measured and chose per GEMM and shape class during the run.
        "cpu_gemm_choices": gemm_choices(),
        # What the triton backend timed and chose per frozen GEMM and shape bucket (auto mode).
        "triton_gemm_choices": triton_gemm_choices(),
        "settings": {name: v["value"] for name, v in mk.backend_info()["settings"].items()},
        "gemm_libraries": {name: b["gemm_library"] for name, b in mk.backend_info()["backends"].items()},
        "python": platform.python_version(),
        "git_commit": commit,
        "git_dirty": dirty,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
    }


def flop_floor(r: dict) -> float | None:
    """The least fwd+bwd time an adapted layer can take relative to the frozen linear, by FLOPs:
    the frozen layer does 4MKN (forward and the input gradient), the adapter's six rank-R GEMMs
    (shrink, expand, dT, dB, dA and its dx term) 6MR(K+N). None for the frozen linear and the model step."""
    if "layers" in r or not r.get("ranks"):
        return None
    k, n, rank = r["in_features"], r["out_features"], sum(r["ranks"])
    return 1.0 + 3.0 * rank * (k + n) / (2.0 * k * n)


def group(r: dict) -> tuple:
    """The records compared with each other: one case in one dtype at one dropout."""
    return r["case"], r["dtype"], r["dropout"]


def group_label(r: dict, records: list[dict]) -> str:
    """The case, and the dtype and dropout where the records hold several."""
    parts = [r["case"]]
    if len({x["dtype"] for x in records}) > 1:
        parts.append(r["dtype"])
    if len({x["dropout"] for x in records}) > 1:
        parts.append(f"p={r['dropout']:g}")
    return " ".join(parts)


def add_ratios(records: list[dict]) -> None:
    """Each record's fwd+bwd time relative to the floor (`linear`, or `no_adapter` for a model step;
    stored as vs_linear), to `peft_lora` and to `msplora_naive` of the same case."""
    ref = {}
    for r in records:
        if r["method"] in ("linear", "linear_onednn", "peft_lora", "msplora_naive", "no_adapter"):
            ref[(group(r), r["method"])] = r["fwd_bwd_ms"]

    def ratio(r, *methods):
        base = next((ref[(group(r), m)] for m in methods if (group(r), m) in ref), None)
        return r["fwd_bwd_ms"] / base if base else None

    for r in records:
        r["vs_linear"] = ratio(r, "linear", "no_adapter")
        # The faster of the two frozen linears, where oneDNN's was timed too.
        fastest = min([ref[(group(r), m)] for m in ("linear", "linear_onednn") if (group(r), m) in ref], default=None)
        r["vs_fastest_linear"] = r["fwd_bwd_ms"] / fastest if fastest and (group(r), "linear_onednn") in ref else None
        r["vs_peft_lora"] = ratio(r, "peft_lora")
        r["vs_naive"] = ratio(r, "msplora_naive")
        r["flop_floor_vs_linear"] = flop_floor(r)
        # The least x peft_lora the FLOPs allow: the floor over the faster frozen linear measured.
        peft = ref.get((group(r), "peft_lora"))
        r["flop_floor_vs_peft"] = (r["flop_floor_vs_linear"] * fastest / peft
                                   if r["flop_floor_vs_linear"] and fastest and peft else None)


def dropouts(records: list[dict]) -> str:
    return ", ".join(f"{p:g}" for p in sorted({r["dropout"] for r in records}))


def label(r: dict) -> str:
    return r["method"] + (f"[{r['backend']}]" if r.get("backend") else "")


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def table(records: list[dict]) -> str:
    floor = "x no_adapter" if any(r["method"] == "no_adapter" for r in records) else "x linear"
    cols = [
        ("case", lambda r: group_label(r, records)),
        ("method", label),
        ("tokens", lambda r: str(r["tokens"])),
        ("trainable", lambda r: f"{r['trainable_params']:,}"),
        ("fwd ms", lambda r: _fmt(r["fwd_ms"], ".2f")),
        ("fwd+bwd ms", lambda r: _fmt(r["fwd_bwd_ms"], ".2f")),
        ("q20-q80", lambda r: f"{r['fwd_bwd_q20_ms']:.2f}-{r['fwd_bwd_q80_ms']:.2f}"),
        (floor, lambda r: _fmt(r["vs_linear"], ".3f")),
        ("x fastest linear", lambda r: _fmt(r.get("vs_fastest_linear"), ".3f")),
        ("floor", lambda r: _fmt(r.get("flop_floor_vs_linear"), ".3f")),
        ("x peft_lora", lambda r: _fmt(r["vs_peft_lora"], ".3f")),
        ("floor x peft", lambda r: _fmt(r.get("flop_floor_vs_peft"), ".3f")),
        ("x naive", lambda r: _fmt(r["vs_naive"], ".3f")),
        ("tokens/s", lambda r: f"{r['tokens_per_s']:,.0f}"),
        ("peak MB", lambda r: _fmt(r["peak_mem_mb"], ".1f")),
        ("weights MB", lambda r: _fmt(r.get("weights_mb"), ".1f")),
    ]
    for name, key in (("x naive", "vs_naive"), ("floor", "flop_floor_vs_linear"), ("weights MB", "weights_mb"),
                      ("x fastest linear", "vs_fastest_linear")):
        if all(r.get(key) is None for r in records):
            cols = [c for c in cols if c[0] != name]
    rows = [[name for name, _ in cols]] + [[f(r) for _, f in cols] for r in records]
    widths = [max(len(row[i]) for row in rows) for i in range(len(cols))]
    lines = []
    for k, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json(path, meta: dict, records: list[dict]) -> None:
    """Write the run; a run written into bench/results/ (a run to commit) also gets its row in the
    results index."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({"meta": meta, "records": records}, indent=2) + "\n")
    if results_index.in_results(path):
        results_index.append(Path(path))


def plot(path, meta: dict, records: list[dict]) -> None:
    """Grouped bars of forward+backward time relative to the frozen linear layer, one group per case."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys(group_label(r, records) for r in records))
    labels = list(dict.fromkeys(label(r) for r in records))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(cases) * len(labels) / 3 + 3), 4.5))
    width = 0.8 / len(labels)
    for i, lab in enumerate(labels):
        xs, ys = [], []
        for j, case in enumerate(cases):
            r = next((r for r in records if group_label(r, records) == case and label(r) == lab), None)
            if r and r["vs_linear"] is not None:
                xs.append(j + (i - (len(labels) - 1) / 2) * width)
                ys.append(r["vs_linear"])
        bars = ax.bar(xs, ys, width, label=lab)
        ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    for j, case in enumerate(cases):
        floors = [r.get("flop_floor_vs_linear") for r in records
                  if group_label(r, records) == case and r["method"].startswith("msplora")]
        if floors and floors[0]:
            ax.hlines(floors[0], j - 0.42, j + 0.42, colors="dimgray", linestyles=":", linewidth=1.2,
                      label="MSPLoRA FLOP floor" if j == 0 else None)
    ax.set_xticks(range(len(cases)), [c.replace(" ", "\n", 1) for c in cases], fontsize=8)
    step = any(r["method"] == "no_adapter" for r in records)
    ax.set_ylabel("training step time / no adapter" if step else "forward+backward time / frozen nn.Linear")
    dtypes = ", ".join(dict.fromkeys(r["dtype"] for r in records))
    ax.set_title(f"MSPLoRA {'training-step' if step else 'layer'} cost, {dtypes}, dropout {dropouts(records)}\n"
                 f"on {meta['device_name']}", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_ylim(0, max(r["vs_linear"] or 0 for r in records) * 1.15)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
