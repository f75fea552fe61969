"""Exact merging of MLP blocks whose activation has become linear, and `collapse_model`."""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .activation import CollapsibleActivation
from .architectures import BlockKind, Layout, MLPBlock, projection_shape
from .injection import injected_activations
from .plan import get_plan, record_block, set_module
from .report import BlockReport, CollapseReport


def _as_linear(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weight as ``[out, in]`` and bias, in at least fp32, of an ``nn.Linear`` or ``Conv1D``."""
    dtype = torch.promote_types(module.weight.dtype, torch.float32)
    weight = module.weight.detach().to(dtype)
    weight = weight.t() if isinstance(module, Conv1D) else weight
    bias = None if module.bias is None else module.bias.detach().to(dtype)
    return weight, bias


def merge_projections(fc1: nn.Module, fc2: nn.Module,
                      line: tuple[torch.Tensor, torch.Tensor] | None = None) -> nn.Module:
    """The single projection equal to ``fc2(fc1(x))``: ``W = W2·W1``, ``b = W2·b1 + b2``; with
    ``line=(a, c)``, the one equal to ``fc2(a·fc1(x) + c)``: ``W = W2·diag(a)·W1``, ``b = W2·(a·b1 + c) + b2``.

    Computed in fp32 (or wider) and cast back to ``fc2``'s dtype; returns a ``Conv1D`` when ``fc2`` is one
    (GPT-2 family), else an ``nn.Linear``, with a bias when either projection has one.

    Example:
        >>> import torch
        >>> fc1, fc2 = torch.nn.Linear(4, 16), torch.nn.Linear(16, 3)
        >>> merged = merge_projections(fc1, fc2)
        >>> x = torch.randn(2, 4)
        >>> torch.allclose(merged(x), fc2(fc1(x)), atol=1e-6)
        True
    """
    w1, b1 = _as_linear(fc1)
    w2, b2 = _as_linear(fc2)
    if line is not None:
        slope, offset = (t.detach().to(w1.device, w1.dtype).reshape(-1) for t in line)
        if slope.numel() != w1.shape[0] or offset.numel() != w1.shape[0]:
            raise ValueError(f"The line has {slope.numel()} slopes and {offset.numel()} offsets but the block has "
                             f"{w1.shape[0]} channels.")
        w1, b1 = slope[:, None] * w1, offset + (slope * b1 if b1 is not None else 0)
    bias = None
    if b1 is not None or b2 is not None:
        bias = (w2 @ b1 if b1 is not None else 0) + (b2 if b2 is not None else 0)
    return projection_from(fc2, w2 @ w1, bias)


def merge_gated(up: nn.Module, down: nn.Module, constant: torch.Tensor, fused: bool = False) -> nn.Module:
    """The single projection equal to ``down(c * up(x))``: ``W = W_down·diag(c)·W_up``,
    ``b = W_down·(c*b_up) + b_down``.

    ``fused``: ``up`` is a fused ``gate_up_proj`` whose second half is the up projection (Phi-3).

    Example:
        >>> import torch
        >>> up, down, c = torch.nn.Linear(4, 16), torch.nn.Linear(16, 4), torch.randn(16)
        >>> x = torch.randn(2, 4)
        >>> torch.allclose(merge_gated(up, down, c)(x), down(c * up(x)), atol=1e-6)
        True
    """
    w_up, b_up = _as_linear(up)
    if fused:
        half = w_up.shape[0] // 2
        w_up, b_up = w_up[half:], None if b_up is None else b_up[half:]
    w_down, b_down = _as_linear(down)
    c = constant.detach().to(w_up.dtype).reshape(-1)
    if c.numel() != w_up.shape[0]:
        raise ValueError(f"The gate constant has {c.numel()} values but the block has {w_up.shape[0]} channels.")
    bias = None
    if b_up is not None or b_down is not None:
        bias = (w_down @ (c * b_up) if b_up is not None else 0) + (b_down if b_down is not None else 0)
    return projection_from(down, w_down @ (c[:, None] * w_up), bias)


def projection_from(like: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """A projection of ``like``'s family, dtype and device holding ``weight`` (``[out, in]``) and ``bias``."""
    merged = empty_projection(like, weight.shape[1], weight.shape[0], bias is not None)
    with torch.no_grad():
        merged.weight.copy_(weight.t() if isinstance(merged, Conv1D) else weight)
        if bias is not None:
            merged.bias.copy_(bias)
        elif merged.bias is not None:  # a Conv1D always has a bias: the map has none, so it is zero
            merged.bias.zero_()
    return merged


def empty_projection(like: nn.Module, in_features: int, out_features: int, bias: bool) -> nn.Module:
    """An uninitialised projection of the same family, dtype and device as ``like``. It is built on the meta device:
    no initialiser runs, so collapsing leaves the global random state (and a training run's dropout masks) alone."""
    with torch.device("meta"):
        if isinstance(like, Conv1D):
            module = Conv1D(out_features, in_features).to(dtype=like.weight.dtype)
        else:
            module = nn.Linear(in_features, out_features, bias=bias, dtype=like.weight.dtype)
    return module.to_empty(device=like.weight.device)


class ConstantGate(nn.Module):
    """Stands in for the activation of a collapsed gated block: the gate is constant, and its value lives in the
    merged projection, so this returns ones (``ones * up(x)`` leaves ``x`` to the merged projection)."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(hidden_states)


class DuplicateInput(nn.Module):
    """Stands in for the fused ``gate_up_proj`` of a collapsed gated block: ``[x, x]``, so that its two halves
    (gate and up) are both ``x``."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.cat([hidden_states, hidden_states], dim=-1)


def install_merged(owner: nn.Module, layout: Layout, merged: nn.Module) -> None:
    """Put ``merged`` in the output projection's place and make the input projection, the activation and the
    dropouts between them identities (the call sites stay as they are, so any architecture keeps working).

    Gated blocks: the up and gate projections become identities (a fused ``gate_up_proj`` duplicates its input)
    and the activation returns ones, so the call site's ``act(gate(x)) * up(x)`` hands ``x`` to ``merged``."""
    set_module(owner, layout.fc2, merged)
    replacements: dict[str, nn.Module] = {name: nn.Identity() for name in (layout.fc1, layout.act, *layout.dropouts)}
    if layout.kind is BlockKind.GATED:
        replacements[layout.act] = ConstantGate()
        if layout.gate == layout.fc1:
            replacements[layout.fc1] = DuplicateInput()
        else:
            replacements[layout.gate] = nn.Identity()
    for name, module in replacements.items():
        set_module(owner, name, module)
        parent = name.rpartition(".")[0]
        # transformers re-initialises modules on loading; a parent whose own _init_weights reads the removed
        # projections (T5's wi/wo) must be skipped: the merged weights come from the checkpoint.
        (owner.get_submodule(parent) if parent else owner)._is_hf_initialized = True


def block_costs(fc1: nn.Module, fc2: nn.Module, merged_bias: bool,
                gate: nn.Module | None = None) -> tuple[int, int, int, int]:
    """``(params_before, params_after, flops_before, flops_after)`` of a block (FLOPs per token); ``gate`` is the
    gate projection of a gated block (``None`` for plain blocks and for a fused ``gate_up_proj`` in ``fc1``)."""
    d_in, fc1_out = projection_shape(fc1)
    down_in, d_out = projection_shape(fc2)
    modules = [fc1, fc2] + ([gate] if gate is not None and gate is not fc1 else [])
    params_before = sum(p.numel() for m in modules for p in m.parameters(recurse=False))
    flops_before = 2 * (d_in * fc1_out + down_in * d_out)
    if gate is not None and gate is not fc1:
        flops_before += 2 * projection_shape(gate)[0] * projection_shape(gate)[1]
    params_after = d_in * d_out + (d_out if merged_bias else 0)
    return params_before, params_after, flops_before, 2 * d_in * d_out


def merge_block(owner: nn.Module, layout: Layout, gate_constant: torch.Tensor | None = None,
                line: tuple[torch.Tensor, torch.Tensor] | None = None,
                affine: tuple[torch.Tensor, torch.Tensor] | None = None) -> nn.Module:
    """The merged projection of a block whose activation is the identity or ``line`` (plain) or whose gate is
    ``gate_constant``; with ``affine=(weight, bias)``, of a block that is that map (``linear_target="affine"``)."""
    fc1, fc2 = owner.get_submodule(layout.fc1), owner.get_submodule(layout.fc2)
    if affine is not None:  # (weight, bias); a plan's map may come without a bias
        weight, bias = (None if t is None else t.detach().to(fc2.weight.device, torch.promote_types(t.dtype,
                                                                                                   torch.float32))
                        for t in affine)
        d_in, d_out = projection_shape(fc1)[0], projection_shape(fc2)[1]
        if tuple(weight.shape) != (d_out, d_in) or (bias is not None and tuple(bias.shape) != (d_out,)):
            raise ValueError(f"The affine map is {tuple(weight.shape)} (bias "
                             f"{None if bias is None else tuple(bias.shape)}) but the block maps {d_in} -> {d_out} "
                             "features.")
        return projection_from(fc2, weight, bias)
    if layout.kind is BlockKind.GATED:
        if gate_constant is None:
            raise ValueError("A gated block needs its gate constant to be merged.")
        return merge_gated(fc1, fc2, gate_constant, fused=layout.gate == layout.fc1)
    return merge_projections(fc1, fc2, line)


def block_gate(owner: nn.Module, layout: Layout) -> nn.Module | None:
    return owner.get_submodule(layout.gate) if layout.gate is not None else None


def merged_block_costs(owner: nn.Module, layout: Layout,
                       act: CollapsibleActivation | None = None) -> tuple[int, int, int, int]:
    """:func:`block_costs` of merging the block as :func:`collapse_model` does: the merged projection has a bias when
    a projection has one (a ``Conv1D`` always does) or the block's target brings one (a fitted line, an affine map)."""
    fc1, fc2 = owner.get_submodule(layout.fc1), owner.get_submodule(layout.fc2)
    has_bias = (fc1.bias is not None or fc2.bias is not None or isinstance(fc2, Conv1D)
                or (act is not None and (act.line is not None or act.affine is not None)))
    return block_costs(fc1, fc2, has_bias, block_gate(owner, layout))


def unselected_rows(model: nn.Module, blocks: list[MLPBlock]) -> list[BlockReport]:
    """Report rows of MLP blocks left as they are: ``"kept"`` (not selected), or ``"skipped"`` when merging would
    not save parameters; α where the block is injected."""
    injected = injected_activations(model)
    rows = []
    for block in blocks:
        owner = model.get_submodule(block.name) if block.name else model
        before, after, flops, _ = merged_block_costs(owner, block.layout, injected.get(block.name))
        saves = after < before
        status, reason = ("kept", "not selected") if saves else ("skipped", "merging would not save parameters")
        alpha = injected[block.name].alpha_value if block.name in injected else None
        rows.append(BlockReport(block.name, block.kind.value, alpha, status, reason, before, before, flops, flops))
    return rows


def in_model_order(model: nn.Module, rows: list[BlockReport]) -> list[BlockReport]:
    """``rows`` sorted by where their blocks sit in ``model``."""
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return sorted(rows, key=lambda row: order.get(row.name, -1))


def model_params(model: nn.Module) -> int:
    """Parameters of the model's own architecture: the α, gate constants and affine targets added by injection are
    not counted, so a report's savings compare with the original model."""
    added = {id(p) for m in model.modules() if isinstance(m, CollapsibleActivation)
             for p in m.parameters(recurse=False)}
    return sum(p.numel() for p in model.parameters() if id(p) not in added)


def collapse_model(
    model: nn.Module,
    blocks: list[str] | None = None,
    threshold: float | None = None,
    force: bool = False,
    plan=None,
) -> CollapseReport:
    """Merge, in place, every injected MLP block whose α is within ``threshold`` of 1 into one projection.

    With ``plan`` (a :class:`~hf_layercollapse.CollapsePlan` from :func:`~hf_layercollapse.plan_collapse`), merge
    the plan's blocks instead, each with the merge the planner chose (least squares or exact), no α needed.

    Args:
        model: A model prepared with :func:`~hf_layercollapse.get_collapse_model` (and usually fine-tuned).
        blocks: Names of blocks to collapse (full names, or suffixes such as ``"layer.11"``). ``None``: every
            injected block within the threshold; the others are kept and reported. Naming a block whose α is
            farther than ``threshold`` from 1 is an error unless ``force=True``.
        threshold: τ; default: the ``threshold`` of the config used at injection (0.05).
        force: Merge the named blocks even when α is far from 1 (the merged block then computes the block with
            its activation replaced by the linear target: ``W2·W1·x + b``, or with a fitted line
            ``W2·diag(a)·W1·x + b``, or the constant gate, or it is the affine target; the non-linear part is
            dropped).
        plan: A collapse plan (see above); ``blocks``, ``threshold`` and ``force`` must then be left unset.

    Returns:
        A :class:`~hf_layercollapse.CollapseReport` with α, parameters and FLOPs per block.

    Example:
        >>> import torch
        >>> from transformers import BertConfig, BertModel
        >>> import hf_layercollapse as hlc
        >>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        ...                              intermediate_size=64)).eval()
        >>> model = hlc.get_collapse_model(model)
        >>> for act in hlc.injected_activations(model).values():
        ...     _ = act.alpha.data.fill_(1.0)
        >>> report = hlc.collapse_model(model)
        >>> len(report.collapsed), report.params_saved
        (2, 6272)
    """
    if plan is not None:
        if blocks is not None or threshold is not None or force:
            raise ValueError("collapse_model(plan=...) takes its blocks from the plan: leave blocks, threshold and "
                             "force unset.")
        from .planner import apply_collapse_plan

        return apply_collapse_plan(model, plan)
    injected = injected_activations(model)
    if not injected:
        raise ValueError(
            f"{type(model).__name__} has no collapsible activations: call get_collapse_model(model, config) "
            "and fine-tune it first (or use plan_collapse for collapsing without training)."
        )
    if threshold is None:
        threshold = float((get_plan(model) or {}).get("config", {}).get("threshold", 0.05))
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold={threshold!r} must lie in [0, 1].")
    names = list(injected)
    if blocks is not None:
        names = _resolve(blocks, names)
        far = {n: injected[n].alpha_value for n in names if abs(1 - injected[n].alpha_value) > threshold}
        if far and not force:
            details = ", ".join(f"{n} (α={a:.4f})" for n, a in far.items())
            raise ValueError(
                f"Blocks {details} have α farther than threshold={threshold} from 1: merging them would drop "
                "their non-linear part. Train longer (or raise reg_weight), or pass force=True."
            )
    check_no_unmerged_adapters(model, [(n, injected[n].layout) for n in names
                                       if force or abs(1.0 - injected[n].alpha_value) <= threshold])
    report = CollapseReport(model_params_before=model_params(model), threshold=threshold)
    for name in injected:
        report.blocks.append(_collapse_block(model, name, injected[name], name in names, threshold, force))
    report.model_params_after = model_params(model)
    return report


def check_no_unmerged_adapters(model: nn.Module, blocks: list[tuple[str, Layout]]) -> None:
    """Refuse to merge blocks whose modules are PEFT adapter layers (LoRA on fc1/fc2, a LayerCollapse adapter on the
    activation): merging would drop the adapters silently. They have to be merged into the weights first."""
    for name, layout in blocks:
        owner = model.get_submodule(name) if name else model
        wrapped = [part for part in (layout.fc1, layout.act, layout.fc2)
                   if hasattr(owner.get_submodule(part), "base_layer")]
        if wrapped:
            raise ValueError(
                f"Block {name!r}: {wrapped} are wrapped by PEFT adapter layers that are not merged (LoRA, or a "
                "LayerCollapse adapter); collapsing now would drop the adapters. Merge first, collapse then: "
                "`model = hf_layercollapse.merge_lora_and_collapse(peft_model)` (or `peft_model.merge_and_unload()`, "
                "which collapses LayerCollapse adapters too; for a LoRA-only PeftModel, collapse_model after it)."
            )


def _resolve(blocks: list[str], names: list[str]) -> list[str]:
    resolved = []
    for wanted in blocks:
        matches = [n for n in names if n == wanted or n.endswith("." + wanted)]
        if len(matches) != 1:
            problem = "matches no injected block" if not matches else f"is ambiguous ({matches})"
            raise ValueError(f"Block {wanted!r} {problem}; injected blocks are {names}.")
        resolved.append(matches[0])
    return resolved


def _collapse_block(
    model: nn.Module, name: str, act: CollapsibleActivation, selected: bool, threshold: float, force: bool
) -> BlockReport:
    layout = act.layout
    owner = model.get_submodule(name) if name else model
    params_before, params_after, flops_before, flops_after = merged_block_costs(owner, layout, act)
    alpha = act.alpha_value
    row = BlockReport(name, layout.kind.value, alpha, "kept", "", params_before, params_before, flops_before,
                      flops_before)
    if not selected:
        row.reason = "not selected"
    elif abs(1.0 - alpha) > threshold and not force:
        row.reason = f"|1-α| = {abs(1 - alpha):.4f} > {threshold}"
    elif params_after >= params_before:
        row.status, row.reason = "skipped", "merging would not save parameters"
    else:
        merged = merge_block(owner, layout, act.gate_constant, act.line, act.affine)
        install_merged(owner, layout, merged)
        d_in, d_out = projection_shape(merged)
        record_block(model, name, layout, "collapsed", alpha=alpha, in_features=d_in, out_features=d_out,
                     bias=merged.bias is not None, projection=type(merged).__name__)
        row.status, row.params_after, row.flops_after = "collapsed", params_after, flops_after
    return row


