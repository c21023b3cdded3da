"""Builders of tiny random-weight models of each family, saved in the real on-disk formats.

One module per group of families; ``atelier.tiny_models`` registers them as built-in models
and holds what they share (tokenizers, the noise schedule).
"""
