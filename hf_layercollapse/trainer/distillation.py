"""Self-distillation: the KL divergence from the original model's predictions to the student's, as the trainer's
objective (:class:`Distillation`), and where the original model's logits come from (a :class:`Teacher`).

The original model is the injected model at α = 0 with every PEFT adapter switched off (for ``activation="blend"``
blocks that is exactly the model before injection). Three teachers give it:

* :class:`CopyTeacher` (``"copy"``, the default): a frozen deep copy of the model handed to the trainer, at α = 0 and
  adapters off, made when the trainer is created. Always exact; costs the memory of one more model.
* :class:`SelfTeacher` (``"self"``): the trained model itself, switched to α = 0 and adapters off for a ``no_grad``
  forward pass. No second copy, but exact only while nothing else trains (α, the targets and PEFT adapters such as
  LoRA only), so it is refused otherwise.
* :class:`FrozenTeacher`: a model you give (the model before a collapse plan was applied, a larger model with the same
  vocabulary), frozen and used as it is.

A teacher module is held by the trainer, outside the trained model's module tree: it is never wrapped by DDP, never
in the optimizer and never written into a checkpoint.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import reduce

import torch
from torch import nn

from ..activation import injected_activations
from ..peft.model import adapter_layers, switch_adapters_off


# ------------------------------------------------------------------------------------------- the original model
def _adapter_parameters(model: nn.Module) -> set[int]:
    """Ids of the parameters that switching the adapters off takes out of the forward pass (LoRA, LayerCollapse α and
    targets, ``modules_to_save`` copies...): those under each PEFT layer's ``adapter_layer_names``."""
    found = set()
    for layer in adapter_layers(model):
        for name in layer.adapter_layer_names:
            holder = reduce(getattr, name.split("."), layer)
            params = holder.parameters() if isinstance(holder, nn.Module) else [holder]
            found.update(id(p) for p in params if isinstance(p, torch.Tensor))
    return found


def _switch_to_original(model: nn.Module) -> Callable[[], None]:
    """Set every α of ``model`` to 0 and switch every PEFT adapter layer off; return the function that undoes it.

    The adapters are switched off as ``hf_layercollapse.peft``'s target fitting does (:func:`~hf_layercollapse.peft.
    model.switch_adapters_off`: the flag only, trainable parameters unchanged)."""
    acts = list(injected_activations(model).values())
    alphas = [act.alpha.detach().clone() for act in acts]
    with torch.no_grad():
        for act in acts:
            act.alpha.zero_()
    restore_adapters = switch_adapters_off(model)

    def undo() -> None:
        with torch.no_grad():
            for act, alpha in zip(acts, alphas):
                act.alpha.copy_(alpha)
        restore_adapters()

    return undo


