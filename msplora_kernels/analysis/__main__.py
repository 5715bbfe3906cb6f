"""python -m msplora_kernels.analysis ADAPTER_DIR [--compare-lora PEFT_DIR] [--spectra SPECTRA_JSON] --out DIR"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .._extras import MissingExtraError
from . import plots
from .metrics import analyze
from .spectra import pairs_from_dir
from .tracking import SpectrumRecorder


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m msplora_kernels.analysis", description=__doc__)
    p.add_argument("adapter_dir", type=Path, help="a directory written by msplora_kernels.save_adapter")
    p.add_argument("--compare-lora", type=Path, default=None, help="a PEFT LoRA adapter directory to compare with")
    p.add_argument("--spectra", type=Path, default=None, help="a SpectrumRecorder JSON to plot over training")
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    pairs, config = pairs_from_dir(args.adapter_dir)
    metrics = analyze(pairs, config, lora_dir=args.compare_lora, top_k=args.top_k)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    written = [args.out / "metrics.json"]
    try:
        written.append(plots.effective_rank_plot(metrics, args.out / "effective_rank.png"))
        if metrics["layer_kl"]:
            written.append(plots.kl_heatmaps(metrics, args.out / "layer_kl.png"))
        if args.spectra:
            written.append(plots.spectra_over_time(SpectrumRecorder.load(args.spectra), args.out / "spectra_over_time.png"))
    except MissingExtraError as exc:
        print(f"no figures: {exc}", file=sys.stderr)  # the metrics are written all the same
    for row in metrics["levels"]:
        print(f"level {row['level']} (rank {row['rank']}, groups {row['groups']}): {row['factor_pairs']} factor pairs, "
              f"mean entropy effective rank {row['mean_entropy_effective_rank']:.3f}")
    for target, d in metrics.get("kl_difference", {}).items():
        print(f"{target}: mean layer-specific KL, MSPLoRA minus LoRA = {d['mean']:+.4f}")
    print("wrote " + ", ".join(str(w) for w in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
