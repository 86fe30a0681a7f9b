"""Calibration of τ against the model's own loss: interventions (noise, splices), the
calibrate stage and the causal check of strong connections."""
