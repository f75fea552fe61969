"""`plan_collapse`: compression without fine-tuning, chosen and merged on calibration data.

The planner finds the model's candidate units — MLP blocks, and for decoder LLMs single decoder layers and spans of
consecutive layers — fits each one's best linear replacement on part of the calibration data, measures on the rest
what replacing it costs, and picks units for a budget. How it measures is a search strategy: :class:`MeasuredSearch`
(every candidate merge of every MLP block measured with the real objective; the default for MLP blocks alone) or
:class:`OnePassSearch` (one streamed pass for every unit kind at once, costs in closed form, a few selections
verified with the real objective; the default when layers or spans are allowed). The objective is the task loss when
the batches carry ``labels``, the language-modelling loss for causal LMs, and otherwise the divergence from the
original outputs. :meth:`CollapsePlan.apply` (or ``collapse_model(model, plan=plan)``) applies the plan.

Modules: ``plan`` (the plan, saved and applied), ``objective``, ``measured`` and ``decoder`` (the two searches),
``budget``.
"""

from __future__ import annotations

import logging

from torch import nn

from ..calibration import calibration_batches
from ..units import check_not_moe
from .budget import Budget
from .decoder import KINDS, OnePassSearch
from .measured import MeasuredSearch
from .objective import Objective
from .plan import METHODS, PLAN_FILE, WEIGHTS_FILE, CollapsePlan, PlannedBlock, fingerprint

__all__ = ["KINDS", "METHODS", "PLAN_FILE", "WEIGHTS_FILE", "Budget", "CollapsePlan", "MeasuredSearch", "Objective",
           "OnePassSearch", "PlannedBlock", "fingerprint", "plan_collapse"]

logger = logging.getLogger(__name__)


def _units(units: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    names = tuple(u.strip() for u in (units.split(",") if isinstance(units, str) else units) if u.strip())
    unknown = sorted(set(names) - set(KINDS))
    if unknown or not names:
        raise ValueError(f"units={units!r}: give one or more of {list(KINDS)} (e.g. 'mlp,layer,span').")
    return names


def plan_collapse(
    model: nn.Module,
    calibration_data,
    *,
    num_blocks: int | None = None,
    params_fraction: float | None = None,
    num_params: int | None = None,
    max_loss_increase: float | None = None,
    units: str | tuple[str, ...] = "mlp",
    search: MeasuredSearch | OnePassSearch | None = None,
    batch_size: int = 8,
    holdout: float = 0.5,
    ridge: float = 1e-4,
    show_progress: bool = True,
) -> CollapsePlan:
    """Measure what replacing each unit by a linear map costs on calibration data and pick units for a budget.

    Give exactly one budget: ``num_blocks`` (the k cheapest MLP blocks), ``params_fraction`` (remove at least this
    fraction of the model's parameters), ``num_params`` (at least this many) or ``max_loss_increase`` (add MLP blocks
    cheapest first while the measured increase of the objective stays within it).

    Args:
        model: Any model the core supports; spans of layers need a decoder-only LLM.
        calibration_data: A ``datasets.Dataset`` of model inputs (fixed length), a ``DataLoader`` or batches.
        units: The kinds of unit to consider: ``"mlp"`` (MLP blocks), ``"layer"`` (a decoder layer replaced by a map
            fused into the layer before it, or cut), ``"span"`` (several consecutive layers, likewise); a tuple or a
            comma-separated string. A plan of layers and spans alone gives a stock checkpoint (fewer layers) that
            loads without this library.
        search: How candidates are measured (:class:`MeasuredSearch`, :class:`OnePassSearch`); default: measured for
            ``units="mlp"``, one pass otherwise.
        batch_size: Batch size when ``calibration_data`` is a dataset.
        holdout: Fraction of the batches used to measure costs; the rest fits the maps.
        ridge: The measured search's ridge (the one-pass search chooses each unit's on held-out tokens).

    Example:
        >>> import torch
        >>> from transformers import BertConfig, BertModel
        >>> import hf_layercollapse as hlc
        >>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
        ...                              intermediate_size=64, vocab_size=50)).eval()
        >>> batches = [{"input_ids": torch.randint(1, 50, (4, 12))} for _ in range(4)]
        >>> plan = hlc.plan_collapse(model, batches, num_blocks=2, show_progress=False)
        >>> len(plan.selected), len(hlc.collapse_model(model, plan=plan).collapsed)
        (2, 2)
    """
    units = _units(units)
    budgets = {k: v for k, v in dict(num_blocks=num_blocks, params_fraction=params_fraction, num_params=num_params,
                                     max_loss_increase=max_loss_increase).items() if v is not None}
    if len(budgets) != 1:
        raise ValueError("Give exactly one budget: num_blocks, params_fraction, num_params or max_loss_increase.")
    if params_fraction is not None and not (isinstance(params_fraction, (int, float)) and 0 < params_fraction < 1):
        raise ValueError(f"params_fraction={params_fraction!r} must lie in (0, 1).")
    if num_params is not None and not (isinstance(num_params, int) and num_params > 0):
        raise ValueError(f"num_params={num_params!r} must be a positive number of parameters.")
    if not 0 < holdout < 1:
        raise ValueError(f"holdout={holdout!r} must lie in (0, 1).")
    params_total = sum(p.numel() for p in model.parameters())
    (given, value), = budgets.items()
    params = num_params if num_params is not None else (
        round(params_fraction * params_total) if params_fraction is not None else None)
    budget = Budget(num_blocks=num_blocks, params=params, max_loss_increase=max_loss_increase,
                    given=f"{given}={value}")
    if search is None:
        search = MeasuredSearch(ridge) if units == ("mlp",) else OnePassSearch()
    batches = calibration_batches(calibration_data, model, batch_size)
    labelled = sum("labels" in b for b in batches)
    if 0 < labelled < len(batches):
        raise ValueError(f"{labelled} of the {len(batches)} calibration batches have labels: give labels in every "
                         "batch (the task loss is measured) or in none (the language-modelling loss, or the change "
                         "of the outputs).")
    split = max(1, min(len(batches) - 1, round(len(batches) * (1 - holdout)))) if len(batches) > 1 else 1
    fit_batches, eval_batches = batches[:split], (batches[split:] or batches)
    if len(batches) == 1:
        logger.warning("plan_collapse: one calibration batch, so the maps are fitted and their costs measured on the "
                       "same data, which makes the costs look smaller than they are: give at least 2 batches.")
    check_not_moe(model)
    was_training = model.training
    model.eval()
    try:
        return search.plan(model, fit_batches, eval_batches, budget, units, show_progress)
    finally:
        model.train(was_training)
