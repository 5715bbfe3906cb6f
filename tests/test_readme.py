"""The README and the docs run as written: every python block executes, and every command of
their bash blocks names a make target, script or module that exists and answers --help."""
import copy
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import msplora_kernels as mk
from models import CountingSequences, tiny_bert, tiny_llama

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "bench" / "README.md"]


def _blocks(language: str) -> list[tuple[str, str]]:
    """(page:index, block) for every fenced block of `language` in the README and the docs."""
    found = []
    for page in PAGES:
        blocks = re.findall(rf"```{language}\n(.*?)```", page.read_text(), flags=re.S)
        found += [(f"{page.relative_to(ROOT)}:{i}", block) for i, block in enumerate(blocks)]
    return found


PYTHON_BLOCKS = _blocks("python")
BASH_BLOCKS = [block for _, block in _blocks("bash")]


def names_the_block_needs(block: str) -> dict:
    """What a block uses without defining it: a small model, or the functional form's tensors."""
    given = {}
    # A tiny LLaMA where the block adapts LLaMA's layers or trains with TRL, else a tiny BERT
    # classifier (the quick start's query/value), as `model` and a fresh copy as `base_model`.
    llama = "q_proj" in block or "Trainer(model=" in block
    given["model"] = tiny_llama() if llama else tiny_bert()
    given["base_model"] = copy.deepcopy(given["model"])
    if "from_pretrained(path" in block:
        # A tiny LLaMA checkpoint (hidden 64: bitsandbytes' 4-bit block size, for the QLoRA blocks).
        if "BitsAndBytesConfig" in block:
            pytest.importorskip("bitsandbytes")
        given["path"] = str(Path.cwd() / "tiny-llama")
        tiny_llama(hidden=64).save_pretrained(given["path"])
    if "train_dataset=dataset" in block:
        given["dataset"] = CountingSequences(n=16)
    if "Trainer(model=" in block and "tokenizer" in block:
        # TRL's trainers: a tiny LLaMA, a tokenizer made in code and small data sets of each shape
        # TRL takes (nothing downloaded).
        pytest.importorskip("trl")
        datasets = pytest.importorskip("datasets")
        from text_data import feedback, preferences, prompts, sentences, word_tokenizer

        given.update(tokenizer=word_tokenizer(), preferences=preferences(), feedback=feedback(),
                     texts=datasets.Dataset.from_dict({"text": sentences(16)}), prompts=prompts())
    if "msplora_linear(x, weight" in block:
        x, weight, bias = torch.randn(4, 10, 64), torch.randn(32, 64) / 8, torch.randn(32)
        ranks = (8, 4, 2)
        given.update(x=x, weight=weight, bias=bias, As=[torch.randn(64, r) / 8 for r in ranks],
                     Bs=[torch.randn(r, 32) for r in ranks], scales=[16 / r for r in ranks])
    return given


def test_the_pages_have_the_blocks_this_test_knows():
    assert len(PYTHON_BLOCKS) >= 8 and BASH_BLOCKS
    assert sum(where.startswith("README.md") for where, _ in PYTHON_BLOCKS) >= 3


@pytest.mark.parametrize("block", [b for _, b in PYTHON_BLOCKS], ids=[where for where, _ in PYTHON_BLOCKS])
def test_python_block_runs(block, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = {name: v["value"] for name, v in mk.backend_info()["settings"].items()}
    exec(compile(block, "<docs block>", "exec"), {"__name__": "readme", **names_the_block_needs(block)})
    # A block that changes a setting puts it back.
    assert {name: v["value"] for name, v in mk.backend_info()["settings"].items()} == settings


def _commands():
    for block in BASH_BLOCKS:
        text = re.sub(r"\\\n\s*", " ", block)  # join continued lines
        for line in text.splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                yield shlex.split(line)


@pytest.mark.parametrize("argv", list(_commands()), ids=lambda a: " ".join(a)[:60])
def test_bash_command_exists(argv):
    if argv[:2] == ["pip", "install"]:
        # tests/test_install.py installs the package this way; here, what is named must exist.
        assert all(a == "torch" or (a == "." and (ROOT / "setup.py").is_file()) for a in argv[2:]), argv
        return
    if argv[0] == "make":
        targets = re.findall(r"^([a-z][a-z-]*):", (ROOT / "Makefile").read_text(), flags=re.M)
        assert argv[1] in targets, f"no make target {argv[1]}"
        return
    # torchrun and python -m <launcher> run a script: check the launcher's options against its own
    # help and the script's against the script's.
    if argv[0] == "torchrun":
        argv = ["python", "-m", "torch.distributed.run", *argv[1:]]
    assert argv[0] == "python", argv
    script = next((i for i, a in enumerate(argv) if a.endswith(".py")), None)
    parts = []
    if argv[1] == "-m":
        parts.append(([sys.executable, "-m", argv[2], "--help"], argv[3:script] if script else argv[3:]))
    if script is not None:
        assert (ROOT / argv[script]).is_file(), f"{argv[script]} does not exist"
        parts.append(([sys.executable, str(ROOT / argv[script]), "--help"], argv[script + 1:]))
    for cmd, args in parts:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert proc.returncode == 0 and "usage" in proc.stdout.lower(), proc.stderr[-2000:]
        # Every option the page passes is one the command knows.
        for option in [a.split("=")[0] for a in args if a.startswith("--")]:
            assert option in proc.stdout, f"{option} is not an option of {cmd[1:3]}"
