"""Write tile_table.py: for every key the launchers look up (configs.py), the candidate tiles that
compile, as a real launch specializes them, within the architecture's shared memory, with no
register spills and (sm_90) with wgmma for tensor-core dots. Needs no GPU; about 15 minutes on
two cores.

    python -m msplora_kernels.triton_kernels.tune_tiles [--jobs 2]

The keys come from recording the launchers at compile_check's shapes; bf16 stands for fp16 (the
same tiles; compile_check verifies fp16 too).
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import sys

from . import compile_check, configs, launchers

ARCHS = (90, 80)
_CONFIG_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages")


def _keyed_launches(arch: int) -> dict:
    """{table key: [(fn, args, kwargs without tile)]}: every launch that looks up tiles, by the
    key it looks up (one key serves variants: the cuBLAS path's epilogue, the packed mask)."""
    found, pending = {}, []
    lookups = launchers.gemm_tiles, launchers.skinny_tile

    def remember(lookup):
        def looked_up(name, arch_, cls, aligned, dropout, block_r):
            pending.append((name, configs.table_arch(arch_), cls, aligned, dropout, configs.rank_class(block_r)))
            return lookup(name, arch_, cls, aligned, dropout, block_r)
        return looked_up

    launchers.gemm_tiles, launchers.skinny_tile = remember(lookups[0]), remember(lookups[1])
    try:
        for dtype, tf32 in (("bf16", False), ("fp32", False), ("fp32", True)):
            for shape in compile_check.SHAPES:
                pending.clear()
                launches = compile_check.recorded_launches(dtype, shape, arch, tf32)
                tiled = [launch for launch in launches if launch[0] is not None and _looks_up(launch[0])]
                assert len(tiled) == len(pending), "a launch without its tile lookup"
                for key, (kernel, args, kwargs) in zip(pending, tiled):
                    fn = kernel.fn if hasattr(kernel, "configs") else kernel  # an autotuner's kernel
                    variants = found.setdefault(key, {})
                    base = {k: v for k, v in kwargs.items() if k not in _CONFIG_KEYS}
                    variants.setdefault(repr(sorted((k, v) for k, v in base.items() if k.isupper())),
                                        (fn, args, base))
    finally:
        launchers.gemm_tiles, launchers.skinny_tile = lookups
    return {key: list(variants.values()) for key, variants in found.items()}


def _looks_up(kernel) -> bool:
    if isinstance(kernel, str):  # a recorded cuBLAS call
        return False
    name = (kernel.fn if hasattr(kernel, "configs") else kernel).__name__.replace("_kernel", "")
    return name in configs.GEMM_KERNELS + configs.SKINNY_KERNELS


def _tile_kwargs(name: str, tile) -> dict:
    if name in configs.GEMM_KERNELS:
        m, n, k, w, s = tile
        return {"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8, "num_warps": w, "num_stages": s}
    m, wide, w, s = tile
    return {"BLOCK_M": m, ("BLOCK_N" if name == "grad_t_b" else "BLOCK_K"): wide, "num_warps": w, "num_stages": s}


def _passes(rec: dict) -> bool:
    return not compile_check.record_problems(rec, configs.SHARED_LIMIT[rec["arch"]])


_ITEMS = []  # the keyed launches; forked workers inherit them (kernels and tensors do not pickle)
_CURRENT = {}  # the table being refreshed
_VERIFY_ONLY = False  # only the current tiles are tried (--verify)


def _why_not(name, arch, fn, args, kwargs, tile):
    """None if the tile passes for this launch, else why not."""
    rec = {"kernel": name, "dtype": "", "shape": "", "arch": arch}
    try:
        rec.update(compile_check.compile_record(fn, args, {**kwargs, **_tile_kwargs(name, tile)}, arch, True))
        rec["fits"] = rec["shared_bytes"] <= configs.SHARED_LIMIT[arch]
    except Exception as exc:  # noqa: BLE001 - a candidate that does not compile is rejected
        return str(exc).splitlines()[0][:200]
    if "registers" not in rec:
        return "ptxas gave no register report"
    if not _passes(rec):
        return f"{rec['shared_bytes']} B shared, {rec['spill_store_bytes']} B spilled"
    return None


def tune_key(index: int) -> tuple:
    """(key, tiles that pass every launch of the key, [(tile, why not)]), trying the table's
    current tiles first, then the candidates in order."""
    key, launches = _ITEMS[index]
    name, arch, cls = key[0], key[1], key[2]
    gemm = name in configs.GEMM_KERNELS
    candidates = configs.GEMM_CANDIDATES["narrow" if cls == "narrow" else "wide"] if gemm else configs.SKINNY_CANDIDATES
    current = _CURRENT.get(key, [])
    wanted = configs.AUTOTUNE_SIZE if gemm else 1
    kept, rejected = [], []
    for tile in current + ([] if _VERIFY_ONLY else [c for c in candidates if c not in current]):
        why = next(filter(None, (_why_not(name, arch, *launch, tile) for launch in launches)), None)
        if why is None:
            kept.append(tile)
            if len(kept) == wanted:
                break
        else:
            rejected.append((tile, why))
    return key, kept, rejected


def _existing(path: str) -> dict:
    scope = {}
    if os.path.exists(path):
        with open(path) as f:
            exec(f.read(), scope)  # our own generated file: a dict literal
    return scope.get("TILES", {})


def write_table(table: dict, path: str) -> None:
    import triton

    lines = [f"# Written by tune_tiles.py (last run under triton {triton.__version__}); see configs.py. Served triton",
             "# versions: 3.9 and 3.6, each tile passing under both (tune under one, then --verify under the other).",
             "# (kernel, arch, precision class, aligned, dropout, rank class): tiles that fit unspilled,",
             "# most preferred first.", "TILES = {"]
    lines += [f"    {key!r}: {tiles!r}," for key, tiles in sorted(table.items(), key=repr)]
    lines.append("}")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None) -> int:
    global _VERIFY_ONLY
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "tile_table.py"))
    ap.add_argument("--kernels", nargs="+", default=list(configs.GEMM_KERNELS + configs.SKINNY_KERNELS),
                    help="retune these only; the other keys of --out are kept")
    ap.add_argument("--only-empty", action="store_true", help="retune only the keys of --out that have no tile")
    ap.add_argument("--verify", action="store_true",
                    help="try no new candidates: keep the tiles of --out that pass with this triton (run it under "
                         "each triton version the table must serve, after tuning under one)")
    args = ap.parse_args(argv)
    if configs.interpreting():
        raise SystemExit("tune_tiles: unset TRITON_INTERPRET; the interpreter does not compile kernels")
    from tqdm import tqdm

    _ITEMS[:] = [item for arch in ARCHS for item in _keyed_launches(arch).items() if item[0][0] in args.kernels]
    table, empty = _existing(args.out), []
    _CURRENT.update(table)
    _VERIFY_ONLY = args.verify
    if args.only_empty:
        _ITEMS[:] = [item for item in _ITEMS if not table.get(item[0])]
    with multiprocessing.get_context("fork").Pool(args.jobs) as pool:
        for key, kept, rejected in tqdm(pool.imap_unordered(tune_key, range(len(_ITEMS))), total=len(_ITEMS),
                                        desc="tune tiles",
                                        unit="key", file=sys.stderr):
            table[key] = kept
            if not kept:
                empty.append((key, rejected))
    write_table(table, args.out)
    for key, rejected in empty:
        print("NO TILE FITS:", key, rejected[:2])
    print(f"{len(table)} keys written to {args.out}; {len(empty)} without a tile")
    return 1 if empty else 0


if __name__ == "__main__":
    sys.exit(main())
