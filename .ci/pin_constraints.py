"""Writes constraints.txt: the installed version of every package that msplora-kernels[test]
needs, directly or through others. `make constraints` runs it after a person has checked a newer
set with `make test-latest`; `make test` and `make bench` install with these pins, so a fresh
machine gets what CI tested."""
import importlib.metadata as md
import re
import sys

from packaging.requirements import Requirement


def closure(root: str, extras: set) -> dict:
    seen, todo = {}, [(root, frozenset(extras))]
    while todo:
        name, wanted = todo.pop()
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue  # an optional dependency for another platform or Python
        key = re.sub(r"[-_.]+", "-", dist.metadata["Name"]).lower()
        if key in seen and wanted <= seen[key][1]:
            continue
        seen[key] = (dist.version, wanted | seen.get(key, (None, frozenset()))[1])
        for text in dist.requires or []:
            req = Requirement(text)
            env = {"extra": ""}
            if req.marker and not any(req.marker.evaluate({**env, "extra": e}) for e in (wanted or {""})):
                continue
            todo.append((req.name, frozenset(req.extras)))
    return seen


if __name__ == "__main__":
    pins = closure("msplora-kernels", {"test"})
    # torch comes first and on its own (the Makefile's TORCH_SPEC, a CPU or a CUDA build), and
    # triton with it: a CUDA torch names the triton it needs.
    for own in ("msplora-kernels", "torch", "triton"):
        pins.pop(own, None)
    lines = [f"{name}=={version}" for name, (version, _) in sorted(pins.items())]
    header = ("# The versions `make test` and `make bench` install (pip's -c): what CI tested. Regenerate on\n"
              "# purpose with `make constraints`, after `make test-latest` passes on the newer releases.\n")
    open(sys.argv[1] if len(sys.argv) > 1 else "constraints.txt", "w").write(header + "\n".join(lines) + "\n")
    print(f"pinned {len(lines)} packages")
