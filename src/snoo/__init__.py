"""snoo: SNOO (Step-K Nesterov Outer Optimizer) and its relatives as drop-in ``torch.optim`` optimizers."""

from snoo import distributed
from snoo.optim import schedules
from snoo.optim.combined import MuonAdamW
from snoo.optim.ema_nesterov import EMANesterov
from snoo.optim.gpa import GPA
from snoo.optim.groups import param_groups
from snoo.optim.nesterov import Nesterov
from snoo.optim.scale import SCALE
from snoo.optim.sgd_ll import SGDLL
from snoo.optim.snoo import SNOO, Lookahead

__all__ = [
    "GPA",
    "SCALE",
    "SGDLL",
    "SNOO",
    "EMANesterov",
    "Lookahead",
    "MuonAdamW",
    "Nesterov",
    "distributed",
    "param_groups",
    "schedules",
]
__version__ = "0.1.0.dev0"
