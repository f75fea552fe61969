"""`LayerCollapseTrainer`: regularised fine-tuning that pulls each injected block's α to 1.

Works on one process or many (``accelerate launch`` / ``torchrun``: DDP; FSDP), with gradient accumulation,
mixed precision and ``resume_from_checkpoint``. The mixin composes with other ``Trainer`` subclasses::

    class LayerCollapseSeq2SeqTrainer(LayerCollapseTrainerMixin, Seq2SeqTrainer):
        pass
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from peft import PeftModel
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .activation import CollapsibleActivation
from .collapse import collapse_model
from .injection import check_refittable, injected_activations, refit_linear_targets, regularization_loss
from .peft_integration import merge_lora_and_collapse, peft_trainer_settings
from .plan import get_plan
from .report import CollapseReport

logger = logging.getLogger(__name__)

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

    def __post_init__(self) -> None:
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


class _ClampAlphaCallback(TrainerCallback):
    """Clamps α to [0, 1] after every optimizer step."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer

    def on_optimizer_step(self, args, state, control, **kwargs):
        with torch.no_grad():
            for act in injected_activations(self.trainer.model).values():
                act.alpha.clamp_(0.0, 1.0)


class ProgressiveSchedule(TrainerCallback):
    """Collapses the blocks one at a time (``CollapseArguments.progressive_steps``).

    Block ``i`` of the order is regularised alone during optimizer steps ``start + i·S + 1 … start + (i+1)·S``;
    when its stage ends its α is set to exactly 1 and held (the block is linear: collapsed in effect, merged by
    ``collapse_model`` later). Blocks whose stage has not begun keep α, and their linear targets (a gated block's
    ``c``, an affine target's map), at their values when training started. Held parameters get no gradient — also
    not in gradient clipping — so the optimizer leaves them and their state alone. The change happens in
    ``on_optimizer_step``: every callback's ``on_step_end`` at step ``start + k·S`` sees k blocks at α = 1.
    Injected blocks left out of a named order are held at their initial α throughout. With
    ``progressive_order="planned"`` the order is the calibration planner's ranking of the blocks, cheapest first, on
    the trainer's ``calibration_data`` and the model as it is when the first stage starts; it is saved with each
    checkpoint (``layercollapse_progressive_order.json``), so a resumed run follows the same order.
    """

    ORDER_FILE = "layercollapse_progressive_order.json"

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.args = trainer.collapse_args
        self.planned = self.args.progressive_order.strip() == "planned"
        self.chosen = not self.planned  # a planned order is chosen when the first stage starts
        self.names = self._ordered_names(list(injected_activations(trainer.model)))
        self._resolve(trainer.model)

    def _ordered_names(self, available: list[str]) -> list[str]:
        order = self.args.progressive_order.strip()
        if order in ("deepest_first", "shallowest_first", "planned"):  # planned: replaced when the first stage starts
            return available if order == "shallowest_first" else available[::-1]
        names = [n.strip() for n in order.split(",") if n.strip()]
        unknown = [n for n in names if n not in available]
        if unknown or len(set(names)) != len(names):
            raise ValueError(
                f"progressive_order names {unknown or 'a block twice'}: give each injected block at most once, "
                f"from {available}, or 'deepest_first' / 'shallowest_first'."
            )
        return names

    def _resolve(self, model: nn.Module) -> None:
        """Bind the schedule to ``model``'s activations (again at train begin: ``model_init`` builds a new model)."""
        acts = injected_activations(model)
        self.blocks = [acts[n] for n in self.names]
        self.unscheduled = [act for name, act in acts.items() if name not in self.names]  # held, never collapsed
        self.initial: list[tuple[torch.Tensor, torch.Tensor | None]] = []

    def finished(self, step: int) -> int:
        """How many blocks are linear (held at α = 1) after ``step`` optimizer steps."""
        done = (step - self.args.progressive_start) // self.args.progressive_steps
        return max(0, min(len(self.blocks), done))

    def active(self, step: int) -> CollapsibleActivation | None:
        """The block regularised during optimizer step ``step + 1`` (None before the first and after the last stage)."""
        if step < self.args.progressive_start or self.finished(step) >= len(self.blocks):
            return None
        return self.blocks[self.finished(step)]

    def _all(self) -> list[CollapsibleActivation]:
        return self.blocks + self.unscheduled

    def on_train_begin(self, args, state, control, **kwargs):
        if not self.chosen and state.global_step > self.args.progressive_start:
            raise ValueError(
                f"Resuming at step {state.global_step}, after the planned progressive order was chosen (step "
                f"{self.args.progressive_start}), from a checkpoint without {self.ORDER_FILE}: the order cannot be "
                "known. Resume from a checkpoint this version of LayerCollapseTrainer saved, or name the order in "
                "progressive_order."
            )
        self._resolve(self.trainer.model)
        end = self.args.progressive_start + len(self.blocks) * self.args.progressive_steps
        if state.max_steps and end > state.max_steps:
            logger.warning(
                "progressive schedule: %d blocks × %d steps from step %d ends at step %d, after training stops "
                "(max_steps %d): the last blocks will not reach α = 1. Train longer or shorten progressive_steps.",
                len(self.blocks), self.args.progressive_steps, self.args.progressive_start, end, state.max_steps,
            )
        self.initial = [(act.alpha.detach().clone(), _targets(act)) for act in self._all()]
        self._hold(state.global_step)

    def drop_held_gradients(self, step: int) -> None:
        """Clear the gradients of held α (and of the linear targets, ``c`` or an affine map, of blocks whose stage has
        not begun) for optimizer step ``step + 1``."""
        finished, active = self.finished(step), self.active(step)
        for i, act in enumerate(self._all()):
            if act is active:
                continue
            act.alpha.grad = None
            if i >= finished:  # a linear block's c (or affine target) trains: it is the block now
                for target in act.target_parameters():
                    target.grad = None

    def set_order(self, names: list[str]) -> None:
        """Run the stages in the order ``names`` (a planned order, chosen or read back from a checkpoint)."""
        initial = dict(zip(map(id, self._all()), self.initial))  # the held values, whatever the order
        self.names = names
        self._resolve(self.trainer.model)
        self.initial = [initial[id(act)] for act in self._all()] if initial else []
        self.chosen = True

    def _choose_planned_order(self) -> list[str]:
        """The planner's ranking of the injected blocks, cheapest first, on the trainer's calibration data (blocks
        whose merge saves nothing go last, deepest first). Under ``torch.distributed`` rank 0's ranking is used."""
        from .planner import plan_collapse

        model, available = self.trainer.model, list(injected_activations(self.trainer.model))
        plan = plan_collapse(model, self.trainer.calibration_data, num_blocks=1, show_progress=False)
        ranked = [c.name for c in sorted(plan.candidates, key=lambda c: c.cost) if c.name in available]
        names = ranked + [n for n in available[::-1] if n not in ranked]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            box = [names]
            torch.distributed.broadcast_object_list(box, src=0)
            names = box[0]
        return names

    def on_step_begin(self, args, state, control, **kwargs):
        if not self.chosen and state.global_step >= self.args.progressive_start:
            self.set_order(self._choose_planned_order())
            logger.info("progressive schedule: the planner's order at step %d is %s", state.global_step, self.names)

    def on_save(self, args, state, control, **kwargs):
        if self.planned and self.chosen and state.is_world_process_zero:  # a resumed run must follow the same order
            folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            if folder.is_dir():
                tmp = folder / (self.ORDER_FILE + ".tmp")
                tmp.write_text(json.dumps({"progressive_order": self.names}) + "\n")
                os.replace(tmp, folder / self.ORDER_FILE)

    def load_order(self, checkpoint: str) -> None:
        """On resuming: the planned order the checkpoint's run chose, if it had chosen one."""
        path = Path(checkpoint) / self.ORDER_FILE
        if not (self.planned and path.is_file()):
            return
        available = list(injected_activations(self.trainer.model))
        try:
            names = json.loads(path.read_text())["progressive_order"]
        except (json.JSONDecodeError, KeyError, TypeError):
            names = None
        if not isinstance(names, list) or sorted(names) != sorted(available):
            raise ValueError(f"{path} does not hold an order of this model's blocks {available}: it is corrupt or "
                             "comes from another model's run.")
        self.set_order(names)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.drop_held_gradients(state.global_step)

    def on_optimizer_step(self, args, state, control, **kwargs):
        step = state.global_step + 1
        active = self.active(state.global_step)
        if active is not None and self.finished(step) > self.finished(state.global_step):
            alpha = active.alpha_value
            if abs(1.0 - alpha) > self.trainer.collapse_args.threshold:
                name = self.names[self.blocks.index(active)]
                logger.warning(
                    "progressive schedule: %s ends its stage at α = %.3f, outside the threshold; it is set to 1 now. "
                    "Longer stages, a larger reg_weight or alpha_learning_rate let α get there by training.",
                    name, alpha,
                )
        self._hold(step)

    def _hold(self, step: int) -> None:
        finished, active = self.finished(step), self.active(step)
        with torch.no_grad():
            for i, act in enumerate(self._all()):
                if i < finished:
                    act.alpha.fill_(1.0)
                elif act is not active:
                    alpha, targets = self.initial[i]
                    act.alpha.copy_(alpha)
                    for target, value in zip(act.target_parameters(), targets):
                        target.copy_(value)


