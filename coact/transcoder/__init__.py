"""Skip transcoders: a sparse replacement of an MLP (TopK latents read what the MLP reads
and write what it writes, plus a linear skip path), trained, saved in sparsify's format and
measured beside the SAE route (`coact.transcoder.stage`)."""
