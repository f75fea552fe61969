"""`LayerCollapseTrainer`: fine-tuning with the LayerCollapse regulariser (``arguments``: its settings; ``callbacks``:
α clamping, the progressive schedule, the refit of targets; ``trainer``: the trainer and its mixin)."""

from .arguments import REG_SCHEDULES, CollapseArguments
from .callbacks import ProgressiveSchedule, RefitTargets
from .trainer import LayerCollapseTrainer, LayerCollapseTrainerMixin

__all__ = ["REG_SCHEDULES", "CollapseArguments", "LayerCollapseTrainer", "LayerCollapseTrainerMixin",
           "ProgressiveSchedule", "RefitTargets"]
