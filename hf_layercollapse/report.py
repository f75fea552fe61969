"""`CollapseReport`: what `collapse_model` merged, kept or skipped, and what it saved."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class BlockReport:
    """One MLP block in a :class:`CollapseReport`.

    ``status`` is ``"collapsed"``, ``"kept"`` (α too far from 1, or the block was not selected) or ``"skipped"``
    (merging would not save parameters); ``reason`` says why, or, for a block the planner merged, its method. FLOPs are
    multiply-adds × 2 per token of the block's projections.
    """

    name: str
    kind: str
    alpha: float | None
    status: str
    reason: str
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int


@dataclass
class CollapseReport:
    """The result of :func:`hf_layercollapse.collapse_model`.

    Example:
        >>> report = CollapseReport(model_params_before=10, model_params_after=7)
        >>> report.to_dict()["params_saved"]
        3
    """

    blocks: list[BlockReport] = field(default_factory=list)
    model_params_before: int = 0
    model_params_after: int = 0
    threshold: float | None = None
    #: what a reader should know besides the table (a plan that cut decoder layers: whether the result is stock)
    notes: list[str] = field(default_factory=list)

    @property
    def collapsed(self) -> list[BlockReport]:
        return [b for b in self.blocks if b.status == "collapsed"]

    @property
    def params_saved(self) -> int:
        return self.model_params_before - self.model_params_after

    @property
    def flops_before(self) -> int:
        return sum(b.flops_before for b in self.collapsed)

    @property
    def flops_after(self) -> int:
        return sum(b.flops_after for b in self.collapsed)

    def to_dict(self) -> dict:
        """A JSON-serialisable dict (for model cards and result files)."""
        return {
            "blocks": [asdict(b) for b in self.blocks],
            "threshold": self.threshold,
            "num_collapsed": len(self.collapsed),
            "model_params_before": self.model_params_before,
            "model_params_after": self.model_params_after,
            "params_saved": self.params_saved,
            "params_saved_fraction": self.params_saved / self.model_params_before if self.model_params_before else 0.0,
            "collapsed_flops_per_token_before": self.flops_before,
            "collapsed_flops_per_token_after": self.flops_after,
            **({"notes": list(self.notes)} if self.notes else {}),
        }

    def __str__(self) -> str:
        header = ("block", "kind", "alpha", "status", "params before -> after", "FLOPs/token before -> after")
        rows = [header]
        for b in self.blocks:
            alpha = "-" if b.alpha is None else f"{b.alpha:.4f}"
            status = b.status if not b.reason else f"{b.status} ({b.reason})"
            rows.append((b.name, b.kind, alpha, status, f"{b.params_before:,} -> {b.params_after:,}",
                         f"{b.flops_before:,} -> {b.flops_after:,}"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        before, after = self.model_params_before, self.model_params_after
        fraction = f" ({100 * self.params_saved / before:.2f}%)" if before else ""
        lines.append(
            f"collapsed {len(self.collapsed)} of {len(self.blocks)} blocks; model parameters {before:,} -> "
            f"{after:,}, saved {self.params_saved:,}{fraction}"
        )
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)
