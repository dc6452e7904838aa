"""Online distillation: peers that train together and teach each other, no pretrained teacher."""

from kd_lightning.modules.online.afd import AFDModule
from kd_lightning.modules.online.codistillation import CodistillationModule
from kd_lightning.modules.online.dml import DMLModule
from kd_lightning.modules.online.ffl import FFLModule
from kd_lightning.modules.online.okddip import OKDDipModule
from kd_lightning.modules.online.peers import OnlinePeersModule

__all__ = [
    "AFDModule",
    "CodistillationModule",
    "DMLModule",
    "FFLModule",
    "OKDDipModule",
    "OnlinePeersModule",
]
