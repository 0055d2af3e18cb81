"""Swin-ACMix backbone (being written)."""
