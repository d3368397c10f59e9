"""Auxiliary-loss and z-loss coefficients, one at a time around the base (balance 1e-2, z 1e-3).

Published: Switch uses a balance coefficient of 1e-2, large enough to balance the load and small
enough not to overwhelm the cross-entropy (Fedus et al. 2022, Sec. 2.2); ST-MoE uses a router z-loss
of 1e-3 for stability. Watch load_cv (coefficient of variation of the
tokens per expert) and the dropped fraction beside the loss.
"""
from __future__ import annotations

from experiments.scales import Scale
from experiments.spec import RunSpec, make_spec

NAME = "aux_losses"
POINTS = ((0.0, 1e-3), (1e-2, 1e-3), (1e-1, 1e-3), (1e-2, 0.0), (1e-2, 1e-2))  # (balance, z)


def sweep(scale: Scale) -> list[RunSpec]:
    size = scale.headline
    return [make_spec(NAME, scale, size=size, seed=scale.seeds[0],
                      axes={"balance_loss_coef": bal, "z_loss_coef": z},
                      model=scale.model(size, balance_loss_coef=bal, z_loss_coef=z))
            for bal, z in scale.axis(POINTS, smoke=POINTS[:2])]
