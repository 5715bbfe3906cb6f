"""Tiny LLaMAs quantized by transformers' bitsandbytes quantizer (BitsAndBytesConfig), as QLoRA
users load them: written to a folder in the test, loaded back with from_pretrained."""
import warnings

import torch

from models import tiny_llama

# name -> BitsAndBytesConfig arguments
KINDS = {
    "nf4-double": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                       bnb_4bit_compute_dtype=torch.float32),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=False,
                bnb_4bit_compute_dtype=torch.float32),
    "int8": dict(load_in_8bit=True),
}
# bitsandbytes' CPU inference path for 4-bit weights needs in_features to be a multiple of its
# block size (64).
HIDDEN = 64


def write_checkpoint(path):
    tiny_llama(hidden=HIDDEN).save_pretrained(path)
    return path


def from_pretrained_quantized(checkpoint, kind):
    """AutoModelForCausalLM.from_pretrained with a BitsAndBytesConfig: the model exactly as a user
    gets it, on the CPU."""
    import transformers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bitsandbytes' notes about CPU kernels and fp16 casts
        return transformers.AutoModelForCausalLM.from_pretrained(
            checkpoint, quantization_config=transformers.BitsAndBytesConfig(**KINDS[kind]), device_map="cpu")
