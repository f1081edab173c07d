"""pmet: Precise Model Editing in a Transformer (Li et al., AAAI 2024)."""

__version__ = "0.1.0"
