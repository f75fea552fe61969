"""`LayerCollapseTrainer`: fine-tuning with the LayerCollapse regulariser (``arguments``: its settings; ``callbacks``:
α clamping, the progressive schedule, the refit of targets; ``distillation``: the self-distillation objective and its
teachers; ``trainer``: the trainer and its mixin)."""

from .arguments import REG_SCHEDULES, CollapseArguments
from .callbacks import ProgressiveSchedule, RefitTargets
from .distillation import CopyTeacher, Distillation, FrozenTeacher, SelfTeacher, Teacher
from .trainer import LayerCollapseTrainer, LayerCollapseTrainerMixin

__all__ = ["REG_SCHEDULES", "CollapseArguments", "CopyTeacher", "Distillation", "FrozenTeacher", "LayerCollapseTrainer",
           "LayerCollapseTrainerMixin", "ProgressiveSchedule", "RefitTargets", "SelfTeacher", "Teacher"]
