"""Closed-form edits of linear projections (UCE, Gandikota et al., WACV 2024, and the editors built on it): the weight
that maps erased inputs to their guides' outputs and preserved inputs to their own, nearest the old weight."""

from __future__ import annotations

import torch


def least_squares_edit(weight: torch.Tensor, erase_inputs: torch.Tensor, erase_targets: torch.Tensor,
                       preserve_inputs: torch.Tensor, preserve_targets: torch.Tensor, *, lamb: float,
                       erase_scale: float, preserve_scale: float) -> torch.Tensor:
    """UCE's equation 7: ``(λW + s_e Σ v*ᵢ cᵢᵀ + s_p Σ v_j c_jᵀ)(λI + s_e Σ cᵢ cᵢᵀ + s_p Σ c_j c_jᵀ)⁻¹``.

    ``weight`` ``[out, d]``; ``erase_inputs`` ``[n, d]`` (the cᵢ) with ``erase_targets`` ``[n, out]`` (the v*ᵢ);
    ``preserve_inputs`` ``[m, d]`` with ``preserve_targets`` ``[m, out]`` (n, m may be 0). Returns ``[out, d]`` in
    ``weight``'s dtype. Solved in float64 rather than by the reference's float32 ``torch.inverse``: the same matrix,
    without the inverse's rounding."""
    w = weight.detach().double()
    eye = torch.eye(w.shape[1], dtype=torch.float64, device=w.device)
    c_e, v_e = erase_inputs.double(), erase_targets.double()
    c_p, v_p = preserve_inputs.double(), preserve_targets.double()
    numerator = lamb * w + erase_scale * v_e.T @ c_e + preserve_scale * v_p.T @ c_p
    gram = lamb * eye + erase_scale * c_e.T @ c_e + preserve_scale * c_p.T @ c_p
    return torch.linalg.solve(gram, numerator.T).T.to(weight.dtype)  # gram is symmetric: X gram = N ⇔ gram Xᵀ = Nᵀ
