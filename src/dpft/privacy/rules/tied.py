"""Cross terms for a parameter shared by two modules: ||E + H||² = ||E||² + ||H||² + 2<E, H>."""

from __future__ import annotations

import torch
from torch import Tensor

from dpft.privacy.rules.base import Capture, Units


def embedding_linear_cross(emb: Capture, lin: Capture, units: Units) -> Tensor:
    """<E_u, H_u> for tied input embeddings and lm_head, without forming either (V × d) matrix.

    E_e = sum_t onehot(x_t) ⊗ d_t and H_e' = sum_s gl'_s ⊗ h'_s, so
    <E_e, H_e'> = sum_{t,s} gl'_s[x_t] · (h'_s · d_t): O(T²·d) per pair once gl' is gathered.

    Args:
        emb: capture of the nn.Embedding (token ids, gradient d of its output).
        lin: capture of the nn.Linear sharing its weight (input h, gradient gl of the logits).
        units: the micro-batch's units.

    Returns:
        (U,) fp32: each unit's <E_u, H_u>.
    """
    b = emb.a.shape[0]
    ids = emb.a.reshape(b, -1)
    d = emb.g.reshape(*ids.shape, -1).float()
    h = lin.a.reshape(b, -1, lin.a.shape[-1]).float()
    gl = lin.g.reshape(b, h.shape[1], -1)  # (B, S, V): gather before any fp32 copy
    ids_l, gl_r = units.left(ids), units.right(gl)
    picked = torch.gather(gl_r, 2, ids_l[:, None, :].expand(-1, gl_r.shape[1], -1)).float()  # (P, S, T)
    picked.mul_(torch.bmm(units.right(h), units.left(d).mT))
    return units.sum_pairs(picked.sum((1, 2)))
