"""Streaming fp64 statistics of a unit's activations, the sufficient statistics of every linear target's fit.

Each accumulator reads some of a unit's *taps* — ``x`` (the unit's input), ``z`` (the activation's input), ``g`` (the
activation's output), ``u`` (a gated block's up projection) and ``y`` (the unit's output) — token by token, padding
left out, and keeps only sums whose size does not grow with the number of calibration tokens. A target asks for its
statistics with a *request* (a small frozen dataclass); requests are what calibration deduplicates and budgets.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch


class Dims(NamedTuple):
    """Feature sizes of a unit's taps: ``x`` has ``d_in``, ``z``/``g``/``u`` have ``channels``, ``y`` has ``d_out``."""

    d_in: int
    channels: int
    d_out: int


def _tokens(mask: torch.Tensor | None, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """``tensors`` as fp64 ``[tokens, features]`` matrices, padding tokens (``mask == 0``) left out."""
    flat = [t.reshape(-1, t.shape[-1]).to(torch.float64) for t in tensors]
    if mask is not None and mask.numel() == flat[0].shape[0]:
        keep = mask.reshape(-1).bool()
        flat = [t[keep] for t in flat]
    return flat


def _relative_weights(y: torch.Tensor) -> torch.Tensor:
    """``1 / mean(yₜ²)`` per token, as a column: each token's error counts relative to the size of its output."""
    return 1.0 / y.pow(2).mean(1, keepdim=True).clamp(min=1e-12)


class Statistics(ABC):
    """An accumulator over calibration tokens."""

    #: The taps ``update`` reads, by name.
    taps: ClassVar[tuple[str, ...]]
    count: int

    @abstractmethod
    def update(self, mask: torch.Tensor | None, **taps: torch.Tensor) -> None:
        """Add one batch (``mask``: the batch's padding mask, or ``None``)."""

    def _check(self) -> None:
        if self.count == 0:
            raise ValueError("No calibration tokens reached this unit.")


class LeastSquaresStats(Statistics):
    """Sums ``XᵀWX`` and ``XᵀWY`` of a unit's inputs ``X`` (with a column of ones) and outputs ``Y``.

    ``relative=False``: every token weighs the same (W = I). ``relative=True``: a token weighs ``1/mean(yₜ²)``, so
    each token's error counts relative to the size of its output and the few tokens with huge activations (the
    first position of a sequence in most LLMs) do not decide the fit; on the real SmolLM2-135M the plain fit was
    catastrophic on blocks 11 and 28 (held-out perplexity 45 → 319 and 396), the relative one was not (124, 50).

    Example:
        >>> import torch
        >>> stats = LeastSquaresStats(3, 2, torch.device("cpu"))
        >>> x = torch.randn(50, 3); w = torch.randn(2, 3)
        >>> stats.update(None, x=x, y=x @ w.T + 1.0)
        >>> weight, bias = stats.solve(ridge=0.0)
        >>> torch.allclose(weight, w.double(), atol=1e-8), torch.allclose(bias, torch.ones(2, dtype=torch.float64))
        (True, True)
    """

    taps = ("x", "y")

    def __init__(self, d_in: int, d_out: int, device: torch.device, relative: bool = False) -> None:
        self.gram = torch.zeros(d_in + 1, d_in + 1, dtype=torch.float64, device=device)
        self.cross = torch.zeros(d_in + 1, d_out, dtype=torch.float64, device=device)
        self.count = 0
        self.relative = relative

    def update(self, mask: torch.Tensor | None, **taps: torch.Tensor) -> None:
        x, y = _tokens(mask, taps["x"], taps["y"])
        x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)], dim=1)
        weighted = x * _relative_weights(y) if self.relative else x
        self.gram += weighted.T @ x
        self.cross += weighted.T @ y
        self.count += x.shape[0]

    def solve(self, ridge: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
        """``(weight [out, in], bias [out])`` minimising ``‖XWᵀ + b − Y‖²`` (weighted when relative)
        ``+ ridge·mean(diag XᵀX)·‖W‖²``."""
        self._check()
        d = self.gram.shape[0] - 1
        scale = self.gram.diagonal()[:d].mean().clamp(min=1e-12)
        regulariser = torch.zeros_like(self.gram)
        regulariser.diagonal()[:d] = ridge * scale
        solution = torch.linalg.solve(self.gram + regulariser, self.cross)  # [(d+1), out]
        return solution[:d].T.contiguous(), solution[d].contiguous()


class GateStats(Statistics):
    """Sums over a gated block's tokens of its gate activations ``g = act(gate(x))``, up projections ``u = up(x)``
    and outputs ``y``: ``Σ g`` and, with ``fit=True``, ``Σ wₜ uuᵀ`` and ``Σ wₜ u(g⊙u)ᵀ`` with ``wₜ = 1/mean(yₜ²)``.
    Enough for the two constant gates ``c`` that make the block ``down(c ⊙ up(x))`` a single linear map: the mean
    of ``g`` (:meth:`mean`), and the ``c`` whose block output is closest to the original in relative squared error
    (:meth:`fit`)."""

    taps = ("g", "u", "y")

    def __init__(self, channels: int, device: torch.device, fit: bool = True) -> None:
        self.gate_sum = torch.zeros(channels, dtype=torch.float64, device=device)
        # the sums for :meth:`fit` (channels² each): only when asked for
        self.up_gram = torch.zeros(channels, channels, dtype=torch.float64, device=device) if fit else None
        self.up_cross = torch.zeros(channels, channels, dtype=torch.float64, device=device) if fit else None
        self.count = 0

    def update(self, mask: torch.Tensor | None, **taps: torch.Tensor) -> None:
        g, u, y = _tokens(mask, taps["g"], taps["u"], taps["y"])
        self.gate_sum += g.sum(0)
        self.count += g.shape[0]
        if self.up_gram is not None:
            weighted = u * _relative_weights(y)
            self.up_gram += weighted.T @ u
            self.up_cross += weighted.T @ (g * u)

    def mean(self) -> torch.Tensor:
        """Per-channel mean of ``act(gate(x))``."""
        self._check()
        return self.gate_sum / self.count

    def fit(self, down_weight: torch.Tensor, ridge: float = 1e-4) -> torch.Tensor:
        """The ``c`` minimising ``Σₜ ‖W_down·(c ⊙ uₜ) − W_down·(gₜ ⊙ uₜ)‖² / mean(yₜ²) + ridge·mean(diag G)·‖c‖²``.

        The output is linear in ``c``, so the normal equations are ``G c = r`` with the Hadamard products
        ``G = (W_downᵀW_down) ∘ Σ wuuᵀ`` and ``r = rowsum((W_downᵀW_down) ∘ Σ wu(g⊙u)ᵀ)``: one unknown per
        intermediate channel, and ``g``'s correlation with ``u``, which the mean ignores, is used. Measured on the
        real SmolLM2-135M, the plain squared-error fit was catastrophic on some blocks (block 11 alone: held-out
        perplexity 45 → 410,000; relative: 150; the mean: 162).
        """
        self._check()
        if self.up_gram is None:
            raise ValueError("These gate statistics were collected without the sums for the fit (fit=False).")
        w = down_weight.detach().to(self.up_gram.device, torch.float64)
        products = w.T @ w
        gram = products * self.up_gram
        rhs = products.mul_(self.up_cross).sum(1)  # in place: one channels² temporary fewer
        gram.diagonal().add_(ridge * gram.diagonal().mean().clamp(min=1e-12))
        return torch.linalg.solve(gram, rhs)


class LineStats(Statistics):
    """Per-channel sums of a plain block's activation inputs ``z`` and outputs ``g = act(z)``: enough for the
    least-squares line ``act(z) ≈ a·z + b`` of every intermediate channel (:meth:`solve`)."""

    taps = ("z", "g")

    def __init__(self, channels: int, device: torch.device) -> None:
        self.sums = torch.zeros(5, channels, dtype=torch.float64, device=device)  # Σz, Σg, Σz², Σz·g, count
        self.count = 0

    def update(self, mask: torch.Tensor | None, **taps: torch.Tensor) -> None:
        z, g = _tokens(mask, taps["z"], taps["g"])
        count = torch.full((z.shape[1],), float(z.shape[0]), dtype=z.dtype, device=z.device)
        self.sums += torch.stack([z.sum(0), g.sum(0), (z * z).sum(0), (z * g).sum(0), count])
        self.count += z.shape[0]

    def solve(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(slope, offset)`` per channel; a channel whose input never varied gets slope 0 and its mean output."""
        self._check()
        z, g, zz, zg, count = self.sums
        mean_z, mean_g = z / count, g / count
        variance = zz / count - mean_z**2
        slope = torch.where(variance > 1e-12, (zg / count - mean_z * mean_g) / variance.clamp(min=1e-12), 0.0)
        return slope, mean_g - slope * mean_z


class ResidualFitStats:
    """Sums for fitting ``n_targets`` maps ``Y_k ≈ X·A_k`` (``bias``: plus a constant) that share their input ``X``,
    each token weighted by ``wₜ`` (the decoder planner: ``1/‖hₜ‖²``, the residual stream's size at the unit, so that
    an error counts relative to the hidden state it perturbs): ``XᵀWX``, ``XᵀWY_k``, ``Σ wₜ‖y_{k,t}‖²``. A fit with
    any ridge and prior (:meth:`solve`) and the weighted error of any map (:meth:`error`) follow from the sums alone,
    so the error of a map fitted on one set of tokens can be measured on another set's sums without the tokens.

    Example:
        >>> import torch
        >>> fit, held = ResidualFitStats(3, 2, 1, torch.device("cpu")), ResidualFitStats(3, 2, 1, torch.device("cpu"))
        >>> a = torch.randn(3, 2, dtype=torch.float64)
        >>> for stats in (fit, held):
        ...     x = torch.randn(40, 3)
        ...     stats.update(x, [x.double() @ a], torch.ones(40))
        >>> solution = fit.solve(0, ridge=0.0)  # the products are taken in fp32: equal to about 1e-6
        >>> torch.allclose(solution, a, atol=1e-5), held.error(0, solution) < 1e-5 * held.energy_of(0)
        (True, True)
    """

    def __init__(self, d_in: int, d_out: int, n_targets: int, device: torch.device, bias: bool = False) -> None:
        size = d_in + int(bias)
        self.bias = bias
        self.gram = torch.zeros(size, size, dtype=torch.float64, device=device)
        self.cross = torch.zeros(n_targets, size, d_out, dtype=torch.float64, device=device)
        self.energy = torch.zeros(n_targets, dtype=torch.float64, device=device)
        self.weight = 0.0
        self.count = 0

    def _design(self, x: torch.Tensor) -> torch.Tensor:
        if not self.bias:
            return x
        return torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)], dim=1)

    def update(self, x: torch.Tensor, targets: list[torch.Tensor], weight: torch.Tensor) -> None:
        """Add tokens: ``x`` ``[t, d_in]``, one ``[t, d_out]`` tensor per target, ``weight`` ``[t]`` (padding already
        left out). Products are taken in fp32 and summed in fp64."""
        design = self._design(x.float())
        weighted = design * weight.float()[:, None]
        self.gram += (weighted.T @ design).double()
        for k, y in enumerate(targets):
            y = y.float()
            self.cross[k] += (weighted.T @ y).double()
            self.energy[k] += float((weight.float() * y.pow(2).sum(1)).sum())
        self.weight += float(weight.sum())
        self.count += x.shape[0]

    def merge(self, other: ResidualFitStats) -> ResidualFitStats:
        """The sums of both sets of tokens."""
        merged = ResidualFitStats.__new__(ResidualFitStats)
        merged.bias = self.bias
        merged.gram, merged.cross, merged.energy = (self.gram + other.gram, self.cross + other.cross,
                                                    self.energy + other.energy)
        merged.weight, merged.count = self.weight + other.weight, self.count + other.count
        return merged

    def solve(self, target: int, ridge: float, prior: torch.Tensor | None = None) -> torch.Tensor:
        """``A`` (``[d_in (+1), d_out]``, the bias as the last row) minimising ``Σ wₜ‖xₜA − y_{k,t}‖² +
        ridge·mean(diag XᵀWX)·‖A − prior‖²`` (``prior``: zero by default; the bias row is not pulled)."""
        if self.count == 0:
            raise ValueError("No calibration tokens reached this unit.")
        size = self.gram.shape[0] - int(self.bias)
        scale = ridge * float(self.gram.diagonal()[:size].mean().clamp(min=1e-30))
        lhs = self.gram.clone()
        lhs.diagonal()[:size] += scale
        rhs = self.cross[target].clone()
        if prior is not None and scale:
            rhs[:size] += scale * prior.to(rhs)[:size]
        return torch.linalg.solve(lhs, rhs)

    def ridge_path(self, target: int, ridges: list[float], prior: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The solutions of :meth:`solve` for several ridges at the cost of one eigendecomposition (here the bias row,
        when there is one, is pulled towards the prior like the weights)."""
        if self.count == 0:
            raise ValueError("No calibration tokens reached this unit.")
        values, vectors = self._eigh()
        scale = float(values.mean().clamp(min=1e-30))
        rhs = self.cross[target]
        prior = torch.zeros_like(rhs) if prior is None else prior.to(rhs)
        solutions = []
        for ridge in ridges:
            shift = ridge * scale
            projected = vectors.T @ (rhs + shift * prior)
            solutions.append(vectors @ (projected / (values + shift).clamp(min=1e-30)[:, None]))
        return solutions

    def _eigh(self) -> tuple[torch.Tensor, torch.Tensor]:
        cached = getattr(self, "_eigen", None)
        if cached is None or cached[0] != self.count:
            values, vectors = torch.linalg.eigh(self.gram)
            self._eigen = cached = (self.count, values.clamp(min=0.0), vectors)
        return cached[1], cached[2]

    def error(self, target: int, solution: torch.Tensor) -> float:
        """``Σ wₜ‖xₜA − y_{k,t}‖² / tokens`` of the map ``A`` on these sums (a mean relative squared error when
        ``wₜ = 1/‖hₜ‖²``)."""
        a = solution.to(self.gram)
        value = float((self.gram @ a * a).sum() - 2 * (self.cross[target] * a).sum() + self.energy[target])
        return max(value, 0.0) / max(self.count, 1)

    def energy_of(self, target: int) -> float:
        """``Σ wₜ‖y_{k,t}‖² / tokens``: the error of the zero map."""
        return float(self.energy[target]) / max(self.count, 1)


# ------------------------------------------------------------------------------------------------------ requests


class Request(ABC):
    """What a target needs gathered for a unit: builds the accumulator and states its size."""

    @abstractmethod
    def make(self, dims: Dims, device: torch.device) -> Statistics:
        """A fresh accumulator for a unit of these dims."""

    @abstractmethod
    def values(self, dims: Dims) -> int:
        """fp64 values the accumulator holds (its memory is 8 bytes each)."""

    def served_by(self, other: Request) -> bool:
        """Whether the accumulator of ``other`` answers this request too (one pass gathers it once)."""
        return other == self


@dataclass(frozen=True)
class LeastSquaresRequest(Request):
    """The affine map of the unit's input closest to its output (:class:`LeastSquaresStats`)."""

    relative: bool = True

    def make(self, dims: Dims, device: torch.device) -> LeastSquaresStats:
        return LeastSquaresStats(dims.d_in, dims.d_out, device, relative=self.relative)

    def values(self, dims: Dims) -> int:
        return (dims.d_in + 1) * (dims.d_in + 1 + dims.d_out)


@dataclass(frozen=True)
class GateRequest(Request):
    """A gated block's constant gate: the mean, and with ``fit`` the least-squares fit (:class:`GateStats`)."""

    fit: bool = False

    def make(self, dims: Dims, device: torch.device) -> GateStats:
        return GateStats(dims.channels, device, fit=self.fit)

    def values(self, dims: Dims) -> int:
        return dims.channels * (1 + (2 * dims.channels if self.fit else 0))

    def served_by(self, other: Request) -> bool:
        return isinstance(other, GateRequest) and (other.fit or not self.fit)


@dataclass(frozen=True)
class LineRequest(Request):
    """Each channel's least-squares line of a plain block's activation (:class:`LineStats`)."""

    def make(self, dims: Dims, device: torch.device) -> LineStats:
        return LineStats(dims.channels, device)

    def values(self, dims: Dims) -> int:
        return 5 * dims.channels
