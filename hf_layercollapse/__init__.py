"""hf_layercollapse: LayerCollapse (arXiv 2311.17943) for Hugging Face Transformers.

Make the MLP blocks of any Transformers model collapsible, fine-tune them towards linear, and merge them into
single projections: fewer parameters, fewer FLOPs, checkpoints that load with ``from_pretrained``.
"""

__version__ = "0.1.0"

from .activation import CollapsibleActivation
from .architectures import BlockKind, MLPBlock, find_mlp_blocks
from .card import build_collapse_report, render_model_card
from .collapse import collapse_model, merge_projections
from .config import LayerCollapseConfig
from .hub import push_to_hub, save_for_hub
from .injection import get_collapse_model, injected_activations, refit_linear_targets, regularization_loss
from .modeling import MODEL_TYPE, LayerCollapseConfigError
from .peft_integration import (
    LayerCollapseLayer,
    LayerCollapseModel,
    calibrate_linear_targets,
    get_lora_collapse_model,
    merge_lora_and_collapse,
)
from .planner import CollapsePlan, plan_collapse
from .report import BlockReport, CollapseReport
from .trainer import CollapseArguments, LayerCollapseTrainer, LayerCollapseTrainerMixin

__all__ = [
    "MODEL_TYPE",
    "BlockKind",
    "BlockReport",
    "CollapseArguments",
    "CollapsePlan",
    "CollapseReport",
    "CollapsibleActivation",
    "LayerCollapseConfig",
    "LayerCollapseConfigError",
    "LayerCollapseLayer",
    "LayerCollapseModel",
    "LayerCollapseTrainer",
    "LayerCollapseTrainerMixin",
    "MLPBlock",
    "__version__",
    "build_collapse_report",
    "calibrate_linear_targets",
    "collapse_model",
    "find_mlp_blocks",
    "get_collapse_model",
    "get_lora_collapse_model",
    "injected_activations",
    "merge_lora_and_collapse",
    "merge_projections",
    "plan_collapse",
    "push_to_hub",
    "refit_linear_targets",
    "regularization_loss",
    "render_model_card",
    "save_for_hub",
]
