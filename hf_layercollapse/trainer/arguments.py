"""`CollapseArguments`: the training settings of LayerCollapse, parsed next to ``TrainingArguments``."""

from __future__ import annotations

from dataclasses import dataclass, field

from .distillation import Distillation

REG_SCHEDULES = ("constant", "linear", "cosine")


@dataclass
class CollapseArguments:
    """Training settings of LayerCollapse; parse them next to ``TrainingArguments`` with ``HfArgumentParser``.

    Example:
        >>> from transformers import HfArgumentParser, TrainingArguments
        >>> parser = HfArgumentParser((TrainingArguments, CollapseArguments))
        >>> _, args = parser.parse_args_into_dataclasses(["--output_dir", "out", "--reg_weight", "0.5"])
        >>> args.reg_weight, args.reg_schedule
        (0.5, 'constant')
    """

    reg_weight: float | None = field(
        default=None, metadata={"help": "λ of λ·Σ(1−α)². Default: the reg_weight of the LayerCollapseConfig used."}
    )
    reg_schedule: str = field(
        default="constant",
        metadata={"help": "How λ grows: 'constant', 'linear' (warm-up from 0) or 'cosine' (half-cosine from 0)."},
    )
    reg_warmup_ratio: float = field(
        default=0.0, metadata={"help": "Fraction of training over which λ reaches its value (linear/cosine)."}
    )
    alpha_learning_rate: float | None = field(
        default=None, metadata={"help": "Learning rate of the α parameters (default: the model's learning rate)."}
    )
    clamp_alpha: bool = field(default=True, metadata={"help": "Clamp α to [0, 1] after every optimizer step."})
    collapse_at_end: bool = field(
        default=False, metadata={"help": "After training, collapse the blocks within threshold and save the model."}
    )
    threshold: float | None = field(
        default=None, metadata={"help": "τ for collapse_at_end and logging (default: the config's threshold)."}
    )
    log_block_alphas: bool = field(default=True, metadata={"help": "Log every block's α (alpha/<block>)."})
    progressive_steps: int = field(
        default=0,
        metadata={"help": "Collapse blocks one at a time, as in the paper: each block is regularised alone for this "
                          "many optimizer steps, then its α is set to 1 and held (the block is linear). 0: all "
                          "blocks at once."},
    )
    progressive_start: int = field(
        default=0,
        metadata={"help": "Optimizer steps of fine-tuning with every α held at its initial value before the first "
                          "progressive stage."},
    )
    progressive_order: str = field(
        default="deepest_first",
        metadata={"help": "Order of the progressive stages: 'deepest_first' (the paper's), 'shallowest_first', "
                          "'planned' (the calibration planner's ranking, cheapest first, of the model as it is when "
                          "the first stage starts; needs the trainer's calibration_data), or comma-separated block "
                          "names (the keys of hf_layercollapse.injected_activations(model))."},
    )
    distillation: Distillation | str | None = field(
        default=None,
        metadata={"help": "Train on KL(original model ‖ student) (see hf_layercollapse.Distillation): a Distillation, "
                          "or its settings as 'TEACHER,key=value,...' (teacher 'copy' or 'self'; temperature, top_k, "
                          "task_weight), e.g. 'copy,temperature=2,top_k=50'. Default: the task loss only."},
    )

    def __post_init__(self) -> None:
        if isinstance(self.distillation, str):
            self.distillation = Distillation.from_string(self.distillation)
        if self.distillation is not None and not isinstance(self.distillation, Distillation):
            raise TypeError(f"distillation must be a hf_layercollapse.Distillation (or its settings as a string), got "
                            f"{type(self.distillation).__name__}.")
        if self.reg_weight is not None and not self.reg_weight >= 0:
            raise ValueError(f"reg_weight={self.reg_weight!r} must be >= 0.")
        if self.reg_schedule not in REG_SCHEDULES:
            raise ValueError(f"reg_schedule={self.reg_schedule!r}: use one of {REG_SCHEDULES}.")
        if not 0.0 <= self.reg_warmup_ratio <= 1.0:
            raise ValueError(f"reg_warmup_ratio={self.reg_warmup_ratio!r} must lie in [0, 1].")
        if self.alpha_learning_rate is not None and not self.alpha_learning_rate > 0:
            raise ValueError(f"alpha_learning_rate={self.alpha_learning_rate!r} must be > 0.")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold={self.threshold!r} must lie in [0, 1].")
        if self.progressive_steps < 0 or self.progressive_start < 0:
            raise ValueError(f"progressive_steps={self.progressive_steps!r} and progressive_start="
                             f"{self.progressive_start!r} must be >= 0.")
        if not self.progressive_order.strip():
            raise ValueError("progressive_order is empty: use 'deepest_first', 'shallowest_first', 'planned' or "
                             "block names.")
        if not self.progressive_steps and (self.progressive_start or self.progressive_order != "deepest_first"):
            raise ValueError("progressive_start and progressive_order need progressive_steps > 0 (the length of "
                             "each block's stage).")
