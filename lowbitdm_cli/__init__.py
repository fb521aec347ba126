"""lowbitdm: quantize diffusion models to 2–8 bits, finetune them, ship real low-bit checkpoints."""

__version__ = "0.1.0"
