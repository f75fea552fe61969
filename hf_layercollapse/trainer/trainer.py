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
import re
from dataclasses import replace
from pathlib import Path

import torch
from peft import PeftModel
from torch import nn
from transformers import Trainer
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..activation import injected_activations
from ..collapse import collapse_model
from ..inject import check_refittable, regularization_loss
from ..peft import merge_lora_and_collapse, peft_trainer_settings
from ..record import CollapseRecord
from ..report import CollapseReport
from .arguments import CollapseArguments
from .callbacks import ProgressiveSchedule, RefitTargets, _ClampAlphaCallback
from .distillation import fingerprint

logger = logging.getLogger(__name__)

#: Written into each checkpoint of a distillation run: its settings and its teacher's fingerprint (never the teacher).
DISTILLATION_FILE = "layercollapse_distillation.json"
#: The parts of the training loss, logged over the logging window as ``loss`` is.
LOSS_PARTS = ("loss_task", "loss_kl", "loss_reg")


def last_complete_checkpoint(output_dir: str) -> str:
    """The newest ``checkpoint-N`` folder of ``output_dir`` that holds its ``trainer_state.json`` (the Trainer writes
    it after the model and optimizer: a folder without it was interrupted); a clear error when there is none."""
    folder = Path(output_dir)
    found = sorted((int(m.group(1)), p) for p in (folder.iterdir() if folder.is_dir() else [])
                   if p.is_dir() and (m := re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)", p.name)))
    partial = []
    for _, path in reversed(found):
        if (path / TRAINER_STATE_NAME).is_file():
            if partial:
                logger.warning("Resuming from %s: the newer %s %s incomplete (interrupted while saving) and %s "
                               "passed over.", path, ", ".join(str(p) for p in partial),
                               "is" if len(partial) == 1 else "are", "was" if len(partial) == 1 else "were")
            return str(path)
        partial.append(path)
    detail = f" ({', '.join(str(p) for p in partial)} {'is' if len(partial) == 1 else 'are'} incomplete)" if partial \
        else ""
    raise ValueError(f"resume_from_checkpoint=True: {output_dir} holds no complete checkpoint{detail}. Start "
                     "without resume_from_checkpoint, or give the path of a checkpoint folder.")


class LayerCollapseTrainerMixin:
    """Adds LayerCollapse to a ``transformers.Trainer`` subclass (see :class:`LayerCollapseTrainer`)."""

    def __init__(self, *args, collapse_args: CollapseArguments | None = None, calibration_data=None,
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.collapse_args = replace(collapse_args) if collapse_args is not None else CollapseArguments()
        if not injected_activations(self.model) and self.collapse_args.distillation is None:
            raise ValueError(
                f"{type(self.model).__name__} has no collapsible activations: call "
                "hf_layercollapse.get_collapse_model(model, LayerCollapseConfig(...)) before creating the trainer "
                "(or, to heal a model that is collapsed already, train it with CollapseArguments(distillation=...))."
            )
        # a PEFT-wrapped model (get_peft_model / get_lora_collapse_model) keeps its settings in its LayerCollapseConfig
        settings = peft_trainer_settings(self.model)
        if settings is None:
            record = CollapseRecord.of(getattr(self.model, "get_base_model", lambda: self.model)())
            settings = record.config if record is not None else None
        if self.collapse_args.reg_weight is None:
            self.collapse_args.reg_weight = settings.reg_weight if settings is not None else 1.0
        if self.collapse_args.threshold is None:
            self.collapse_args.threshold = settings.threshold if settings is not None else 0.05
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
        self._parts: dict[str, torch.Tensor] = {}  # Σ of each loss part over the logging window
        self._parts_steps, self._parts_step = 0, None  # optimizer steps in the window, the latest one seen
        self._teacher: nn.Module | None = None  # held here, outside the model's module tree: never saved or wrapped
        self._teacher_fingerprint: list[float] | None = None
        if self.collapse_args.distillation is not None:
            self._build_teacher(self.model)
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
        if self.collapse_args.distillation is not None:
            self._check_resumed_teacher(resume_from_checkpoint)

    # ------------------------------------------------------------------------------------------- distillation
    def _build_teacher(self, model: nn.Module) -> None:
        """The teacher of ``collapse_args.distillation`` for ``model`` (the model handed to the trainer, or the one
        ``model_init`` built: a resumed run gets the same teacher as the run that wrote the checkpoint)."""
        teacher = self.collapse_args.distillation.teacher
        teacher.check(model, sharded=self.is_fsdp_enabled or self.is_deepspeed_enabled)
        self._teacher, self._teacher_fingerprint = teacher.build(model), None

    def call_model_init(self, trial=None):
        model = super().call_model_init(trial)
        if getattr(self, "collapse_args", None) is not None and self.collapse_args.distillation is not None:
            self._build_teacher(model)
        return model

    def _teacher_logits(self, model: nn.Module, inputs: dict) -> torch.Tensor:
        """The teacher's logits for this micro-batch (before the student's forward pass: the self teacher sets α)."""
        held = self._teacher
        if held is not None and not getattr(held, "hf_device_map", None):
            param = next(held.parameters(), None)
            if param is not None and param.device != self.args.device:
                held.to(self.args.device)
        if self._shift_labels:  # a causal LM needs no labels to predict; the teacher's LM loss would be wasted
            inputs = {k: v for k, v in inputs.items() if k not in ("labels", "shift_labels")}
        with self.accelerator.autocast():
            return self.collapse_args.distillation.teacher.logits(model, held, inputs)

    def _teacher_record(self) -> dict:
        if self._teacher is not None and self._teacher_fingerprint is None:
            self._teacher_fingerprint = fingerprint(self._teacher)
        return {**self.collapse_args.distillation.describe(), "fingerprint": self._teacher_fingerprint}

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        folder = Path(self.args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if self.collapse_args.distillation is not None and self.args.should_save and folder.is_dir():
            tmp = folder / (DISTILLATION_FILE + ".tmp")
            tmp.write_text(json.dumps(self._teacher_record()) + "\n")
            os.replace(tmp, folder / DISTILLATION_FILE)

    def _check_resumed_teacher(self, checkpoint: str) -> None:
        path = Path(checkpoint) / DISTILLATION_FILE
        if not path.is_file():
            logger.warning("Resuming distillation from %s, which has no %s: the teacher cannot be checked against "
                           "the one of the run that wrote it.", checkpoint, DISTILLATION_FILE)
            return
        saved, now = json.loads(path.read_text()), self._teacher_record()
        before, after = saved.pop("fingerprint", None), now.pop("fingerprint")
        if saved != now:
            logger.warning("Resuming with other distillation settings (%s) than the run that wrote %s (%s).", now,
                           checkpoint, saved)
        elif before is not None and after is not None and not all(
                math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-6) for a, b in zip(before, after)):
            raise ValueError(
                f"The distillation teacher differs from the one of the run that wrote {checkpoint}: resuming would "
                "not continue that run. Hand the trainer the model the run started from (as built before training: "
                "the checkpoint's weights are loaded into it), not a model loaded from a checkpoint."
            )

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
    def _item_mask(self, inputs: dict) -> tuple[torch.Tensor | None, bool]:
        """The items that count (labels that are not -100, shifted for a causal LM), and whether they are shifted:
        then the item at position i is predicted by the logits at position i."""
        labels, shifted = inputs.get("shift_labels"), False
        if labels is None:
            labels = inputs.get("labels")
            if labels is not None and self._shift_labels:
                labels, shifted = labels[..., 1:], True
        if not isinstance(labels, torch.Tensor):
            return None, False
        return labels.ne(-100), shifted

    def _count_items(self, inputs: dict) -> torch.Tensor | None:
        mask, _ = self._item_mask(inputs)
        return mask.sum() if mask is not None else None

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
        """Task loss (or its mix with the distillation KL) + λ·Σ(1−α)², each counted exactly once per optimizer step.

        The task loss is the head's mean over this micro-batch, re-weighted by its share of the items (labels
        that are not -100) of the whole accumulated batch, so the gradient equals the one of a single large
        batch whatever the accumulation and whether or not the head honours ``num_items_in_batch``. The
        distillation KL (``CollapseArguments.distillation``) is summed over this micro-batch's items and divided by
        the items of the accumulated batch, likewise. The regulariser is divided by the number of accumulation steps.
        """
        if not model.training:  # evaluation: the task loss only (and no α needed: the model may be collapsed)
            return super().compute_loss(model, inputs, return_outputs=return_outputs)
        distillation = self.collapse_args.distillation
        mask, shifted = self._item_mask(inputs)
        items = mask.sum() if mask is not None else None
        if distillation is not None:
            if mask is None:
                raise ValueError("Distillation counts the positions by their labels: give the batches labels (-100 "
                                 "where a position does not count), e.g. DataCollatorForLanguageModeling(mlm=False).")
            teacher = self._teacher_logits(model, inputs)  # before the student's forward: the self teacher sets α
        task_loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=None)
        steps = self.current_gradient_accumulation_steps
        if items is not None and num_items_in_batch is not None:
            total = torch.as_tensor(num_items_in_batch, device=task_loss.device, dtype=torch.float32)
            task_loss = task_loss * items.to(task_loss.device) / total.clamp(min=1)
            per_item = 1 / total.clamp(min=1)
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                task_loss = task_loss * self.args.world_size  # DDP averages gradients over ranks
                per_item = per_item * self.args.world_size
        else:
            task_loss = task_loss / steps
            per_item = 1 / (steps * items.clamp(min=1)) if items is not None else None
        parts = {"loss_task": task_loss}
        loss = task_loss
        if distillation is not None:
            parts["loss_kl"] = self._distillation_kl(outputs, teacher, mask, shifted).sum() * per_item
            weights = ((distillation.task_weight, task_loss), (distillation.kl_weight, parts["loss_kl"]))
            loss = sum(w * part for w, part in weights if w)  # a zero weight leaves its part out of the graph
        reg = self._regularization(model)
        self._reg_sum = self._reg_sum.to(reg.device) + reg.detach()
        self._reg_count += 1
        parts["loss_reg"] = self.current_reg_weight() * reg / steps
        loss = loss + parts["loss_reg"]
        self._record_parts(parts)
        return (loss, outputs) if return_outputs else loss

    def _distillation_kl(self, outputs, teacher: torch.Tensor, mask: torch.Tensor, shifted: bool) -> torch.Tensor:
        """The distillation KL at each counted position of this micro-batch."""
        student = outputs["logits"] if isinstance(outputs, dict) else outputs[1]
        if shifted:
            student, teacher = student[..., :-1, :], teacher[..., :-1, :]
        if student.shape[:-1] != mask.shape or teacher.shape != student.shape:
            raise ValueError(f"Distillation needs one label per position of the logits: logits {tuple(student.shape)}"
                             f", teacher logits {tuple(teacher.shape)}, labels {tuple(mask.shape)}.")
        mask = mask.to(student.device)
        return self.collapse_args.distillation.kl(student[mask], teacher.to(student.device)[mask])

    def _record_parts(self, parts: dict[str, torch.Tensor]) -> None:
        if self._parts_step != self.state.global_step:  # the first micro-batch of an optimizer step
            self._parts_steps, self._parts_step = self._parts_steps + 1, self.state.global_step
        for name, value in parts.items():
            value = value.detach().float().reshape(())
            self._parts[name] = self._parts[name].to(value.device) + value if name in self._parts else value

    def _regularization(self, model: nn.Module) -> torch.Tensor:
        """Σ(1−α)² over the injected blocks, or, on a progressive schedule, the term of the active block alone (0
        without injected blocks: a collapsed model healed by distillation)."""
        if not injected_activations(model):
            return torch.zeros((), device=self.args.device)
        if self.progressive is None:
            return regularization_loss(model)
        active = self.progressive.active(self.state.global_step)
        terms = {id(act): act.regularization_term() for act in injected_activations(model).values()}  # consume all
        if active is None:
            return torch.zeros((), device=next(iter(terms.values())).device)
        return terms[id(active)].float()

    # ---------------------------------------------------------------------------------------------- logging
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            logs.update(self._collapse_metrics())
        super().log(logs, start_time)

    def _collapse_metrics(self) -> dict[str, float]:
        acts = injected_activations(self.model)
        alphas = torch.stack([
            (a.last_alpha if a.last_alpha is not None else a.alpha.detach()).float().reshape(-1)[0]
            for a in acts.values()
        ]) if acts else torch.zeros(0, device=self.args.device)
        reg = self._reg_sum / max(self._reg_count, 1)
        names = [name for name in LOSS_PARTS if name in self._parts] if self._parts_steps else []
        parts = [self._parts[name].reshape(1).to(alphas.device) / self._parts_steps for name in names]
        reduced = self.accelerator.reduce(torch.cat([reg.reshape(1).to(alphas.device), *parts, alphas]), "mean")
        self._reg_sum, self._reg_count = torch.zeros(()), 0
        self._parts, self._parts_steps = {}, 0
        metrics = dict(zip(names, reduced[1:1 + len(names)].tolist()))
        alphas = reduced[1 + len(names):].tolist()
        if not acts:  # a collapsed model healed by distillation
            return metrics
        metrics.update({
            "reg_loss": float(reduced[0]),
            "reg_weight": self.current_reg_weight(),
            "alpha_mean": sum(alphas) / len(alphas),
            "alpha_within_threshold": sum(abs(1 - a) <= self.collapse_args.threshold for a in alphas),
        })
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
    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """``Trainer.train``; ``resume_from_checkpoint=True`` resumes from the newest *complete* checkpoint of
        ``output_dir`` (one a kill interrupted while it was written is passed over, with a warning naming it)."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
        if self.collapse_args.distillation is not None and self.model_init is None:  # what trains may have changed
            self.collapse_args.distillation.teacher.check(self.model, self.is_fsdp_enabled or self.is_deepspeed_enabled)
        output = super().train(resume_from_checkpoint, *args, **kwargs)
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
