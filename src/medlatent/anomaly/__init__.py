"""Anomaly detection from normal-only training data: detectors, scores, thresholds."""
