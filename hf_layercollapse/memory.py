"""What the method adds to a model's memory, before anything is injected: :func:`estimate_memory`.

LayerCollapse adds, per selected unit, one α and its linear target's tensors (nothing for the default targets of a
plain block, a constant per channel for a gated block, a full ``d_out × d_in`` map for ``linear_target="affine"``:
Llama-3-8B's 32 blocks take 537M parameters that way; with ``affine_rank=r`` that map is a fixed buffer and only a
rank-r correction trains), their gradients and optimizer states when they train, and,
while targets are fitted, the fp64 calibration statistics of one pass (passes are grouped to stay under a memory
budget, so the peak is the largest group's). The numbers are exact counts of the tensors the library will allocate;
activations and the base model's own training memory are not included.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .calibration import STATISTICS_MEMORY, _merged_requests, statistics_passes
from .config import CollapseConfig
from .inject import selected_units
from .targets import target_for


@dataclass
class UnitMemory:
    """One unit's additions: tensors added (α and the target's), of which trainable, and fp64 statistics values."""

    name: str
    added: int
    trainable: int
    statistics: int


@dataclass
class MemoryEstimate:
    """The memory LayerCollapse adds to a model for a config (see the module docstring); sizes in bytes.

    ``optimizer_states`` is the number of fp-sized states the optimizer keeps per trainable value (AdamW: 2).
    """

    dtype: torch.dtype
    optimizer_states: int
    units: list[UnitMemory] = field(default_factory=list)
    statistics_bytes: int = 0

    @property
    def added_parameters(self) -> int:
        return sum(u.added for u in self.units)

    @property
    def trainable_parameters(self) -> int:
        return sum(u.trainable for u in self.units)

    @property
    def parameter_bytes(self) -> int:
        return self.added_parameters * _itemsize(self.dtype)

    @property
    def gradient_bytes(self) -> int:
        return self.trainable_parameters * _itemsize(self.dtype)

    @property
    def optimizer_bytes(self) -> int:
        return self.optimizer_states * self.trainable_parameters * _itemsize(self.dtype)

    @property
    def training_bytes(self) -> int:
        """Parameters, gradients and optimizer states added during training."""
        return self.parameter_bytes + self.gradient_bytes + self.optimizer_bytes

    def to_dict(self) -> dict[str, int | str]:
        return {"units": len(self.units), "dtype": str(self.dtype).replace("torch.", ""),
                "added_parameters": self.added_parameters, "trainable_parameters": self.trainable_parameters,
                "parameter_bytes": self.parameter_bytes, "gradient_bytes": self.gradient_bytes,
                "optimizer_bytes": self.optimizer_bytes, "training_bytes": self.training_bytes,
                "statistics_bytes": self.statistics_bytes}

    def __str__(self) -> str:
        rows = [("units", f"{len(self.units)}"),
                ("added parameters", f"{self.added_parameters:,} ({self.trainable_parameters:,} trainable)"),
                ("parameters", _size(self.parameter_bytes)), ("gradients", _size(self.gradient_bytes)),
                (f"optimizer states (×{self.optimizer_states})", _size(self.optimizer_bytes)),
                ("training total", _size(self.training_bytes)),
                ("calibration statistics (peak of one pass)", _size(self.statistics_bytes))]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def estimate_memory(model: nn.Module, config: CollapseConfig | None = None, optimizer_states: int = 2,
                    statistics_memory: int = STATISTICS_MEMORY) -> MemoryEstimate:
    """The memory that ``get_collapse_model(model, config)`` and training it add (the model is not changed).

    Args:
        model: The model to be injected.
        config: The :class:`~hf_layercollapse.LayerCollapseConfig` to be used (default: the default config).
        optimizer_states: Per-value states the optimizer keeps for trainable tensors (AdamW 2, SGD with momentum 1).
        statistics_memory: The budget calibration passes are grouped under (the library's default).

    Example:
        >>> import torch
        >>> from transformers import BertConfig, BertModel
        >>> import hf_layercollapse as hlc
        >>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        ...                              intermediate_size=64))
        >>> estimate = hlc.estimate_memory(model, hlc.LayerCollapseConfig(linear_target="affine"))
        >>> estimate.added_parameters  # per block: α and a 32 × 32 map with its bias
        2114
        >>> estimate.optimizer_bytes  # AdamW: two fp32 states per trainable value
        16912
    """
    config = config if config is not None else CollapseConfig()
    units, _ = selected_units(model, config)
    weight = next(model.parameters())
    dtype = weight.dtype if weight.is_floating_point() else torch.float32
    estimate = MemoryEstimate(dtype, optimizer_states)
    requests = {}
    for unit in units:
        target = target_for(unit.layout, config.linear_target, config.activation, config.affine_rank)
        owner = unit.owner(model)
        shapes = target.shapes(unit.layout, owner)
        added = sum(_numel(shape) for shape in shapes.values())
        trainable = sum(_numel(shapes[name]) for name in target.trainable_names)
        wanted = target.requests(unit.layout)
        if wanted:
            requests[unit] = wanted
        dims = unit.layout.dims(owner)
        values = sum(r.values(dims) for r in _merged_requests(wanted)) if wanted else 0
        estimate.units.append(UnitMemory(unit.name, added + 1, 1 + trainable, values))
    if requests:
        by_name = {u.name: u for u in estimate.units}
        estimate.statistics_bytes = 8 * max(sum(by_name[u.name].statistics for u in group)
                                            for group in statistics_passes(model, requests, statistics_memory))
    return estimate


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for n in shape:
        count *= n
    return count


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"
