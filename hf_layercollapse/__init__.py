"""hf_layercollapse: LayerCollapse (arXiv 2311.17943) for Hugging Face Transformers.

Make the MLP blocks of any Transformers model collapsible, fine-tune them towards linear, and merge them into
single projections: fewer parameters, fewer FLOPs, checkpoints that load with ``from_pretrained``.

The layers of the package, from the bottom: ``modules``, ``statistics``, ``report`` (shared helpers) → ``units``
(what can collapse) → ``merging`` → ``targets`` (what a unit becomes at α = 1) → ``activation`` (the injected
module) → ``calibration`` → ``config`` → ``record`` → ``checkpoint`` (saving and loading) → ``inject`` /
``collapse`` → ``planner`` → ``peft`` → ``trainer`` → ``card`` → ``hub`` → ``cli``. Importing this package registers
the checkpoint format with transformers' Auto classes and the LayerCollapse method with PEFT.
"""

from .activation import CollapsibleActivation, injected_activations
from .card import build_collapse_report, render_model_card
from .checkpoint import MODEL_TYPE
from .collapse import collapse_model
from .errors import LayerCollapseConfigError
from .export import ExportResult, export_onnx
from .hub import push_to_hub, save_for_hub
from .inject import get_collapse_model, refit_linear_targets, regularization_loss
from .memory import MemoryEstimate, estimate_memory
from .merging import merge_projections
from .peft import (
    LayerCollapseConfig,
    LayerCollapseLayer,
    LayerCollapseModel,
    calibrate_linear_targets,
    get_lora_collapse_model,
    merge_lora_and_collapse,
    register_peft_method,
)
from .planner import CollapsePlan, plan_collapse
from .record import CollapseRecord
from .report import BlockReport, CollapseReport
from .trainer import CollapseArguments, Distillation, LayerCollapseTrainer, LayerCollapseTrainerMixin
from .units import BlockKind, MLPBlock, Unit, find_mlp_blocks
from .version import __version__

register_peft_method()

__all__ = [
    "MODEL_TYPE",
    "BlockKind",
    "BlockReport",
    "CollapseArguments",
    "CollapsePlan",
    "CollapseRecord",
    "CollapseReport",
    "CollapsibleActivation",
    "Distillation",
    "ExportResult",
    "LayerCollapseConfig",
    "LayerCollapseConfigError",
    "LayerCollapseLayer",
    "LayerCollapseModel",
    "LayerCollapseTrainer",
    "LayerCollapseTrainerMixin",
    "MLPBlock",
    "MemoryEstimate",
    "Unit",
    "__version__",
    "build_collapse_report",
    "calibrate_linear_targets",
    "collapse_model",
    "estimate_memory",
    "export_onnx",
    "find_mlp_blocks",
    "get_collapse_model",
    "get_lora_collapse_model",
    "injected_activations",
    "merge_lora_and_collapse",
    "merge_projections",
    "plan_collapse",
    "push_to_hub",
    "refit_linear_targets",
    "register_peft_method",
    "regularization_loss",
    "render_model_card",
    "save_for_hub",
]
