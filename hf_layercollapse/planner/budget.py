"""`Budget`: how much the planner is asked to remove."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Budget:
    """Exactly one of: ``num_blocks`` (the k cheapest MLP blocks), ``params`` (remove at least this many parameters)
    or ``max_loss_increase`` (add units cheapest first while the measured increase of the objective stays within
    it)."""

    num_blocks: int | None = None
    params: int | None = None
    max_loss_increase: float | None = None
    #: how the budget was given (for messages): "params_fraction=0.1", "num_params=13000000", ...
    given: str = ""

    def __str__(self) -> str:
        return self.given or next(f"{k}={v}" for k, v in vars(self).items() if v is not None)