@contextmanager
def original_model(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` at α = 0 with its PEFT adapters off, in eval mode, within the block; restored afterwards."""
    undo, training = _switch_to_original(model), model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(training)
        undo()


def _logits(outputs) -> torch.Tensor:
    return outputs["logits"] if isinstance(outputs, dict) else outputs[0]


# ------------------------------------------------------------------------------------------------ the teachers
class Teacher:
    """Where the original model's logits come from (see the module docstring). ``build`` returns the frozen module
    the trainer holds (None: the trained model gives the logits itself)."""

    name = "teacher"

    def build(self, model: nn.Module) -> nn.Module | None:
        """The frozen teacher module for the trainer's (unwrapped) ``model``; None when ``model`` is its own teacher."""
        raise NotImplementedError

    def check(self, model: nn.Module, sharded: bool = False) -> None:
        """Raise when this teacher cannot give the original model's logits for ``model`` (``sharded``: FSDP or
        DeepSpeed holds the parameters)."""

    def logits(self, model: nn.Module, held: nn.Module | None, inputs: dict) -> torch.Tensor:
        """The teacher's logits for ``inputs`` (no gradient); ``model`` is the trained model as the trainer calls it."""
        with torch.no_grad():
            return _logits(held(**inputs))

    def describe(self) -> dict:
        return {"teacher": self.name}


def _frozen(module: nn.Module) -> nn.Module:
    module.requires_grad_(False)
    for param in module.parameters():
        param.grad = None
    return module.eval()


@dataclass(frozen=True)
class CopyTeacher(Teacher):
    """A frozen deep copy of the model handed to the trainer, at α = 0 with its adapters off (``"copy"``)."""

    name = "copy"

    def check(self, model: nn.Module, sharded: bool = False) -> None:
        if any(hasattr(p, "ds_id") for p in model.parameters()):  # partitioned by DeepSpeed ZeRO-3 already
            raise ValueError("Distillation(teacher='copy') cannot copy a model whose parameters ZeRO-3 partitioned: "
                             "load the original model once more outside zero.Init and pass FrozenTeacher(model).")

    def build(self, model: nn.Module) -> nn.Module:
        teacher = copy.deepcopy(model)
        _switch_to_original(teacher)
        return _frozen(teacher)


@dataclass(frozen=True)
class SelfTeacher(Teacher):
    """The trained model itself at α = 0 with its adapters off, in eval mode under ``no_grad`` (``"self"``).

    The original model only while the parameters that stay in that forward pass do not train: training must be
    limited to α, the linear targets and PEFT adapters (LoRA, ``modules_to_save``), which α = 0 and switching the
    adapters off take out. Refused otherwise, and under FSDP / DeepSpeed (α cannot be set outside the forward pass).
    """

    name = "self"

    def build(self, model: nn.Module) -> None:
        return None

    def check(self, model: nn.Module, sharded: bool = False) -> None:
        if sharded:
            raise ValueError("Distillation(teacher='self') sets α outside the forward pass, which FSDP and DeepSpeed "
                             "do not allow: use teacher='copy'.")
        acts = injected_activations(model).values()
        outside = {id(a.alpha) for a in acts} | {id(p) for a in acts for p in a.target_parameters()}
        outside |= _adapter_parameters(model)
        training = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in outside]
        if training:
            shown = ", ".join(repr(n) for n in training[:3]) + (f" and {len(training) - 3} more" if len(training) > 3
                                                                 else "")
            raise ValueError(
                f"Distillation(teacher='self') is the original model only while its weights are frozen, but {shown} "
                "train. Use teacher='copy' (a frozen copy of the model: one more model in memory), or train only α "
                "and the targets (freeze the rest with requires_grad_(False)) or LoRA adapters "
                "(hf_layercollapse.get_lora_collapse_model)."
            )

    def logits(self, model: nn.Module, held: nn.Module | None, inputs: dict) -> torch.Tensor:
        with torch.no_grad(), original_model(model):
            return _logits(model(**inputs))


@dataclass(frozen=True)
class FrozenTeacher(Teacher):
    """A model you give, frozen (``requires_grad_(False)``, eval mode) and used as it is: e.g. the model before a
    collapse plan was applied to the student. Its logits must have the student's shape (the same vocabulary)."""

    model: nn.Module = field(repr=False)
    name = "frozen"

    def build(self, model: nn.Module) -> nn.Module:
        if self.model is model:
            raise ValueError("FrozenTeacher(model) got the trained model itself: use teacher='self' or 'copy'.")
        return _frozen(self.model)


TEACHERS: dict[str, type[Teacher]] = {"copy": CopyTeacher, "self": SelfTeacher}


# --------------------------------------------------------------------------------------------- the objective
@dataclass
class Distillation:
    """Self-distillation for :class:`~hf_layercollapse.LayerCollapseTrainer`: ``CollapseArguments(distillation=...)``.

    The training loss becomes ``(1 − task_weight)·KL + task_weight·task loss + λ·Σ(1−α)²``, where KL is, per counted
    position (a label that is not -100, shifted for causal LMs as the LM loss is), ``T²·Σ_v p_t·(log p_t − log p_s)``
    with ``p = softmax(logits / T)`` of the teacher and the student, summed over the positions and divided by the
    positions of the whole accumulated batch: gradient accumulation and DDP give the gradient of one large batch.

    Args:
        teacher: ``"copy"`` (default), ``"self"``, or a :class:`Teacher` (:class:`FrozenTeacher` for a model of
            your own).
        temperature: T (> 0); the KL is scaled by T² so that its gradient keeps its size as T changes.
        top_k: Restrict the KL to the teacher's ``top_k`` most likely tokens at each position, both distributions
            renormalised over them (None: the full vocabulary). The student is then matched on the teacher's
            ranking of its likely tokens only: how much mass it puts outside them is not penalised.
        task_weight: Share of the task loss in the mix (0: distillation only, 1: the task loss only).

    Example:
        >>> import torch
        >>> from hf_layercollapse import Distillation
        >>> objective = Distillation(temperature=2.0, top_k=2)
        >>> teacher, student = torch.tensor([[2.0, 1.0, -3.0]]), torch.tensor([[1.0, 1.0, 5.0]])
        >>> round(float(objective.kl(student, teacher)), 4), float(objective.kl(teacher, teacher))
        (0.1212, 0.0)
        >>> Distillation.from_string("self,temperature=2,top_k=50")
        Distillation(teacher=SelfTeacher(), temperature=2.0, top_k=50, task_weight=0.0)
    """

    teacher: Teacher | str = "copy"
    temperature: float = 1.0
    top_k: int | None = None
    task_weight: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.teacher, str):
            if self.teacher not in TEACHERS:
                raise ValueError(f"Distillation(teacher={self.teacher!r}): use one of {sorted(TEACHERS)}, or "
                                 "FrozenTeacher(model) for a model of your own.")
            self.teacher = TEACHERS[self.teacher]()
        if not isinstance(self.teacher, Teacher):
            raise TypeError(f"Distillation(teacher=...) takes 'copy', 'self' or a Teacher, got "
                            f"{type(self.teacher).__name__}; wrap a model in FrozenTeacher(model).")
        if not self.temperature > 0:
            raise ValueError(f"Distillation(temperature={self.temperature!r}) must be > 0.")
        if self.top_k is not None and not (isinstance(self.top_k, int) and self.top_k >= 1):
            raise ValueError(f"Distillation(top_k={self.top_k!r}) must be a positive integer, or None for the full "
                             "vocabulary.")
        if not 0.0 <= self.task_weight <= 1.0:
            raise ValueError(f"Distillation(task_weight={self.task_weight!r}) must lie in [0, 1].")

    @classmethod
    def from_string(cls, spec: str) -> Distillation:
        """From the command line's form: the teacher's name and/or ``key=value`` items, comma-separated
        (``"self,temperature=2,top_k=50,task_weight=0.5"``; ``""`` is the default)."""
        kwargs: dict = {}
        casts = {"temperature": float, "top_k": lambda v: None if v.lower() == "none" else int(v),
                 "task_weight": float, "teacher": str}
        for item in filter(None, (part.strip() for part in spec.split(","))):
            key, _, value = item.rpartition("=")
            key = key.strip() or "teacher"
            if key not in casts:
                raise ValueError(f"distillation={spec!r}: unknown setting {key!r}; use {sorted(casts)}.")
            try:
                kwargs[key] = casts[key](value.strip())
            except ValueError:
                raise ValueError(f"distillation={spec!r}: {key}={value!r} is not a valid value.") from None
        return cls(**kwargs)

    @property
    def kl_weight(self) -> float:
        return 1.0 - self.task_weight

    def kl(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        """``T²·KL(p_teacher ‖ p_student)`` at each position (the logits' last dimension is the vocabulary), in fp32."""
        student = student_logits.float() / self.temperature
        teacher = teacher_logits.float() / self.temperature
        if self.top_k is not None and self.top_k < teacher.shape[-1]:
            teacher, index = teacher.topk(self.top_k, dim=-1)
            student = student.gather(-1, index)
        log_t, log_s = teacher.log_softmax(-1), student.log_softmax(-1)
        return (log_t.exp() * (log_t - log_s)).sum(-1) * self.temperature ** 2

    def describe(self) -> dict:
        """The settings, as JSON (saved with checkpoints)."""
        return {**self.teacher.describe(), "temperature": self.temperature, "top_k": self.top_k,
                "task_weight": self.task_weight}


def fingerprint(module: nn.Module) -> list[float]:
    """Σ and Σ|·| over a module's floating-point tensors, in fp64: tells a resumed run's teacher from another."""
    tensors = [t for t in module.state_dict().values() if t.is_floating_point()]
    return [float(sum(t.double().sum() for t in tensors)), float(sum(t.double().abs().sum() for t in tensors))]
