"""Re-factoring a merged update to rank k by truncated SVD, with the error it costs reported, never hidden.

For a linear merge the update is already a product B·A of rank R = Σrᵢ, so its SVD comes from two thin QR
factorisations and an R×R SVD (exact, and orders of magnitude cheaper than an SVD of the full out×in matrix).
Sparsified merges (TIES, DARE, pruning) produce dense updates and take the full SVD.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Truncation:
    """Rank-k factors with B·A ≈ ΔW, and the Frobenius norms that define the error."""

    A: torch.Tensor  # [k, in]
    B: torch.Tensor  # [out, k]
    error: float  # ‖ΔW − B·A‖_F
    norm: float  # ‖ΔW‖_F

    @property
    def relative_error(self) -> float:
        return self.error / self.norm if self.norm > 0 else 0.0


def _split(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    k_eff = min(k, S.numel())
    root = S[:k_eff].sqrt()
    B = U[:, :k_eff] * root
    A = root[:, None] * Vh[:k_eff]
    if k_eff < k:  # pad with zero directions so every module has exactly the declared rank
        B = torch.cat([B, B.new_zeros(B.shape[0], k - k_eff)], dim=1)
        A = torch.cat([A, A.new_zeros(k - k_eff, A.shape[1])], dim=0)
    error = float(S[k_eff:].double().square().sum().sqrt())
    norm = float(S.double().square().sum().sqrt())
    return A, B, error, norm


def truncate_dense(delta: torch.Tensor, k: int) -> Truncation:
    U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
    A, B, err, norm = _split(U, S, Vh, k)
    return Truncation(A.float(), B.float(), err, norm)


def truncate_factors(B: torch.Tensor, A: torch.Tensor, k: int) -> Truncation:
    """SVD of B·A without forming it: B = Q_b R_b, Aᵀ = Q_a R_a, B·A = Q_b (R_b R_aᵀ) Q_aᵀ."""
    Qb, Rb = torch.linalg.qr(B.double())
    Qa, Ra = torch.linalg.qr(A.double().T)
    U, S, Vh = torch.linalg.svd(Rb @ Ra.T)
    A_k, B_k, err, norm = _split(Qb @ U, S, Vh @ Qa.T, k)
    return Truncation(A_k.float(), B_k.float(), err, norm)
