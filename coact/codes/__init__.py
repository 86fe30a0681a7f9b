"""Feature codes: the corpus, collection (model → activations → SAE codes) and the sparse,
resumable, checksummed code store."""