class RefitTargets(TrainerCallback):
    """Refits each block's linear target (:func:`~hf_layercollapse.refit_linear_targets`) on the trainer's
    ``calibration_data`` when its α starts to move: at the first step (all blocks at once), or at the start of the
    block's progressive stage. Until then the block is at α = 0, so refitting changes no output; a resumed run
    refits at the same steps as an uninterrupted one."""

    def __init__(self, trainer: Trainer, calibration_data) -> None:
        self.trainer, self.calibration_data = trainer, calibration_data

    def starting(self, step: int) -> list[str]:
        """The blocks whose α starts to move at optimizer step ``step + 1``."""
        progressive = self.trainer.progressive
        if progressive is None:
            return list(injected_activations(self.trainer.model)) if step == 0 else []
        offset = step - self.trainer.collapse_args.progressive_start
        stage, within = divmod(offset, self.trainer.collapse_args.progressive_steps)
        return [progressive.names[stage]] if offset >= 0 and within == 0 and stage < len(progressive.names) else []

    def on_step_begin(self, args, state, control, **kwargs):
        names = self.starting(state.global_step)
        if names:
            refitted = refit_linear_targets(self.trainer.model, self.calibration_data, names)
            if refitted:
                logger.info("step %d: refitted the linear targets of %s", state.global_step, refitted)


