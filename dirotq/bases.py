"""Bases, rotations and rank policies (docs/DESIGN.md §3 and
"kernel-friendly form").

- ``pca_basis``: eigenvectors of the calibration second moment C = Σ xᵀx, eigenvalues descending;
  ``pca_top_basis``: only the top r of them, by block subspace iteration (O(d²·r) per iteration
  instead of eigh's O(d³): what a rank-r branch needs at FLUX widths, docs/DESIGN.md "Memory and
  devices").
- ``haar_orthogonal`` / ``hadamard`` / ``random_hadamard`` / ``block_hadamard``: the rotations that
  spread the quantized tail's energy before INT4 (Hadamard matrices are built by Sylvester's
  construction, not pasted).
- ``full_rotation``: T = V · diag(I_r, R), the paper's online rotation.
- ``hsvd_lowrank``: the activation-weighted weight SVD (rank-r minimiser of ‖X(W − L)ᵀ‖_F).
- Rank policies: fixed, energy fraction, per-layer error budget, and a global 16-bit budget
  allocation over layers.
"""

from __future__ import annotations

import logging
import math
from typing import Callable, Mapping, Sequence

import torch

from .ondisk import OnDiskMatrix, row_block_matmul

log = logging.getLogger(__name__)


def pca_basis(second_moment: torch.Tensor, damping: float = 0.0, dtype: torch.dtype = torch.float64
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigen-decomposition of ``second_moment: (d, d)`` (symmetric PSD), descending order.

    ``damping`` adds ``damping · mean(diag C) · I`` first (the paper preset uses 0.01; it only
    shifts eigenvalues). Returns ``(eigenvalues (d,), V (d, d))`` in ``dtype`` (float64 by default)
    on the input's device, columns of V are the principal directions.
    """
    c = second_moment.to(dtype)
    if c.ndim != 2 or c.shape[0] != c.shape[1]:
        raise ValueError(f"second moment must be square, got shape {tuple(c.shape)}")
    if not torch.equal(c, c.mT):  # an exactly symmetric input (hessian()) skips two d×d copies
        c = 0.5 * (c + c.T)
    if damping:
        c = c + damping * c.diagonal().mean() * torch.eye(c.shape[0], dtype=c.dtype, device=c.device)
    evals, evecs = torch.linalg.eigh(c)
    return evals.flip(0).clamp(min=0), evecs.flip(1)


def pca_top_basis(second_moment: torch.Tensor | OnDiskMatrix, rank: int, *, dtype: torch.dtype = torch.float64,
                  tol: float | None = None, max_iter: int = 300, seed: int = 0
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-``rank`` eigenpairs of ``second_moment: (d, d)`` (symmetric PSD) without a full eigh.

    Block subspace iteration with Rayleigh–Ritz on ``rank + max(16, rank/2)`` vectors, run until
    every kept pair has ‖C v − λ v‖ ≤ tol·λ + 1e3·eps·λ₁ (tol: 1e-6 in float64, 1e-4 in float32;
    the second term is rounding, and lets the null space of a rank-deficient C converge) or
    ``max_iter`` iterations (then a warning is logged). Convergence takes a spectral gap after
    ``rank``: fast on decaying activation spectra, slow on a flat one. Each iteration is one (d, d) × (d, k)
    product, so the cost is O(d²·k) per iteration and the memory O(d·k) beside C, against eigh's
    O(d³) time and several d×d work arrays. Small or nearly full-rank requests use ``pca_basis``.
    ``second_moment`` may be an ``OnDiskMatrix`` (statistics read from disk): its rows are then read
    in blocks at every iteration and never become resident; the product is taken in the same row
    blocks for a tensor, so both give the same bits.
    Returns ``(eigenvalues (rank,) descending, V (d, rank))`` in ``dtype`` on the input's device;
    V spans the same subspace as ``pca_basis(C)[1][:, :rank]`` up to the tolerance (signs and the
    basis inside a repeated eigenvalue may differ).
    """
    d = second_moment.shape[0]
    check_rank(rank, d)
    k = min(d, rank + max(16, rank // 2))
    on_disk = isinstance(second_moment, OnDiskMatrix)
    if rank == 0:
        return torch.zeros(0, dtype=dtype, device=second_moment.device), torch.zeros(d, 0, dtype=dtype,
                                                                                    device=second_moment.device)
    if d <= 512 or 2 * k >= d:
        ev, v = pca_basis(second_moment.read_rows(0, d) if on_disk else second_moment, dtype=dtype)
        return ev[:rank], v[:, :rank].contiguous()
    # a tensor in another dtype is converted once; a matrix on disk block by block in row_block_matmul
    c = second_moment if (on_disk or second_moment.dtype == dtype) else second_moment.to(dtype)
    tol = (1e-6 if dtype == torch.float64 else 1e-4) if tol is None else tol
    g = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=dtype).to(c.device)).Q
    res = float("inf")
    for it in range(max_iter):
        z = row_block_matmul(c, q)  # C Q: (d, k)
        t = q.T @ z
        ev, u = torch.linalg.eigh(0.5 * (t + t.T))
        ev, u = ev.flip(0), u.flip(1)
        v = q @ u[:, :rank]
        resid = z @ u[:, :rank] - v * ev[:rank]  # C V − V Λ, since C V = C Q U = Z U
        floor = 1e3 * torch.finfo(dtype).eps * ev[0].abs()
        bound = tol * ev[:rank].abs() + floor
        res = float((resid.norm(dim=0) / bound).max()) * tol  # the worst residual in units of λ
        if res <= tol:
            break
        q = torch.linalg.qr(z).Q
    else:
        log.warning(
            "pca_top_basis: rank %d of width %d not converged after %d iterations (relative residual %.2e > "
            "%.1e): the spectrum has no gap after rank %d", rank, d, max_iter, res, tol, rank)
    return ev[:rank].clamp(min=0), v


def explained_variance(eigenvalues: torch.Tensor) -> torch.Tensor:
    """Cumulative energy fraction kept by the top r directions, for r = 0..d: shape (d + 1,)."""
    ev = eigenvalues.double().clamp(min=0)
    total = ev.sum().clamp(min=1e-300)
    return torch.cat([ev.new_zeros(1), ev.cumsum(0) / total])


def haar_orthogonal(n: int, seed: int = 42, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Haar-distributed random orthogonal (n, n) matrix (QR of a Gaussian with sign fix), seeded."""
    if n == 0:
        return torch.zeros(0, 0, dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    q = q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, torch.ones(()).double())
    return q.to(dtype)


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def hadamard(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Normalised Sylvester Hadamard matrix (n, n), n a power of two; H Hᵀ = I."""
    if not is_power_of_two(n):
        raise ValueError(f"a Sylvester Hadamard matrix needs a power-of-two size, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / math.sqrt(n)).to(dtype)


def random_signs(n: int, seed: int = 0) -> torch.Tensor:
    """Seeded ±1 vector (n,) float64: diag(signs) · H is a randomized Hadamard transform."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n,), generator=g).double() * 2 - 1


def largest_pow2_block(d: int, at_least: int = 1) -> int:
    """Largest power of two dividing ``d`` (the block size of a block-diagonal Hadamard)."""
    block = d & -d
    if block < at_least:
        raise ValueError(f"width {d} has no power-of-two block ≥ {at_least}; pad it first")
    return block


def block_hadamard(d: int, block: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Block-diagonal (d, d) matrix of normalised Hadamard blocks of size ``block`` (d % block == 0)."""
    if d % block:
        raise ValueError(f"width {d} is not a multiple of the Hadamard block {block}")
    return torch.block_diag(*([hadamard(block, dtype)] * (d // block))) if d else torch.zeros(0, 0, dtype=dtype)


def random_hadamard(d: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """QuaRot-style randomized Hadamard diag(signs) · H of size (d, d).

    A full Sylvester matrix when d is a power of two; otherwise block-diagonal with the largest
    power-of-two block dividing d (e.g. 1152 = 9 × 128), which still mixes every channel with
    ``block − 1`` others.
    """
    block = d if is_power_of_two(d) else largest_pow2_block(d)
    return (random_signs(d, seed).unsqueeze(1) * block_hadamard(d, block)).to(dtype)


def tail_rotation(n: int, kind: str = "haar", seed: int = 42) -> torch.Tensor:
    """(n, n) rotation of the quantized tail: ``"haar"``, ``"hadamard"`` (randomized) or ``"none"``."""
    if kind == "haar":
        return haar_orthogonal(n, seed)
    if kind == "hadamard":
        return random_hadamard(n, seed) if n else torch.zeros(0, 0, dtype=torch.float64)
    if kind == "none":
        return torch.eye(n, dtype=torch.float64)
    raise ValueError(f"rotation must be 'haar', 'hadamard' or 'none', got {kind!r}")


def full_rotation(basis: torch.Tensor, rank: int, tail: str = "haar", seed: int = 42) -> torch.Tensor:
    """T = V · diag(I_r, R) for ``basis V: (d, d)``; orthogonal (d, d) float64.

    The first r columns span the 16-bit subspace; R spreads the remaining energy evenly.
    """
    d = basis.shape[1]
    check_rank(rank, d)
    v = basis.double()
    return torch.cat([v[:, :rank], v[:, rank:] @ tail_rotation(d - rank, tail, seed)], dim=1)


def per_head_basis(second_moment: torch.Tensor, head_dim: int, dtype: torch.dtype = torch.float64
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-diagonal PCA basis: one (head_dim × head_dim) eigenbasis per head (paper variant for
    the attention output projection). Returns ``(eigenvalues (d,), V (d, d))``, each head's block
    sorted descending; eigenvalues are listed head by head."""
    d = second_moment.shape[0]
    if d % head_dim:
        raise ValueError(f"width {d} is not a multiple of head_dim {head_dim}")
    vals, blocks = [], []
    for h in range(d // head_dim):
        s = slice(h * head_dim, (h + 1) * head_dim)
        ev, v = pca_basis(second_moment[s, s], dtype=dtype)
        vals.append(ev)
        blocks.append(v)
    return torch.cat(vals), torch.block_diag(*blocks)


def hsvd_lowrank(weight: torch.Tensor, hessian: torch.Tensor, rank: int, damping: float = 0.01,
                 dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Activation-weighted low-rank approximation of ``weight: (o, d)`` under ``hessian H: (d, d)``.

    Minimises ‖X(W − L)ᵀ‖_F over rank-r L via C_h = chol(H + λ·mean(diag H)·I):
    L = (W C_h)_r C_h⁻¹. Returns ``(down (d, r), up (o, r))`` in ``dtype`` on the inputs' device with
    L = up · downᵀ; λ → ∞ recovers the plain weight SVD.
    """
    check_rank(rank, weight.shape[1])  # above min(o, d) every direction is kept: the branch is W itself
    h = hessian.to(dtype)
    h = h + damping * h.diagonal().mean().clamp(min=1e-12) * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    ch = torch.linalg.cholesky(h)  # H = C_h C_hᵀ, so ‖X Eᵀ‖² = ‖E C_h‖²
    u, s, vh = torch.linalg.svd(weight.to(dtype) @ ch, full_matrices=False)
    up = u[:, :rank] * s[:rank]
    # (W C_h)_r C_h⁻¹ = up · vh_r · C_h⁻¹, so down = (vh_r C_h⁻¹)ᵀ = C_h⁻ᵀ vh_rᵀ
    down = torch.linalg.solve_triangular(ch.T, vh[:rank].T, upper=True)
    return down, up


def weight_svd(weight: torch.Tensor, rank: int, dtype: torch.dtype = torch.float64
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-r SVD of ``weight: (o, d)``: ``(down = V_r (d, r), up = U_r Σ_r (o, r))`` in ``dtype``."""
    check_rank(rank, weight.shape[1])  # above min(o, d) every direction is kept: the branch is W itself
    u, s, vh = torch.linalg.svd(weight.to(dtype), full_matrices=False)
    return vh[:rank].T, u[:, :rank] * s[:rank]


# --- rank policies -----------------------------------------------------------------------------


def check_rank(rank: int, d: int) -> None:
    if not isinstance(rank, int) or isinstance(rank, bool):
        raise TypeError(f"rank must be an int, got {type(rank).__name__}")
    if rank < 0 or rank > d:
        raise ValueError(f"rank must be in [0, {d}] for a layer of width {d}, got {rank}")


def paper_rank(d: int, multiple: int = 64) -> int:
    """The paper preset's rank: d/8 rounded up to a multiple of 64 (1152 → 192, 3072 → 384)."""
    return min(d, int(math.ceil(d / 8 / multiple) * multiple))


def rank_for_energy(eigenvalues: torch.Tensor, fraction: float) -> int:
    """Smallest r whose top-r directions keep at least ``fraction`` of the energy."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"energy fraction must be in [0, 1], got {fraction}")
    curve = explained_variance(eigenvalues)
    hits = torch.nonzero(curve >= fraction - 1e-12)
    return int(hits[0]) if len(hits) else len(eigenvalues)


def rank_for_error_budget(error_at_rank: Callable[[int], float], budget: float,
                          candidates: Sequence[int]) -> int:
    """Smallest candidate rank whose error ``error_at_rank(r)`` is ≤ ``budget``.

    Candidates are tried in increasing order (error is not guaranteed monotone in r, so no
    bisection); the largest candidate is returned when none meets the budget.
    """
    ranks = sorted(set(int(r) for r in candidates))
    if not ranks:
        raise ValueError("no candidate ranks given")
    for r in ranks:
        if error_at_rank(r) <= budget:
            return r
    return ranks[-1]


def allocate_ranks(error_curves: Mapping[str, Mapping[int, float]], cost_per_rank: Mapping[str, float],
                   budget: float) -> dict[str, int]:
    """Spend a global 16-bit budget where it lowers error most (greedy on marginal gain per cost).

    error_curves: layer -> {rank: error}; each must contain rank 0. cost_per_rank: layer -> extra
    16-bit parameters per unit of rank (e.g. d_in + d_out). budget: total extra parameters.
    Returns layer -> rank (each a key of its curve) with Σ rank · cost ≤ budget.
    """
    plan = {name: 0 for name in error_curves}
    spent = 0.0
    while True:
        best, best_gain = None, 0.0
        for name, curve in error_curves.items():
            ranks = sorted(r for r in curve if r > plan[name])
            if not ranks:
                continue
            nxt = ranks[0]
            step_cost = (nxt - plan[name]) * cost_per_rank[name]
            if spent + step_cost > budget:
                continue
            gain = (curve[plan[name]] - curve[nxt]) / max(step_cost, 1e-12)
            if gain > best_gain:
                best, best_gain = name, gain
        if best is None:
            return plan
        nxt = min(r for r in error_curves[best] if r > plan[best])
        spent += (nxt - plan[best]) * cost_per_rank[best]
        plan[best] = nxt
