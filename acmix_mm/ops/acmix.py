"""The ACMix operator (being written)."""
ACMix = None
