"""The trainer's callbacks: α clamped to [0, 1], the progressive schedule (one block at a time, in a given or planned
order), and the refit of each block's target when its α starts to move."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..activation import CollapsibleModule, injected_activations
from ..inject import refit_linear_targets
from ..planner import plan_collapse

logger = logging.getLogger(__name__)


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

    def active(self, step: int) -> CollapsibleModule | None:
        """The block regularised during optimizer step ``step + 1`` (None before the first and after the last stage)."""
        if step < self.args.progressive_start or self.finished(step) >= len(self.blocks):
            return None
        return self.blocks[self.finished(step)]

    def _all(self) -> list[CollapsibleModule]:
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


def _targets(act: CollapsibleModule) -> list[torch.Tensor]:
    return [target.detach().clone() for target in act.target_parameters()]
