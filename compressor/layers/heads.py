"""Fixed classifier heads (Hoffer, Hubara, Soudry, "Fix your classifier", ICLR 2018).

Both heads compute, per sample (never per batch)::

    x_hat  = x / (||x||_2 + eps)
    logits = alpha * Q x_hat + b          Q: fixed C x N with unit-norm rows

with ``alpha`` one learned scalar (the inverse softmax temperature; ``learn_alpha=False`` fixes
it) and ``b`` a learned bias: C + 1 trained numbers instead of C (N + 1).

alpha is a scale, so it is learned as ``log_alpha`` (alpha = exp(log_alpha) > 0): Adam moves a
parameter by about its learning rate per step, which on log_alpha is a *relative* change of alpha
(2% per step at lr 0.02), whatever size alpha must reach. Learned directly, alpha grows by about
lr per step: on a 1,000-class model it had only reached 27.5 at the end of the default 2,500 steps
(the most those steps allow) and the compressed model scored 82.8% against the original's 99.0%;
learned as its logarithm, 94.6% (docs/hard_samples.md, sixth round). The stored number is the
same one scalar; a compressed checkpoint that stores ``alpha`` itself (fixclf before 2026-12-04)
is read through :func:`with_log_alpha`.

:class:`HadamardHead` never stores Q: it is a truncated Sylvester Hadamard matrix applied by
the fast Walsh-Hadamard transform. Choices, each fixing a pitfall of plain truncation:

* Row 0 of H is all ones, so with non-negative (post-ReLU) features class 0 would win on average.
  fixclf uses rows 1..C instead: every such row of H_P sums to zero over the columns used (when
  N is a power of two, or more generally when C < 2^v, 2^v the largest power of two dividing N),
  so for features with a common positive offset no class is favoured. (A random sign flip of the
  features, the other common fix, does not do this: it leaves row sums of order sqrt(N).)
* P = next_power_of_two(max(N, C + 1)); features are zero-padded to P, transformed, and outputs
  1..C kept: Q = sqrt(P/N) * H_P[1:C+1, cols] / sqrt(P) (the factor makes rows unit-norm).
* If C + 1 <= next_power_of_two(N), ``cols`` are the first N columns: rows are distinct, and
  exactly orthogonal when C < 2^v (e.g. any C < N for N a power of two; C <= 1023 for N = 9216).
  Otherwise they are distinct and nearly orthogonal (see :meth:`FixedHead.coherence`).
* If C + 1 > next_power_of_two(N), the first N columns would give identical pairs of class rows
  (H_2N = [[H_N, H_N], [H_N, -H_N]]); the N features are then placed on N columns of H_P that
  include the log2(P) power-of-two columns, which makes all C rows distinct by construction
  (a stored index of P numbers; see :meth:`HadamardHead._draw_placement`). N features give at
  most 2^N - 1 distinct codes: a head with more classes is refused (:func:`hadamard_head_limit`).

:class:`OrthogonalHead` is the paper's random orthogonal alternative: Q is drawn once from a
seeded generator (QR of a Gaussian matrix; rows orthonormal when C <= N, unit-norm otherwise)
and stored as a C x N buffer.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..transforms import WalshHadamard, next_power_of_two, permute_last
from .base import ReplacesLinear, check_counts

__all__ = ["FixedHead", "HadamardHead", "OrthogonalHead", "fixed_head_refusal", "hadamard_head_limit",
           "hadamard_head_refusal", "with_log_alpha"]


class FixedHead(ReplacesLinear):
    """Common part of the fixed heads: normalisation, scale alpha, bias. Subclasses define ``codes``."""

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        alpha: float = 10.0,
        learn_alpha: bool = True,
        bias: bool = True,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        check_counts(type(self).__name__, in_features=in_features, num_classes=num_classes)
        self.in_features, self.num_classes, self.eps = in_features, num_classes, eps
        # The paper notes alpha 1..10 all train (fig. 3); fixclf sets its start when it replaces a
        # trained head (:func:`~compressor.layers.registry.init_head_from_dense`).
        if learn_alpha:
            if not alpha > 0:
                raise ValueError(f"a learned alpha is exp(log_alpha) and must start positive, got {alpha}")
            self.log_alpha = nn.Parameter(torch.tensor(math.log(alpha)))
        else:
            self.register_buffer("fixed_alpha", torch.tensor(float(alpha)))
        self.bias = nn.Parameter(torch.zeros(num_classes)) if bias else None

    @property
    def alpha(self) -> torch.Tensor:
        """The scale: ``exp(log_alpha)`` when learned, else the fixed value (a 0-d tensor)."""
        if "log_alpha" in self._parameters:
            return self._parameters["log_alpha"].exp()
        return self._buffers["fixed_alpha"]

    @torch.no_grad()
    def set_alpha(self, value: float) -> None:
        """Set the scale to ``value`` (> 0 when learned)."""
        if "log_alpha" in self._parameters:
            self._parameters["log_alpha"].fill_(math.log(value))
        else:
            self._buffers["fixed_alpha"].fill_(value)

    @property
    def out_features(self) -> int:
        return self.num_classes

    code_scale: float = 1.0  # Q = code_scale * (the matrix raw_codes applies)

    def raw_codes(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ Q.T / code_scale`` for x (M, N) -> (M, C)."""
        raise NotImplementedError

    def codes(self, x_hat: torch.Tensor) -> torch.Tensor:
        """``x_hat @ Q.T`` for x_hat (M, N) -> (M, C)."""
        return self.raw_codes(x_hat) * self.code_scale

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 (nn.Linear's name: models call it as input=)
        batch = input.shape[:-1]
        x = self.rows(input)
        # Q is linear: alpha Q (x / |x|) = raw(x) * (alpha code_scale / |x|), one scale on the C outputs.
        scale = (self.alpha * self.code_scale) / (torch.linalg.vector_norm(x, dim=-1, keepdim=True) + self.eps)
        logits = self.raw_codes(x) * scale
        if self.bias is not None:
            logits = logits + self.bias
        return logits.reshape(*batch, self.num_classes)

    @torch.no_grad()
    def code_matrix(self) -> torch.Tensor:
        """The fixed C x N matrix Q (computed on demand; for inspection and tests)."""
        ref = self.alpha
        return self.codes(torch.eye(self.in_features, dtype=ref.dtype, device=ref.device)).T.contiguous()

    @torch.no_grad()
    def coherence(self) -> float:
        """Largest |cosine| between two class rows of Q (0 for exactly orthogonal codes)."""
        q = self.code_matrix()
        gram = q @ q.T
        gram.fill_diagonal_(0)
        return float(gram.abs().max()) if self.num_classes > 1 else 0.0

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, num_classes={self.num_classes}"


def with_log_alpha(state: dict, prefix: str) -> dict:
    """``state`` with a learned head's scale stored as ``{prefix}alpha`` (fixclf before 2026-12-04)
    given as ``{prefix}log_alpha``, the form :class:`FixedHead` learns; any other state unchanged.
    Raises ValueError when that stored alpha is not one positive number."""
    stored = state.get(prefix + "alpha")
    if not isinstance(stored, torch.Tensor) or prefix + "log_alpha" in state:
        return state
    if stored.dim() != 0 or not bool(stored > 0):
        raise ValueError(f"{prefix}alpha must be one positive number")
    state = {key: value for key, value in state.items() if key != prefix + "alpha"}
    state[prefix + "log_alpha"] = stored.log()
    return state


def hadamard_head_limit(in_features: int) -> int:
    """Most classes a Hadamard head on ``in_features`` features can tell apart: 2^N - 1 distinct
    nonzero sign patterns (row 0, all ones, is never used)."""
    return (1 << min(in_features, 62)) - 1


def hadamard_head_refusal(in_features: int, num_classes: int) -> str:
    """Why a Hadamard head on ``in_features`` features cannot tell ``num_classes`` classes apart ("" if it can)."""
    limit = hadamard_head_limit(in_features)
    if num_classes <= limit:
        return ""
    return (f"a Hadamard head on {in_features} feature{'s' * (in_features != 1)} tells at most {limit} "
            f"class{'es' * (limit != 1)} apart, not {num_classes}")


def fixed_head_refusal(in_features: int) -> str:
    """Why no fixed head can work on ``in_features`` features ("" if one can): normalised, one feature
    is +1 or -1, and the logits of every sample are one of two vectors whatever the codes."""
    if in_features > 1:
        return ""
    return ("a fixed head normalises its features, and 1 feature normalised is only +1 or -1: two logit vectors "
            "for every class")


class HadamardHead(FixedHead):
    """Fixed truncated-Hadamard classifier; stores alpha and the bias, and a column placement of P
    indices only when C + 1 > next_power_of_two(N), i.e. C >= that power (module doc)."""

    def __init__(self, in_features: int, num_classes: int, *, seed: int = 0, **kwargs) -> None:
        super().__init__(in_features, num_classes, **kwargs)
        refusal = hadamard_head_refusal(in_features, num_classes)
        if refusal:
            raise ValueError(refusal)
        self.size = next_power_of_two(max(in_features, num_classes + 1))
        self.hadamard = WalshHadamard(self.size)
        self.code_scale = math.sqrt(self.size / in_features)  # unit-norm rows
        if num_classes + 1 <= next_power_of_two(in_features):
            self.register_buffer("placement", None)
        else:
            self.register_buffer("placement", self._draw_placement(torch.Generator().manual_seed(seed)))

    def _draw_placement(self, generator: torch.Generator) -> torch.Tensor:
        """Permutation of P putting the N features on N columns of H_P so that all C code rows differ.

        Constructive, never a search: the sign of H_P[r, c] is (-1)^popcount(r & c), so row r
        restricted to columns c_1..c_N is the GF(2) vector (r . c_j)_j, linear in r. Two rows
        r != r' coincide iff (r xor r') . c_j = 0 for every j; when the columns include the
        p = log2(P) unit vectors 1, 2, 4, ..., P/2 that never happens. The other N - p columns are
        drawn at random (never column 0, which is all ones) and the features shuffled over them.
        Drawn on the CPU whatever the default device (a checkpoint's shape check builds on meta).
        """
        with torch.device("cpu"):
            return self._placement_on_cpu(generator)

    def _placement_on_cpu(self, generator: torch.Generator) -> torch.Tensor:
        p = self.size.bit_length() - 1
        basis = [1 << k for k in range(p)]
        others = [c for c in range(1, self.size) if c & (c - 1)]  # nonzero, not a power of two
        picked = torch.randperm(len(others), generator=generator)[: self.in_features - p]
        columns = torch.tensor(basis + [others[i] for i in picked.tolist()])
        columns = columns[torch.randperm(self.in_features, generator=generator)]  # feature j -> columns[j]
        free = torch.ones(self.size, dtype=torch.bool)
        free[columns] = False
        placement = torch.empty(self.size, dtype=torch.long)
        placement[columns] = torch.arange(self.in_features)  # x_padded[placement][c_j] = x[j]
        placement[free] = torch.arange(self.in_features, self.size)  # padding zeros elsewhere
        return placement

    def raw_codes(self, x: torch.Tensor) -> torch.Tensor:
        if self.size != self.in_features:
            x = F.pad(x, (0, self.size - self.in_features))
        if self.placement is not None:
            x = permute_last(x, self.placement)
        return self.hadamard(x, keep=self.num_classes + 1)[:, 1:]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, hadamard_size={self.size}"


class OrthogonalHead(FixedHead):
    """Fixed random orthogonal classifier; Q (C x N) is a stored buffer."""

    def __init__(self, in_features: int, num_classes: int, *, seed: int = 0, **kwargs) -> None:
        super().__init__(in_features, num_classes, **kwargs)
        refusal = fixed_head_refusal(in_features)
        if refusal:
            raise ValueError(refusal)
        generator = torch.Generator().manual_seed(seed)
        tall = torch.randn(max(in_features, num_classes), min(in_features, num_classes), generator=generator)
        q, _ = torch.linalg.qr(tall.double())  # orthonormal columns
        q = q.T if num_classes <= in_features else q  # C x N: orthonormal rows; when C > N, orthonormal columns
        # whose rows are then scaled to unit norm below (the columns are orthogonal no longer)
        self.register_buffer("weight", (q / q.norm(dim=1, keepdim=True)).float())

    def raw_codes(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.T
