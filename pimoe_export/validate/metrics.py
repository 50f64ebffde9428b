"""Error statistics and routing agreement (numpy only)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class ErrorStats:
    max_abs: float
    mean_abs: float
    rel_l2: float
    cosine: float
    ref_max_abs: float
    elements: int

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def error_stats(reference: np.ndarray, actual: np.ndarray) -> ErrorStats:
    """Statistics of ``actual - reference`` in float64 (NaN anywhere makes every statistic NaN). The two arrays must
    have the same shape: a transposed or reshaped output of the same size is refused, not compared elementwise."""
    ref = np.asarray(reference, dtype=np.float64)
    out = np.asarray(actual, dtype=np.float64)
    if ref.shape != out.shape:
        raise ValueError(f"shape mismatch: reference {ref.shape} vs actual {out.shape}: compare arrays of the same "
                         f"shape (reshape one explicitly if the layouts are known to agree)")
    ref, out = ref.ravel(), out.ravel()
    if ref.size == 0:
        return ErrorStats(0.0, 0.0, 0.0, 1.0, 0.0, 0)
    diff = out - ref
    ref_norm = float(np.linalg.norm(ref))
    out_norm = float(np.linalg.norm(out))
    if ref_norm == 0.0 and out_norm == 0.0:
        cosine = 1.0
    elif ref_norm == 0.0 or out_norm == 0.0:
        cosine = 0.0
    else:
        cosine = float(np.dot(ref, out) / (ref_norm * out_norm))
    return ErrorStats(
        max_abs=float(np.max(np.abs(diff))),
        mean_abs=float(np.mean(np.abs(diff))),
        rel_l2=float(np.linalg.norm(diff) / ref_norm) if ref_norm > 0 else float(np.linalg.norm(diff)),
        cosine=cosine,
        ref_max_abs=float(np.max(np.abs(ref))),
        elements=int(ref.size),
    )


def routing_agreement(reference_ids: np.ndarray, ids: np.ndarray) -> float:
    """Share of tokens whose selected expert SET is unchanged (order within the top-k ignored)."""
    ref = np.sort(np.asarray(reference_ids).reshape(-1, np.shape(reference_ids)[-1]), axis=-1)
    got = np.sort(np.asarray(ids).reshape(-1, np.shape(ids)[-1]), axis=-1)
    if ref.shape != got.shape:
        raise ValueError(f"routing shapes differ: {np.shape(reference_ids)} vs {np.shape(ids)}")
    if ref.shape[0] == 0:
        return 1.0
    return float(np.mean(np.all(ref == got, axis=-1)))


def merge_stats(parts: list[ErrorStats]) -> ErrorStats:
    """Combine per-batch statistics (exact for max/mean; rel_l2 and cosine weighted by element count)."""
    total = sum(p.elements for p in parts)
    if total == 0:
        return ErrorStats(0.0, 0.0, 0.0, 1.0, 0.0, 0)
    return ErrorStats(
        max_abs=max(p.max_abs for p in parts),
        mean_abs=sum(p.mean_abs * p.elements for p in parts) / total,
        rel_l2=float(np.sqrt(sum(p.rel_l2**2 * p.elements for p in parts) / total)),
        cosine=min(p.cosine for p in parts),
        ref_max_abs=max(p.ref_max_abs for p in parts),
        elements=total,
    )


def pooled_embedding_cosine(reference: np.ndarray, actual: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per sequence: cosine between the mean-pooled (over positions where ``mask`` != 0) token states of
    ``reference`` and ``actual`` ([B, S, H], mask [B, S]), as sentence encoders pool them. A sequence with no
    valid position, or a zero embedding on one side only, scores 0 (both zero: 1)."""
    ref = np.asarray(reference, dtype=np.float64)
    out = np.asarray(actual, dtype=np.float64)
    valid = (np.asarray(mask) != 0).astype(np.float64)
    if ref.ndim != 3 or ref.shape != out.shape or valid.shape != ref.shape[:2]:
        raise ValueError(f"pooled cosine needs [B, S, H] states and a [B, S] mask: {ref.shape}, {out.shape}, "
                         f"{valid.shape}")
    count = valid.sum(axis=1, keepdims=True)
    a = (ref * valid[..., None]).sum(axis=1) / np.maximum(count, 1.0)
    b = (out * valid[..., None]).sum(axis=1) / np.maximum(count, 1.0)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    both_zero = (na == 0) & (nb == 0)
    cos = np.where((na > 0) & (nb > 0), (a * b).sum(axis=1) / np.maximum(na * nb, 1e-300), 0.0)
    return np.where(count[:, 0] > 0, np.where(both_zero, 1.0, cos), 0.0)
