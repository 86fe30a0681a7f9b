"""Sparse autoencoders: one protocol, one concrete module, loaders and a trainer."""
