"""`coact analyze`: the configuration, budgets and orchestration of every stage, for one
layer or a whole model."""
