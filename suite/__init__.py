"""TNT Bench: a benchmark suite for Transformer iN Transformer against ViT and DeiT."""

__version__ = "0.1.0"
