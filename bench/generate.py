"""Greedy generation with the adapter unmerged: tokens per second against the merged model.

    python bench/generate.py                                  # batch 1 and 8, q/v and all-linear
    python bench/generate.py --batches 1 --targets qv --json gen.json

On the LLaMA-style model `throughput.py --model` trains (random weights, nothing downloaded):
the base model, MSPLoRA merged, MSPLoRA unmerged (the layer's path without autograd) and PEFT's
LoRA unmerged at the global rank, each generating the same number of new tokens greedily under
inference_mode, timed in interleaved rounds. Then one adapted layer's call at 1 and 8 tokens,
against nn.Linear and PEFT's LoRA layer. Medians, with the CPU and versions in the JSON.
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import methods  # noqa: E402
import model_step  # noqa: E402
import report  # noqa: E402
import timing  # noqa: E402

import msplora_kernels as mk  # noqa: E402


def _randomized(model):
    # Trained-like B factors: a zero adapter would merge to the base model and hide its cost.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".B") or "lora_B" in name:
                p.normal_(std=0.02)
    return model.eval()


def models(base, shape, targets, backend):
    """name -> model, each a copy of the same base."""
    import peft

    ranks = shape["ranks"]
    msplora = mk.apply_msplora(copy.deepcopy(base), mk.MSPLoraConfig(target_modules=targets, ranks=ranks,
                                                                      backend=backend), autocast_adapter_dtype=False)
    merged = mk.merge_and_unload(copy.deepcopy(_randomized(msplora)))
    lora = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(target_modules=targets, r=ranks[0], lora_alpha=16),
                               autocast_adapter_dtype=False)
    return {"base": base.eval(), "msplora_merged": merged, "msplora_unmerged": msplora,
            "peft_lora_unmerged": _randomized(lora)}


def generation_records(args, shape, dtype) -> list[dict]:
    base = model_step._base(shape, "cpu", dtype)
    records = []
    for target in args.targets:
        variants = models(base, shape, model_step.TARGETS[target], args.backend)
        for batch in args.batches:
            prompt = torch.randint(0, shape["vocab_size"], (batch, args.prompt), generator=torch.Generator().manual_seed(0))

            def run(model):
                with torch.inference_mode():
                    return model.generate(prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                          do_sample=False, pad_token_id=0)

            outputs = {name: run(m) for name, m in variants.items()}
            times = timing.time_cpu_interleaved({name: (lambda m=m: run(m)) for name, m in variants.items()},
                                                args.repeats, warmup=1)
            for name, t in times.items():
                tokens_per_s = batch * args.new_tokens / (t["median"] / 1e3)
                records.append({"kind": "generate", "targets": target, "batch": batch, "method": name,
                                "new_tokens": args.new_tokens, "ms": t["median"], "q20_ms": t["q20"], "q80_ms": t["q80"],
                                "ms_per_token": t["median"] / args.new_tokens, "tokens_per_s": tokens_per_s,
                                # Unmerged and merged compute the same function: greedy tokens agree
                                # but for ties that rounding can break.
                                "same_tokens_as_merged": bool(torch.equal(outputs[name], outputs["msplora_merged"]))})
            merged = next(r for r in records[-len(times):] if r["method"] == "msplora_merged")
            for r in records[-len(times):]:
                r["vs_merged_tokens_per_s"] = r["tokens_per_s"] / merged["tokens_per_s"]
    return records


def layer_records(args, shape, dtype) -> list[dict]:
    d = shape["hidden_size"]
    case = methods.Case("decode-layer", d, d, shape["ranks"], shape["ranks"][0], 0, 0, 0)
    layers = {m: methods.build(m, args.backend if m == "msplora" else None, case, "cpu", dtype, 0.05).eval()
              for m in ("linear", "peft_lora", "msplora")}
    records = []
    for tokens in (1, 8):
        x = torch.randn(tokens, d, dtype=dtype)

        def call(layer, n=200):
            with torch.inference_mode():
                for _ in range(n):
                    layer(x)

        times = timing.time_cpu_interleaved({m: (lambda l=l: call(l)) for m, l in layers.items()}, args.repeats * 4)
        for m, t in times.items():
            records.append({"kind": "layer_call", "tokens": tokens, "features": d, "method": m,
                            "us_per_call": t["median"] * 1e3 / 200})
        peft_us = next(r["us_per_call"] for r in records[-3:] if r["method"] == "peft_lora")
        for r in records[-3:]:
            r["vs_peft_lora"] = r["us_per_call"] / peft_us
    return records


def table(records) -> str:
    lines = [f"{'targets':<11} {'batch':>5} {'method':<20} {'ms/token':>9} {'tokens/s':>9} {'x merged':>9} {'same tokens':>11}"]
    for r in records:
        if r["kind"] == "generate":
            lines.append(f"{r['targets']:<11} {r['batch']:>5} {r['method']:<20} {r['ms_per_token']:>9.2f} "
                         f"{r['tokens_per_s']:>9.1f} {r['vs_merged_tokens_per_s']:>9.3f} {str(r['same_tokens_as_merged']):>11}")
    lines.append("")
    lines.append(f"{'layer call':<11} {'tokens':>6} {'method':<12} {'us':>8} {'x peft_lora':>12}")
    for r in records:
        if r["kind"] == "layer_call":
            lines.append(f"{r['features']:>5}x{r['features']:<5} {r['tokens']:>6} {r['method']:<12} {r['us_per_call']:>8.1f} "
                         f"{r['vs_peft_lora']:>12.3f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--targets", nargs="+", default=["qv", "all-linear"], choices=list(model_step.TARGETS))
    p.add_argument("--prompt", type=int, default=16, help="prompt tokens")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--backend", default="cpp", help="MSPLoRA's backend for the unmerged model")
    p.add_argument("--json", help="write the records and the machine's description here")
    args = p.parse_args(argv)
    methods.quiet_bitsandbytes_import()
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    shape = model_step.SHAPES["cpu"]
    records = generation_records(args, shape, dtype) + layer_records(args, shape, dtype)
    print(f"{report.device_name('cpu')}, {args.dtype}, model {shape['name']} (hidden {shape['hidden_size']}, "
          f"{shape['num_hidden_layers']} layers), prompt {args.prompt}, {args.new_tokens} new tokens, greedy, "
          f"median of {args.repeats} rounds")
    print(table(records))
    if args.json:
        report.write_json(args.json, report.metadata("cpu", dtype), records)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
