"""The block's own feature-space map and its Jacobian: connections grounded in the model's
computation, not in co-occurrence, and a linearity score that needs no fitted connector."""
