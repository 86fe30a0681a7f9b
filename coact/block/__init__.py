"""The block beyond the MLP: attention connectors and position scores, attention's causal
checks, the composition of the next residual stream, the layer graph, and the block stage."""
