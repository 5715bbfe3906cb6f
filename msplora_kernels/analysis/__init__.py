"""The paper's SVD analyses on your own adapters: effective rank space (eq. 8), inter-layer KL
redundancy (eqs. 9-10) and singular values over training (Fig. 3), as numbers and figures.

    python -m msplora_kernels.analysis ADAPTER_DIR [--compare-lora PEFT_DIR] --out DIR
"""
from .metrics import analyze
from .redundancy import EPS, kl_matrix, normalize
from .spectra import (
    FactorPair,
    effective_rank_space,
    entropy_effective_rank,
    factor_singular_values,
    lora_layer_spectra,
    pairs_from_dir,
    pairs_from_model,
)
from .tracking import MSPLoraSpectrumCallback, SpectrumRecorder

__all__ = [
    "EPS", "FactorPair", "MSPLoraSpectrumCallback", "SpectrumRecorder", "analyze", "effective_rank_space",
    "entropy_effective_rank", "factor_singular_values", "kl_matrix", "lora_layer_spectra", "normalize",
    "pairs_from_dir", "pairs_from_model",
]
