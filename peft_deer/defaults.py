"""The one home of the DP defaults that the settings, the adapter config and the core share.

Standard library only (the settings load it before torch).
"""

DELTA = 1e-5  # delta of (epsilon, delta), client and record level; must be < 1/num_clients (1/client size)
CLIP_NORM = 1.0  # C: bound on a client update's (metric) norm, and on a per-sample gradient's at record level
RIDGE = 1e-6  # lambda in the regulator metric M = s^2 Y^T Y + lambda I (keeps M invertible)
