"""Text made in code for the TRL tests: a word-level tokenizer over a small vocabulary, sentences
with a pattern to learn, and preference pairs. Nothing is downloaded."""
import torch

WORDS = ["the", "cat", "dog", "sat", "ran", "on", "mat", "log", "a", "big", "small", "red", "blue", "and", "then"]


def word_tokenizer():
    """A word-level tokenizer over WORDS, made in code (nothing downloaded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]",
                                   eos_token="[EOS]")


def sentences(n=48, seed=0):
    """Sentences of one pattern over WORDS, drawn with `seed`."""
    g = torch.Generator().manual_seed(seed)
    pick = lambda options: options[int(torch.randint(len(options), (1,), generator=g))]  # noqa: E731
    return [f"the {pick(['big', 'small'])} {pick(['cat', 'dog'])} {pick(['sat', 'ran'])} on the "
            f"{pick(['red', 'blue'])} {pick(['mat', 'log'])}" for _ in range(n)]


def preferences(n=16):
    """A DPO data set: each prompt's chosen and rejected completions."""
    import datasets

    prompts = ["the big cat", "the small dog", "the red mat", "a blue log"] * (n // 4)
    return datasets.Dataset.from_dict({"prompt": prompts, "chosen": [" sat on the mat"] * n,
                                       "rejected": [" ran on the log"] * n})


def feedback(n=16):
    """A KTO data set: completions labelled desirable (True) or not."""
    import datasets

    return datasets.Dataset.from_dict({"prompt": ["the big cat", "the small dog"] * (n // 2),
                                       "completion": [" sat on the mat", " ran on the log"] * (n // 2),
                                       "label": [True, False] * (n // 2)})


def prompts(n=16):
    """A GRPO data set: prompts to complete."""
    import datasets

    return datasets.Dataset.from_dict({"prompt": ["the big", "the small", "a red", "a blue"] * (n // 4)})
