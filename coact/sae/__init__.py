"""Sparse autoencoders: one protocol, one concrete module, loaders and a trainer."""

from coact.sae.base import Sae, SparseAutoencoder

__all__ = ["Sae", "SparseAutoencoder"]
