"""CACR: Contrastive Attraction and Contrastive Repulsion, the method in pure PyTorch.

No Ray import anywhere under this package: it is usable from any training loop.
"""
