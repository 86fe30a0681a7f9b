"""Sparse connectors between feature sets: F_out ≈ f(F_in)."""
