"""Tiny Hugging Face models built in code (no downloads) for the model-level tests."""
import torch
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM


def tiny_bert(num_layers=4, hidden=32, num_labels=3, seed=0):
    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=hidden, num_hidden_layers=num_layers, num_attention_heads=4, intermediate_size=64,
                     vocab_size=100, max_position_embeddings=64, num_labels=num_labels,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg).eval()


def tiny_llama(num_layers=5, hidden=32, heads=4, kv_heads=2, seed=0):
    """A LLaMA with grouped-query attention: k_proj/v_proj are narrower than q_proj."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=64, num_hidden_layers=num_layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, vocab_size=100, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(num_layers=3, hidden=32, seed=0):
    """GPT-2: its attention and MLP layers are transformers Conv1D, weights stored (in, out)."""
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=num_layers, n_embd=hidden, n_head=4, vocab_size=100, n_positions=64,
                     bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).eval()


def randomize_adapter(model, std=0.05):
    """Give every B factor non-zero values so the adapter changes outputs."""
    from msplora_kernels import adapter_state_dict

    with torch.no_grad():
        for name, p in adapter_state_dict(model).items():
            if name.endswith(".B"):
                p.normal_(std=std)


def tokens(batch=3, length=10, vocab=100):
    return torch.randint(0, vocab, (batch, length))


class CountingSequences(torch.utils.data.Dataset):
    """A causal-LM data set for Trainer runs, with a pattern to learn: each row counts up from a
    random start (the same rows for one seed)."""

    def __init__(self, n=32, length=12, seed=0):
        start = torch.randint(0, 80, (n, 1), generator=torch.Generator().manual_seed(seed))
        self.ids = start + torch.arange(length)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}
