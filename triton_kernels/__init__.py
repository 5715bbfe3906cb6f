"""Triton kernels of MSPLoRA, installed as msplora_kernels.triton_kernels (never top-level)."""
