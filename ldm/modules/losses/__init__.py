"""First-stage losses (CompVis import paths: `ldm.modules.losses.LPIPSWithDiscriminator`, ...)."""
from ldm.modules.losses.contperceptual import LPIPSWithDiscriminator
from ldm.modules.losses.vqperceptual import VQLPIPSWithDiscriminator

__all__ = ["LPIPSWithDiscriminator", "VQLPIPSWithDiscriminator"]
