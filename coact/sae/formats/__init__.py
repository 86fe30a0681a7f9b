"""Loading the SAE formats researchers publish, and saving ours in SAELens's and sparsify's.

Every SAE format becomes the same `Sae` module, since only parameter names, layouts and
the activation rule differ (`load.py` tells them apart). One module per format:
`saelens.py`, `dictionary_learning.py`, `sparsify.py` (SAEs and skip transcoders:
`SparsifyCoder`, `read_sparsify`, `save_sparsify`) and `sparse_coding.py` (the seed
study's pickled SAEs, read without unsafe unpickling). Hub ids are fetched by `sae.hub`.
"""

from coact.sae.formats.load import load_sae
from coact.sae.formats.saelens import hook_name, save_saelens
from coact.sae.formats.sparsify import SparsifyCoder, read_sparsify, save_sparsify

__all__ = [
    "SparsifyCoder",
    "hook_name",
    "load_sae",
    "read_sparsify",
    "save_saelens",
    "save_sparsify",
]
