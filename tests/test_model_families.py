"""apply_msplora across Hugging Face model families, each a tiny config built in code: the layer
stacks are found, a fresh adapter changes nothing, training reaches every factor, and save/load
and merge keep the outputs."""
import copy

import pytest
import torch
import transformers as tf

import msplora_kernels as mk

H = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64, vocab_size=100)

# name: (model class, config class, config kwargs, q/v-style targets, layers adapted by those targets)
FAMILIES = {
    "distilbert": ("DistilBertForSequenceClassification", "DistilBertConfig",
                   dict(dim=32, n_layers=4, n_heads=4, hidden_dim=64, vocab_size=100), ["q_lin", "v_lin"]),
    "opt": ("OPTForCausalLM", "OPTConfig", dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, ffn_dim=64,
                                                 vocab_size=100, word_embed_proj_dim=32), ["q_proj", "v_proj"]),
    "bloom": ("BloomForCausalLM", "BloomConfig", dict(hidden_size=32, n_layer=4, n_head=4, vocab_size=100),
              ["query_key_value"]),
    "falcon": ("FalconForCausalLM", "FalconConfig", dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                                                         vocab_size=100), ["query_key_value"]),
    "gpt_neox": ("GPTNeoXForCausalLM", "GPTNeoXConfig", H, ["query_key_value"]),
    "mistral": ("MistralForCausalLM", "MistralConfig", dict(H, num_key_value_heads=2), ["q_proj", "v_proj"]),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", dict(H, num_key_value_heads=2), ["q_proj", "v_proj"]),
    "phi": ("PhiForCausalLM", "PhiConfig", H, ["q_proj", "v_proj"]),
    "roberta": ("RobertaForSequenceClassification", "RobertaConfig", dict(H, max_position_embeddings=64),
                ["query", "value"]),
    "vit": ("ViTForImageClassification", "ViTConfig", dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                                                           intermediate_size=64, image_size=16, patch_size=8), None),
}


def _build(name):
    model_cls, config_cls, kwargs, _ = FAMILIES[name]
    if not hasattr(tf, model_cls):
        pytest.skip(f"transformers {tf.__version__} has no {model_cls}")
    torch.manual_seed(0)
    return getattr(tf, model_cls)(getattr(tf, config_cls)(**kwargs)).eval()


def _inputs(name):
    if name == "vit":
        return {"pixel_values": torch.randn(2, 3, 16, 16)}
    return {"input_ids": torch.randint(0, 100, (2, 9))}


@pytest.mark.parametrize("targets", ["q/v", "all-linear"])
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family(name, targets, tmp_path):
    base = _build(name)
    if targets == "q/v":
        targets = FAMILIES[name][3] or [n for n in ("query", "value", "q_proj", "v_proj")
                                        if any(p.endswith("." + n) for p, _ in base.named_modules())][:2]
    model = mk.apply_msplora(copy.deepcopy(base), mk.MSPLoraConfig(target_modules=targets, dropout=0.1))
    layers = mk.adapted_layers(model)
    per_layer = 1 if targets == "all-linear" else len(targets)
    assert len(layers) >= 4 * per_layer  # every one of the 4 layers of the stack, at least
    inputs = _inputs(name)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, base(**inputs).logits, rtol=1e-5, atol=1e-5)
    # One training step reaches every factor.
    model.train()
    model(**inputs).logits.float().square().mean().backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for p in trainable)
    # B starts at zero, so it is B that gets a gradient first (dA = x^T dy B^T = 0).
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n.endswith(".B"))
    model.eval()
    with torch.no_grad():
        for n, p in mk.adapter_state_dict(model).items():
            if n.endswith(".B"):
                p.normal_(std=0.05)
        adapted = model(**inputs).logits
        assert (adapted - base(**inputs).logits).abs().max() > 1e-4
        mk.save_adapter(model, tmp_path)
        loaded = mk.load_msplora(copy.deepcopy(base), tmp_path).eval()
        torch.testing.assert_close(loaded(**inputs).logits, adapted, rtol=0, atol=0)
        merged = mk.merge_and_unload(copy.deepcopy(model))
        assert not any(isinstance(m, mk.MSPLoraLinear) for m in merged.modules())
        torch.testing.assert_close(merged(**inputs).logits, adapted, rtol=1e-4, atol=1e-4)


def test_albert_shared_layer_is_refused_clearly():
    # ALBERT runs one layer module at every depth, so it has no stack of distinct layers.
    if not hasattr(tf, "AlbertModel"):
        pytest.skip("no ALBERT in this transformers")
    model = tf.AlbertModel(tf.AlbertConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                                           intermediate_size=64, vocab_size=100, embedding_size=16))
    with pytest.raises(ValueError, match="is not inside a stack of layers"):
        mk.apply_msplora(model, mk.MSPLoraConfig(target_modules=["query", "value"]))