def _targets(act: CollapsibleActivation) -> list[torch.Tensor]:
    return [target.detach().clone() for target in act.target_parameters()]


class LayerCollapseTrainerMixin:
    """Adds LayerCollapse to a ``transformers.Trainer`` subclass (see :class:`LayerCollapseTrainer`)."""

    def __init__(self, *args, collapse_args: CollapseArguments | None = None, calibration_data=None,
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.collapse_args = replace(collapse_args) if collapse_args is not None else CollapseArguments()
        if not injected_activations(self.model):
            raise ValueError(
                f"{type(self.model).__name__} has no collapsible activations: call "
                "hf_layercollapse.get_collapse_model(model, LayerCollapseConfig(...)) before creating the trainer."
            )
        # a PEFT-wrapped model (get_peft_model / get_lora_collapse_model) keeps its settings in its LayerCollapseConfig
        plan_config = peft_trainer_settings(self.model) or (get_plan(self.model) or {}).get("config", {})
        if self.collapse_args.reg_weight is None:
            self.collapse_args.reg_weight = float(plan_config.get("reg_weight", 1.0))
        if self.collapse_args.threshold is None:
            self.collapse_args.threshold = float(plan_config.get("threshold", 0.05))
        # Task-loss normalisation over the accumulated batch is done here, per head (see compute_loss): Trainer's
        # own choice trusts `**kwargs` in forward, which many heads accept but ignore (transformers issue 47688).
        self.model_accepts_loss_kwargs = True
        self.loss_is_scaled_for_ga = True
        unwrapped = getattr(self.model, "get_base_model", lambda: self.model)()
        self._shift_labels = getattr(self, "_loss_shifts_labels", False) or (
            unwrapped._get_name() in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
            and not getattr(unwrapped.config, "is_encoder_decoder", False)
        )
        self._reg_sum = torch.zeros(())
        self._reg_count = 0
        self.collapse_report: CollapseReport | None = None
        if self.collapse_args.clamp_alpha:
            self.add_callback(_ClampAlphaCallback(self))
        self.calibration_data = calibration_data
        self.progressive: ProgressiveSchedule | None = None
        if self.collapse_args.progressive_order.strip() == "planned" and calibration_data is None:
            raise ValueError("progressive_order='planned' ranks the blocks with plan_collapse on calibration data: "
                             "pass LayerCollapseTrainer(..., calibration_data=...) (a few hundred training examples).")
        if self.collapse_args.progressive_steps:
            if self.is_deepspeed_enabled:
                raise ValueError("progressive_steps is not supported with DeepSpeed (it partitions α, so α cannot be "
                                 "held); use DDP or FSDP, or train all blocks at once (progressive_steps=0).")
            self.progressive = ProgressiveSchedule(self)
            self.add_callback(self.progressive)
        if calibration_data is not None:
            if self.is_fsdp_enabled or self.is_deepspeed_enabled:
                raise ValueError("calibration_data (refitting linear targets during training) needs the whole model "
                                 "on every process: use DDP, or leave calibration_data out under FSDP / DeepSpeed.")
            check_refittable(self.model)
            self.add_callback(RefitTargets(self, calibration_data))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if self.progressive is not None:  # a planned order chosen before the checkpoint was saved
            self.progressive.load_order(resume_from_checkpoint)

    # ----------------------------------------------------------------------------------------------- schedule
    def current_reg_weight(self) -> float:
        """λ at the current step, following ``reg_schedule``."""
        args = self.collapse_args
        if args.reg_schedule == "constant" or args.reg_warmup_ratio == 0.0:
            return args.reg_weight
        max_steps = max(self.state.max_steps or 1, 1)
        progress = min(1.0, self.state.global_step / max(args.reg_warmup_ratio * max_steps, 1e-12))
        factor = progress if args.reg_schedule == "linear" else 0.5 * (1.0 - math.cos(math.pi * progress))
        return args.reg_weight * factor

    # ---------------------------------------------------------------------------------------------- optimizer
    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        """Everything ``Trainer`` decays except α and the linear targets (gate constants c, affine targets): decay
        would pull α away from 1, c towards a zero gate and an affine target away from its fit while it is held."""
        acts = injected_activations(model).values()
        exempt = {id(act.alpha) for act in acts} | {id(p) for act in acts for p in act.target_parameters()}
        return [n for n in super().get_decay_parameter_names(model)
                if id(model.get_parameter(n)) not in exempt]

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model) if model is not None else super().create_optimizer()
        lr = self.collapse_args.alpha_learning_rate
        if lr is not None:
            alphas = [act.alpha for act in injected_activations(self.model).values() if act.alpha.requires_grad]
            ids = {id(a) for a in alphas}
            for group in optimizer.param_groups:
                group["params"] = [p for p in group["params"] if id(p) not in ids]
            optimizer.add_param_group({"params": alphas, "lr": lr, "weight_decay": 0.0})
        return optimizer

    def _clip_grad_norm(self, model):
        # Trainer clips before on_pre_optimizer_step: held parameters must leave the clipping norm here already
        if self.progressive is not None:
            self.progressive.drop_held_gradients(self.state.global_step)
        return super()._clip_grad_norm(model)

    # ------------------------------------------------------------------------------------------------- loss
    def _count_items(self, inputs: dict) -> torch.Tensor | None:
        labels = inputs.get("shift_labels")
        if labels is None:
            labels = inputs.get("labels")
            if labels is not None and self._shift_labels:
                labels = labels[..., 1:]
        if not isinstance(labels, torch.Tensor):
            return None
        return labels.ne(-100).sum()

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> torch.Tensor | None:
        """Items (labels that count) in the accumulated batch, counted by the same rule as each micro-batch."""
        counts = [self._count_items(batch) for batch in batch_samples]
        if not counts or any(c is None for c in counts):
            return None
        total = sum(counts).to(device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            total = self.accelerator.gather(total).sum()
        return total

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Task loss + λ·Σ(1−α)², both counted exactly once per optimizer step.

        The task loss is the head's mean over this micro-batch, re-weighted by its share of the items (labels
        that are not -100) of the whole accumulated batch, so the gradient equals the one of a single large
        batch whatever the accumulation and whether or not the head honours ``num_items_in_batch``. The
        regulariser is divided by the number of accumulation steps.
        """
        if not model.training:  # evaluation: the task loss only (and no α needed: the model may be collapsed)
            return super().compute_loss(model, inputs, return_outputs=return_outputs)
        items = self._count_items(inputs)
        task_loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=None)
        steps = self.current_gradient_accumulation_steps
        if items is not None and num_items_in_batch is not None:
            total = torch.as_tensor(num_items_in_batch, device=task_loss.device, dtype=torch.float32)
            task_loss = task_loss * items.to(task_loss.device) / total.clamp(min=1)
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                task_loss = task_loss * self.args.world_size  # DDP averages gradients over ranks
        else:
            task_loss = task_loss / steps
        reg = self._regularization(model)
        self._reg_sum = self._reg_sum.to(reg.device) + reg.detach()
        self._reg_count += 1
        loss = task_loss + self.current_reg_weight() * reg / steps
        return (loss, outputs) if return_outputs else loss

    def _regularization(self, model: nn.Module) -> torch.Tensor:
        """Σ(1−α)² over the injected blocks, or, on a progressive schedule, the term of the active block alone."""
        if self.progressive is None:
            return regularization_loss(model)
        active = self.progressive.active(self.state.global_step)
        terms = {id(act): act.regularization_term() for act in injected_activations(model).values()}  # consume all
        if active is None:
            return torch.zeros((), device=next(iter(terms.values())).device)
        return terms[id(active)].float()

    # ---------------------------------------------------------------------------------------------- logging
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and injected_activations(self.model):
            logs.update(self._collapse_metrics())
        super().log(logs, start_time)

    def _collapse_metrics(self) -> dict[str, float]:
        acts = injected_activations(self.model)
        alphas = torch.stack([
            (a.last_alpha if a.last_alpha is not None else a.alpha.detach()).float().reshape(-1)[0]
            for a in acts.values()
        ])
        reg = self._reg_sum / max(self._reg_count, 1)
        reduced = self.accelerator.reduce(torch.cat([reg.reshape(1).to(alphas.device), alphas]), "mean")
        self._reg_sum, self._reg_count = torch.zeros(()), 0
        alphas = reduced[1:].tolist()
        metrics = {
            "reg_loss": float(reduced[0]),
            "reg_weight": self.current_reg_weight(),
            "alpha_mean": sum(alphas) / len(alphas),
            "alpha_within_threshold": sum(abs(1 - a) <= self.collapse_args.threshold for a in alphas),
        }
        if self.collapse_args.log_block_alphas:
            metrics.update({f"alpha/{name}": a for name, a in zip(acts, alphas)})
        return metrics

    # ------------------------------------------------------------------------------------------------- save
    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        """``Trainer._save``, but the training arguments are written as JSON instead of a pickled
        ``training_args.bin``: a saved model directory holds no pickle."""
        super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        pickled = os.path.join(output_dir, "training_args.bin")
        if self.args.should_save and os.path.isfile(pickled):
            os.remove(pickled)
            with open(os.path.join(output_dir, "training_args.json"), "w", encoding="utf-8") as handle:
                handle.write(self.args.to_json_string())

    # ------------------------------------------------------------------------------------------------ train
    def train(self, *args, **kwargs):
        output = super().train(*args, **kwargs)
        if self.collapse_args.collapse_at_end:
            self.collapse_and_save()
        return output

    def collapse_and_save(self, output_dir: str | None = None) -> CollapseReport | None:
        """Collapse the blocks within threshold, log the report and ``save_model`` (collapsed or, when no block
        is within threshold, as it is)."""
        if self.is_fsdp_enabled:
            logger.warning("collapse_at_end with FSDP: saving the injected model; collapse it after loading "
                           "(hf-layercollapse collapse) on one process.")
            self.save_model(output_dir)
            return None
        model = self.accelerator.unwrap_model(self.model)
        if isinstance(model, PeftModel):  # merge the adapters (LoRA, α) first, collapse then; save the plain model
            model, report = merge_lora_and_collapse(model, threshold=self.collapse_args.threshold, return_report=True)
            self.model = self.model_wrapped = model
        else:
            report = collapse_model(model, threshold=self.collapse_args.threshold)
        self.collapse_report = report
        if not report.collapsed:
            logger.warning("collapse_at_end: no block has |1-α| <= %s; saving the uncollapsed model.\n%s",
                           self.collapse_args.threshold, report)
        else:
            logger.info("LayerCollapse report:\n%s", report)
        summary = report.to_dict()
        self.log({"collapsed_blocks": summary["num_collapsed"], "params_saved": summary["params_saved"],
                  "params_after": summary["model_params_after"]})
        self.save_model(output_dir)
        return report


class LayerCollapseTrainer(LayerCollapseTrainerMixin, Trainer):
    """A ``transformers.Trainer`` that fine-tunes with the LayerCollapse regulariser.

    Args:
        collapse_args: :class:`CollapseArguments` (λ and its schedule, α learning rate and clamping,
            ``collapse_at_end``, threshold). Every other argument is ``Trainer``'s.
        calibration_data: Batches (or a dataset) of model inputs, as for
            :func:`~hf_layercollapse.get_collapse_model`. When given, each block's linear target (the fitted line of
            ``linear_target="fitted"``, a gated block's ``c``, the map of ``"affine"``) is fitted again on the model
            as fine-tuning left it, at the step its α starts to move (its progressive stage; the first step
            otherwise): see :func:`~hf_layercollapse.refit_linear_targets`. Not with FSDP, DeepSpeed or PEFT
            adapters.

    Example:
        >>> import torch
        >>> from transformers import BertConfig, BertForSequenceClassification, TrainingArguments
        >>> import hf_layercollapse as hlc
        >>> model = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2,
        ...     num_attention_heads=2, intermediate_size=64, vocab_size=50))
        >>> model = hlc.get_collapse_model(model, hlc.LayerCollapseConfig(reg_weight=10.0))
        >>> data = [{"input_ids": torch.tensor([1, 2, 3]), "labels": torch.tensor(1)}] * 8
        >>> args = TrainingArguments("/tmp/hlc-doctest", max_steps=2, per_device_train_batch_size=4,
        ...                          report_to=[], learning_rate=0.1, save_strategy="no", disable_tqdm=True)
        >>> trainer = hlc.LayerCollapseTrainer(model=model, args=args, train_dataset=data)
        >>> _ = trainer.train()  # doctest: +ELLIPSIS
        {'train_runtime': ...}
        >>> all(act.alpha_value > 0 for act in hlc.injected_activations(model).values())
        True
    """
