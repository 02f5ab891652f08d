"""Datasets yielding CompVis-style dicts (`image`: HWC float in [-1, 1], plus caption/class_label/...)."""
