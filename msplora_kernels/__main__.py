"""python -m msplora_kernels [--json]: the environment report to paste into a bug report."""
import argparse
import json

from .report import environment, format_report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m msplora_kernels", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    env = environment()
    print(json.dumps(env, indent=2, default=str) if args.json else format_report(env))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
