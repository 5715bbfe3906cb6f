"""What holding several adapters costs: one MSPLoRA adapter loaded against four loaded with the
same one active, on the --model LLaMA-style model (random weights, no download).

A training step (forward and backward) and an inference forward (no_grad) of the whole model,
timed in interleaved rounds (timing.time_cpu_interleaved), medians with 20-80% quantiles.

    python bench/several_adapters.py --json bench/results/cpu-adapters-....json
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import model_step  # noqa: E402
import report  # noqa: E402
import timing  # noqa: E402

import msplora_kernels as mk  # noqa: E402


def adapted(base, loaded: int, targets):
    """The base with `loaded` adapters of the paper's ranks, the first one active, B random."""
    model = mk.apply_msplora(base, mk.MSPLoraConfig(target_modules=targets, ranks=(8, 4, 2), dropout=0.05))
    for k in range(1, loaded):
        mk.apply_msplora(model, mk.MSPLoraConfig(target_modules=targets, ranks=(8, 4, 2), dropout=0.05),
                         adapter_name=f"extra{k}")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name in mk.adapter_names(model):
            for key, t in mk.adapter_state_dict(model, name).items():
                if key.endswith(".B"):
                    t.copy_(torch.randn(t.shape, generator=g) * 0.01)
    return model.train()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--targets", choices=list(model_step.TARGETS), default="qv")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--tokens", type=int, default=512, help="tokens per step (batch 2 x tokens/2)")
    p.add_argument("--json", type=Path, default=None, help="write the records and the machine's description here")
    args = p.parse_args(argv)
    shape = model_step.SHAPES["cpu"]
    targets = model_step.TARGETS[args.targets]
    ids = torch.randint(0, shape["vocab_size"], (2, args.tokens // 2), generator=torch.Generator().manual_seed(1))
    models = {f"{n} loaded": adapted(model_step._base(shape, "cpu", torch.float32), n, targets) for n in (1, 4)}

    def step(model):
        def run():
            for p_ in model.parameters():
                p_.grad = None
            model(ids, labels=ids).loss.backward()
        return run

    def infer(model):
        def run():
            with torch.no_grad():
                model(ids)
        return run

    records = []
    for kind, make in (("training step", step), ("no_grad forward", infer)):
        timings = timing.time_cpu_interleaved({name: make(m) for name, m in models.items()}, args.repeats)
        for name, t in timings.items():
            records.append({"kind": kind, "adapters": name, "targets": args.targets, "tokens": args.tokens,
                            "ms": t["median"], "q20_ms": t["q20"], "q80_ms": t["q80"],
                            "vs_one_loaded": t["median"] / timings["1 loaded"]["median"]})
    print(f"{report.device_name('cpu')}, float32, model {shape['name']} ({shape['num_hidden_layers']} layers, hidden "
          f"{shape['hidden_size']}), {args.targets}, {args.tokens} tokens, median of {args.repeats} rounds")
    for r in records:
        print(f"{r['kind']:16s} {r['adapters']:9s} {r['ms']:9.2f} ms  [{r['q20_ms']:.2f}, {r['q80_ms']:.2f}]  "
              f"x one loaded {r['vs_one_loaded']:.3f}")
    if args.json:
        report.write_json(args.json, report.metadata("cpu", torch.float32), records)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
