"""Evidence about single features: outlier (artefact) flags and context ablation."""
