"""ResNet-ACMix backbone (being written)."""
