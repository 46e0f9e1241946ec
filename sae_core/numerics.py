"""Numerical constants shared across sae_core."""

#: norms (and variances) below this count as zero: rows are not divided by ~0
NORM_EPS = 1e-12
