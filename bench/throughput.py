"""Side-by-side speed of MSPLoRA layers against a frozen linear, PEFT LoRA and naive MSPLoRA.

    python bench/throughput.py                      # default cases on the best device
    python bench/throughput.py --quick --json r.json --plot r.png
    python bench/throughput.py --model              # a full training step of a LLaMA-style model
    python bench/throughput.py --sweep              # float32 and bfloat16, dropout 0.05 and 0, in one run
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import methods  # noqa: E402
import report  # noqa: E402
from runs import progress_bar, time_all  # noqa: E402
import timing  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--cases", nargs="+", default=list(methods.DEFAULT_CASES), choices=sorted(methods.CASES))
    p.add_argument("--methods", nargs="+", default=list(methods.METHODS), choices=methods.METHODS)
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--tokens", type=int, default=None, help="override the case's token count")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds on the CPU (default 15, quick 5)")
    p.add_argument("--dropout", type=float, default=None,
                   help=f"adapter dropout (default: the paper's {methods.PAPER_DROPOUT}; 0 turns it off)")
    p.add_argument("--sweep", action="store_true",
                   help="every combination of --dtypes and --dropouts in one run (default: float32 and bfloat16, "
                        "the paper's dropout and 0)")
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["float32", "bfloat16"],
                   help="the dtypes of --sweep")
    p.add_argument("--dropouts", nargs="+", type=float, default=None, help="the dropouts of --sweep")
    p.add_argument("--quick", action="store_true", help="fewer tokens and repeats (under 3 minutes on a CPU)")
    p.add_argument("--cuda-graphs", action="store_true", help="on a GPU, time CUDA-graph replays")
    p.add_argument("--model", action="store_true", help="time a full training step of a LLaMA-style model instead")
    p.add_argument("--targets", choices=["qv", "all-linear"], default="qv", help="adapted modules for --model")
    p.add_argument("--quantize", choices=["nf4", "int8"], default=None,
                   help="with --model: also the step on a bitsandbytes-quantized base (QLoRA against MSPLoRA)")
    p.add_argument("--predict", action="store_true",
                   help="print the cost model's predictions (bench/cost_model.py) for the cases: for H100, H200 "
                        "and A100 without a GPU; on a GPU, from its measured ceilings, beside the measurement")
    p.add_argument("--json", type=Path, default=None, help="write records and metadata here")
    p.add_argument("--plot", type=Path, default=None, help="write a PNG bar chart here")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    if args.dropout is not None and not 0.0 <= args.dropout < 1.0:
        p.error(f"--dropout must be in [0, 1), got {args.dropout}")
    args.dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if args.device == "cuda" else torch.float32)
    if args.quantize and not args.model:
        p.error("--quantize applies to --model (a training step of a quantized model)")
    if args.sweep and (args.model or args.dropout is not None):
        p.error("--sweep sweeps dtypes and dropouts of the layer cases; give --dtypes and --dropouts instead")
    args.dropouts = args.dropouts or [methods.PAPER_DROPOUT, 0.0]
    if not all(0.0 <= d < 1.0 for d in args.dropouts):
        p.error(f"--dropouts must be in [0, 1), got {args.dropouts}")
    if args.repeats is None:
        args.repeats = 5 if args.quick else 15
    return args


def tokens_for(case, args) -> int:
    if args.tokens:
        return args.tokens
    if args.device == "cuda":
        return case.gpu_tokens
    return case.quick_tokens if args.quick else case.cpu_tokens


def _calls(layer, pool):
    """The forward and forward+backward of one layer, cycling through the shared input pool. The
    gradients start from None each call, as after a training step's zero_grad(set_to_none=True):
    left to accumulate, every method paid an add per trained tensor that training does not."""
    step = iter(range(10**12))
    trained = [p for p in layer.parameters() if p.requires_grad]

    def fwd():
        x, _ = pool[next(step) % len(pool)]
        return layer(x)

    def fwd_bwd():
        x, dy = pool[next(step) % len(pool)]
        x.grad = None
        for p in trained:
            p.grad = None
        layer(x).backward(dy)

    return fwd, fwd_bwd


def case_records(case, runs, args, progress) -> list[dict]:
    """Every method of one case, on the same fresh random inputs and output gradients (never zeros)."""
    tokens = tokens_for(case, args)
    dropout = case.dropout if args.dropout is None else args.dropout
    pool = [(torch.randn(tokens, case.in_features, device=args.device, dtype=args.dtype).requires_grad_(True),
             torch.randn(tokens, case.out_features, device=args.device, dtype=args.dtype)) for _ in range(3)]
    layers = {run: methods.build(*run, case, args.device, args.dtype, dropout) for run in runs}
    calls = {run: _calls(layer, pool) for run, layer in layers.items()}
    timings = time_all(calls, args, progress)
    records = []
    for (method, backend), layer in layers.items():
        f, fb = timings[(method, backend)]
        records.append({
            "case": case.name, "method": method, "backend": backend, "device": args.device,
            "dtype": str(args.dtype).replace("torch.", ""), "tokens": tokens, "dropout": dropout,
            "in_features": case.in_features, "out_features": case.out_features,
            "ranks": list(case.ranks) if method.startswith("msplora") else ([case.lora_rank] if method == "peft_lora" else []),
            "trainable_params": methods.trainable_count(layer),
            **timing.record_fields(f, fb, tokens),
            "peak_mem_mb": timing.peak_memory_mb(calls[(method, backend)][1], args.device),
        })
    return records


def layer_records(args) -> list[dict]:
    runs = methods.method_runs(args.methods, args.device)
    settings = [(DTYPES[d], p) for d in args.dtypes for p in args.dropouts] if args.sweep else [(args.dtype, args.dropout)]
    records = []
    with progress_bar(len(settings) * len(args.cases) * len(runs), "layers") as progress:
        for dtype, dropout in settings:
            one = argparse.Namespace(**{**vars(args), "dtype": dtype, "dropout": dropout})
            for name in args.cases:
                records += case_records(methods.CASES[name], runs, one, progress)
    return records


def predictions(args) -> list[dict]:
    """The cost model's fwd+bwd ratios over the frozen linear, for every case and dropout of the run."""
    import cost_model

    devices = [cost_model.measured_device()] if args.device == "cuda" else list(cost_model.DEVICES.values())
    dropouts = args.dropouts if args.sweep else [args.dropout]
    return [cost_model.predict(methods.CASES[name], methods.CASES[name].gpu_tokens,
                               methods.CASES[name].dropout if p is None else p, path, dev)
            for dev in devices for name in args.cases for p in dropouts for path in ("fused", "cublas")]


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.manual_seed(0)
    if not args.quantize:
        methods.quiet_bitsandbytes_import()
    if args.predict and args.device != "cuda":
        import cost_model

        print(cost_model.table(predictions(args)))
        return 0
    if args.model:
        import model_step

        records = model_step.records(args)
    else:
        records = layer_records(args)
    report.add_ratios(records)
    meta = report.metadata(args.device, args.dtype)
    if args.sweep:
        meta["dtype"] = ", ".join(args.dtypes)
    print(f"\n{meta['device_name']}, {meta['dtype']}, torch {meta['torch']}, triton {meta['triton']}, "
          f"commit {str(meta['git_commit'])[:10]}, dropout {report.dropouts(records)}"
          + (f", cpp GEMMs: cpu_gemm={meta['settings']['cpu_gemm']}, {len(meta['cpu_gemm_choices'])} choices"
             if args.device == "cpu" else "")
          + "; median of repeats, ratios of fwd+bwd time")
    print(report.table(records))
    if args.predict:  # on a GPU: the prediction beside what was just measured
        import cost_model

        meta["predictions"] = predictions(args)
        print(cost_model.table(meta["predictions"]))
    if args.json:
        report.write_json(args.json, meta, records)
        print(f"wrote {args.json}")
    if args.plot:
        report.plot(args.plot, meta, records)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
