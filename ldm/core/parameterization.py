"""What the network predicts: eps, x0 or v. The algebra of each lives in .denoiser_scaling."""
from __future__ import annotations

from enum import Enum


class Parameterization(str, Enum):
    """eps: the noise (Ho et al. 2020); x0: the clean sample; v = sqrt(a) eps - sqrt(1 - a) x0 (Salimans & Ho 2022)."""
    EPS = "eps"
    X0 = "x0"
    V = "v"
