"""Sparse -> dense: the learned attention kernel, its thin-plate-spline and Gaussian peers, weights files.

Every kernel has one interface::

    kernel(query_xyz (B,Q,3), query_feat (B,Q,C) | None,
           key_xyz (B,N,3), key_disp (B,N,3), key_feat (B,N,C) | None, key_conf (B,N) | None) -> (B,Q,3)

Points are continuous voxel indices (x, y, z) on the isotropic working grid, displacements are in
working voxels (x, y, z), distances are therefore in working-voxel units. Tensors follow the device
of their inputs (CPU, or CUDA when the inputs live there).

The learned kernel (docs/method.md, section 2) computes, for each query x and its K nearest keys y,

    d(x) = sum_y w(x, y) d(y),   w = softmax_K( Hs(x, y) + Hf(x, y) + g * log b(x, y) + a * log(c_y + eps) )

with b(x, y) = 1 / (1 + |x - y|^2 / s^2). The *log* of the bias goes into the logits because the
softmax then turns it back into a product: at initialisation (both heads zero, g = a = 1) the weights
are exactly proportional to b(x, y) * c_y, i.e. Shepard's inverse-distance weighting (power 2,
smoothed below s voxels) times the key confidence, which is already a sensible interpolator and is
independent of the keypoint density (only distance ratios matter). Adding b itself (a number in
[0, 1]) would change logits by at most 1 and start from a nearly uniform average over K keys.
Because the weights sum to one, any constant field is reproduced exactly, trained or not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.spatial import cKDTree
from torch import nn

from ..core.config import Config, setting
from ..core.errors import IkrError
from ..io.weights import load_payload, save_module
from .config import HEADS, KERNEL_NAMES

WEIGHTS_FORMAT = "ikr-kernel-v1"
ARCH_FIELDS = ("feat_dim", "heads", "dim", "n_heads", "n_freq", "hidden", "pair_hidden", "consistency", "local_linear")
_KNN_PAIRS_PER_CHUNK = 1 << 23  # bounds the (queries x keys) distance matrix of one kNN chunk


@dataclass
class KernelConfig(Config):
    """Kernel settings; the architecture fields (ARCH_FIELDS) must match a weights file's (dicts: core/config.py).

    feat_dim: image-feature channels (12 for MIND-SSC); k: neighbours per query; heads: which attention
    streams to use; dim: attention width; n_heads: attention heads; n_freq: Fourier frequencies of the
    positional encoding; hidden: width of the per-query and per-key MLPs; pair_hidden: width of the
    per-(query, neighbour) MLP of the spatial key (the costly one, kept narrow); bias_scale: s of the
    distance bias, working voxels;
    consistency: feed each key's deviation from its neighbourhood median displacement to the spatial
    key (lets the kernel learn to down-weight outlier matches); local_linear: use the attention
    weights in a weighted local linear fit (value at x of the weighted least-squares affine fit to the
    K keys, with a learned ridge on the slope) instead of a weighted mean, so that linear trends are
    reproduced, not flattened; conf_eps: eps in log(conf + eps);
    tps_smoothing: regularisation of the TPS peer; gaussian_sigma: width of the Gaussian peer, voxels.
    """

    feat_dim: int = 12
    k: int = 30
    heads: str = setting("both", choices=HEADS, help="the learned kernel's attention streams")
    dim: int = 64
    n_heads: int = 4
    n_freq: int = 6
    hidden: int = 176
    pair_hidden: int = 64
    bias_scale: float = 1.0
    consistency: bool = True
    local_linear: bool = False
    conf_eps: float = 1e-3
    tps_smoothing: float = 0.1
    gaussian_sigma: float = 3.0

    def __post_init__(self) -> None:
        if self.heads not in HEADS:
            raise IkrError(f"unknown heads {self.heads!r}; choose one of {', '.join(HEADS)}")
        if self.dim % self.n_heads:
            raise IkrError(f"dim {self.dim} is not a multiple of n_heads {self.n_heads}")
        if self.k < 1 or self.feat_dim < 1 or self.bias_scale <= 0:
            raise IkrError("k and feat_dim must be positive, bias_scale greater than 0")

    def architecture(self) -> dict:
        """The fields that decide the learned kernel's parameter shapes."""
        return {name: getattr(self, name) for name in ARCH_FIELDS}


# ----------------------------------------------------------------------------------------- neighbours


def knn(query_xyz: torch.Tensor, key_xyz: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (B,Q,k) of the k nearest keys of each query, nearest first.

    On the CPU a k-d tree (scipy's cKDTree, both cores); on a GPU torch.cdist + topk in chunks.
    """
    b, q, _ = query_xyz.shape
    n = key_xyz.shape[1]
    k = min(k, n)
    if q == 0:
        return query_xyz.new_zeros((b, 0, k), dtype=torch.long)
    if query_xyz.device.type == "cpu":
        out = []
        for i in range(b):
            tree = cKDTree(key_xyz[i].detach().double().numpy())
            _, idx = tree.query(query_xyz[i].detach().double().numpy(), k=k, workers=-1)
            out.append(torch.from_numpy(np.asarray(idx, dtype=np.int64).reshape(q, k)))
        return torch.stack(out)
    step = max(1, _KNN_PAIRS_PER_CHUNK // max(1, n * b))
    chunks = []
    for start in range(0, q, step):
        dist = torch.cdist(query_xyz[:, start : start + step], key_xyz)
        chunks.append(dist.topk(k, dim=-1, largest=False, sorted=True).indices)
        del dist
    return torch.cat(chunks, dim=1)


def gather_neighbours(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """values (B,N,...) gathered at index (B,Q,K) -> (B,Q,K,...)."""
    batch = torch.arange(values.shape[0], device=values.device).view(-1, 1, 1)
    return values[batch, index]


def _check_inputs(query_xyz: torch.Tensor, key_xyz: torch.Tensor, key_disp: torch.Tensor) -> None:
    """Refuse inputs of the wrong shape with a clear message."""
    if query_xyz.ndim != 3 or query_xyz.shape[-1] != 3:
        raise IkrError(f"query_xyz must be (B, Q, 3), got {tuple(query_xyz.shape)}")
    if key_xyz.ndim != 3 or key_xyz.shape != key_disp.shape or key_xyz.shape[-1] != 3:
        raise IkrError(
            f"key_xyz and key_disp must both be (B, N, 3), got {tuple(key_xyz.shape)}, {tuple(key_disp.shape)}"
        )
    if key_xyz.shape[1] == 0:
        raise IkrError("no keypoints to interpolate from")


def _log_conf(key_conf: torch.Tensor | None, like: torch.Tensor, eps: float) -> torch.Tensor:
    """log(conf + eps) per key (B,N); zeros when no confidence is given."""
    if key_conf is None:
        return like.new_zeros(like.shape[:2])
    return torch.log(key_conf.to(like.dtype).clamp(min=0.0) + eps)


# -------------------------------------------------------------------------------------- the learned one


def fourier_encode(v: torch.Tensor, n_freq: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Fourier features [v, sin(2^i pi v), cos(2^i pi v)] of (..., 3) vectors -> (..., 3 + 6 n_freq).

    `out`: a (..., 3 + 6 n_freq) tensor (a view of a larger buffer may do) to write them into.
    """
    freqs = (2.0 ** torch.arange(n_freq, device=v.device, dtype=v.dtype)) * math.pi
    angles = (v.unsqueeze(-1) * freqs).flatten(-2)
    if out is None:
        return torch.cat([v, torch.sin(angles), torch.cos(angles)], dim=-1)
    n = angles.shape[-1]
    out[..., :3] = v
    torch.sin(angles, out=out[..., 3 : 3 + n])
    torch.cos(angles, out=out[..., 3 + n : 3 + 2 * n])
    return out


def _mlp(n_in: int, hidden: int, n_out: int, layers: int = 2, act: type[nn.Module] = nn.GELU) -> nn.Sequential:
    """A small MLP with `layers` hidden layers of activation `act`."""
    mods: list[nn.Module] = []
    width = n_in
    for _ in range(layers):
        mods += [nn.Linear(width, hidden), act()]
        width = hidden
    mods.append(nn.Linear(width, n_out))
    return nn.Sequential(*mods)


class LearnedKernel(nn.Module):
    """Dual-stream attention kernel over the K nearest keypoints (docs/method.md, section 2)."""

    def __init__(self, config: KernelConfig | None = None) -> None:
        super().__init__()
        self.config = config or KernelConfig()
        c = self.config
        self.query_chunk = 8192
        enc = 3 + 6 * c.n_freq
        self.use_spatial = c.heads in ("both", "spatial")
        self.use_semantic = c.heads in ("both", "semantic")
        if self.use_spatial:
            # query: encoding of x relative to the neighbourhood centroid (scaled by its radius) + log radius
            self.spatial_query = _mlp(enc + 1, c.hidden, c.dim, layers=2)
            # key: encoding of y - x (scaled by the radius), |y - x| and the displacement consistency
            n_key = enc + 1 + (4 if c.consistency else 0)
            self.spatial_key = _mlp(n_key, c.pair_hidden, c.dim, layers=1, act=nn.ReLU)  # per pair: cheap
            self.spatial_out = nn.Linear(c.n_heads, 1, bias=False)
        if self.use_semantic:
            self.semantic_query = _mlp(c.feat_dim, c.hidden, c.dim, layers=2)
            self.semantic_key = _mlp(c.feat_dim, c.hidden, c.dim, layers=2)
            self.semantic_out = nn.Linear(c.n_heads, 1, bias=False)
            # a learned trust of each key from its own features (e.g. flat regions match poorly)
            self.semantic_prior = nn.Linear(c.dim, 1, bias=False)
        self.bias_gain = nn.Parameter(torch.tensor(1.0))
        self.conf_gain = nn.Parameter(torch.tensor(1.0))
        if c.local_linear:
            self.log_ridge = nn.Parameter(torch.tensor(math.log(0.1)))
        for name in ("spatial_out", "semantic_out", "semantic_prior"):
            out = getattr(self, name, None)
            if out is not None:
                nn.init.zeros_(out.weight)  # untrained: logits = log bias + log confidence

    def forward(
        self,
        query_xyz: torch.Tensor,
        query_feat: torch.Tensor | None,
        key_xyz: torch.Tensor,
        key_disp: torch.Tensor,
        key_feat: torch.Tensor | None,
        key_conf: torch.Tensor | None,
    ) -> torch.Tensor:
        """Displacements (B,Q,3) at the queries, interpolated from the keys."""
        key_xyz, key_disp, sem_keys, sem_prior, log_conf = self._prepare_keys(
            query_xyz, query_feat, key_xyz, key_disp, key_feat, key_conf
        )
        out = []
        for start in range(0, query_xyz.shape[1], self.query_chunk):
            sl = slice(start, start + self.query_chunk)
            qf = query_feat[:, sl].float() if self.use_semantic else None
            x = query_xyz[:, sl].float()
            out.append(self._chunk(x, qf, key_xyz, key_disp, sem_keys, sem_prior, log_conf))
        return torch.cat(out, dim=1)

    def neighbour_weights(
        self,
        query_xyz: torch.Tensor,
        query_feat: torch.Tensor | None,
        key_xyz: torch.Tensor,
        key_disp: torch.Tensor,
        key_feat: torch.Tensor | None,
        key_conf: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The kernel as a linear map at the current keys: neighbour indices and weights, both (B,Q,K), such that
        forward(...) == sum_k weights[..., k] * key_disp[idx[..., k]] (key_optimisation.py holds them fixed)."""
        key_xyz, key_disp, sem_keys, sem_prior, log_conf = self._prepare_keys(
            query_xyz, query_feat, key_xyz, key_disp, key_feat, key_conf
        )
        indices, weights = [], []
        for start in range(0, query_xyz.shape[1], self.query_chunk):
            sl = slice(start, start + self.query_chunk)
            qf = query_feat[:, sl].float() if self.use_semantic else None
            idx, w, rel, dist2 = self._attention(query_xyz[:, sl].float(), qf, key_xyz, key_disp, sem_keys, sem_prior,
                                                 log_conf)  # fmt: skip
            if self.config.local_linear:
                w = self._local_linear_weights(w, rel, dist2)
            indices.append(idx)
            weights.append(w)
        return torch.cat(indices, dim=1), torch.cat(weights, dim=1)

    def _prepare_keys(
        self,
        query_xyz: torch.Tensor,
        query_feat: torch.Tensor | None,
        key_xyz: torch.Tensor,
        key_disp: torch.Tensor,
        key_feat: torch.Tensor | None,
        key_conf: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
        """Checked inputs and what every query chunk shares: keys and displacements as float, the semantic keys
        (B,N,dim) and prior (B,N) once per key (None without the semantic head), the log confidences."""
        _check_inputs(query_xyz, key_xyz, key_disp)
        if self.use_semantic and (query_feat is None or key_feat is None):
            raise IkrError(f"the {self.config.heads!r} kernel needs image features at queries and keys")
        key_xyz, key_disp = key_xyz.float(), key_disp.float()
        log_conf = _log_conf(key_conf, key_xyz, self.config.conf_eps)
        sem_keys = sem_prior = None
        if self.use_semantic:
            sem_keys = self.semantic_key(key_feat.float())
            sem_prior = self.semantic_prior(sem_keys).squeeze(-1)
        return key_xyz, key_disp, sem_keys, sem_prior, log_conf

    def _attention(
        self,
        x: torch.Tensor,
        x_feat: torch.Tensor | None,
        key_xyz: torch.Tensor,
        key_disp: torch.Tensor,
        sem_keys: torch.Tensor | None,
        sem_prior: torch.Tensor | None,
        log_conf: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One chunk of queries: neighbour indices, softmax weights (B,Q,K), offsets y - x and their squared lengths."""
        idx = knn(x, key_xyz, self.config.k)
        y = gather_neighbours(key_xyz, idx)  # (B,Q,K,3)
        d = gather_neighbours(key_disp, idx)
        rel = y - x.unsqueeze(2)
        dist2 = (rel * rel).sum(-1)
        log_bias = -torch.log1p(dist2 / self.config.bias_scale**2)
        logits = self.bias_gain * log_bias + self.conf_gain * gather_neighbours(log_conf, idx)
        if self.use_spatial:
            logits = logits + self._spatial_logits(x, y, d, rel, dist2)
        if self.use_semantic:
            emb = gather_neighbours(sem_keys, idx)
            logits = logits + self._semantic_logits(x_feat, emb) + gather_neighbours(sem_prior, idx)
        return idx, torch.softmax(logits, dim=-1), rel, dist2

    def _chunk(
        self,
        x: torch.Tensor,
        x_feat: torch.Tensor | None,
        key_xyz: torch.Tensor,
        key_disp: torch.Tensor,
        sem_keys: torch.Tensor | None,
        sem_prior: torch.Tensor | None,
        log_conf: torch.Tensor,
    ) -> torch.Tensor:
        """One chunk of queries: neighbours, logits, softmax, weighted sum."""
        idx, w, rel, dist2 = self._attention(x, x_feat, key_xyz, key_disp, sem_keys, sem_prior, log_conf)
        d = gather_neighbours(key_disp, idx)
        if self.config.local_linear:
            return self._local_linear(w, rel, dist2, d)
        return (w.unsqueeze(-1) * d).sum(dim=2)

    def _local_linear_weights(self, w: torch.Tensor, rel: torch.Tensor, dist2: torch.Tensor) -> torch.Tensor:
        """The local linear fit's value at x as weights (B,Q,K) on the K keys' displacements (it is linear in them)."""
        normal, weighted = self._local_linear_system(w, rel, dist2)
        first = torch.zeros(normal.shape[:-1], dtype=normal.dtype, device=normal.device)
        first[..., 0] = 1.0
        row = torch.linalg.solve(normal, first)  # the first row of normal^-1 (normal is symmetric)
        return (row.unsqueeze(-2) @ weighted).squeeze(-2)

    def _local_linear(self, w: torch.Tensor, rel: torch.Tensor, dist2: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """Value at x of the weighted least-squares fit d(y) ~ a + B (y - x) over the K keys, ridge on B.

        Offsets are scaled by the neighbourhood's mean distance, so the ridge is scale-free; with a large
        ridge this tends to the weighted mean. Like the mean, it reproduces a constant field exactly.
        """
        normal, weighted = self._local_linear_system(w, rel, dist2)
        return torch.linalg.solve(normal, weighted @ d)[..., 0, :]

    def _local_linear_system(
        self, w: torch.Tensor, rel: torch.Tensor, dist2: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The local linear fit's normal matrix (B,Q,4,4) and weighted design (B,Q,4,K): coefficients N^-1 W d."""
        scale = torch.sqrt(dist2 + 1e-12).mean(dim=-1, keepdim=True).clamp_min(0.5).unsqueeze(-1)
        design = torch.cat([torch.ones_like(rel[..., :1]), rel / scale], dim=-1)  # (B,Q,K,4)
        weighted = (design * w.unsqueeze(-1)).transpose(-1, -2)  # (B,Q,4,K)
        ridge = torch.diag(torch.tensor([0.0, 1.0, 1.0, 1.0], device=w.device, dtype=w.dtype))
        return weighted @ design + torch.exp(self.log_ridge) * ridge, weighted

    def _mixed(self, q: torch.Tensor, mix: nn.Linear) -> torch.Tensor:
        """The head-weighted query (B,Q,dim): sum_h m_h <q_h, k_h> / sqrt(c) is one dot product of k with it."""
        h = self.config.n_heads
        qh = q.unflatten(-1, (h, -1))
        return (qh * mix.weight.view(h, 1)).flatten(-2) / math.sqrt(qh.shape[-1])

    def _heads(self, q: torch.Tensor, k: torch.Tensor, mix: nn.Linear) -> torch.Tensor:
        """Multi-head scaled dot products of q (B,Q,dim) with k (B,Q,K,dim), mixed by `mix` -> (B,Q,K).

        sum_h m_h <q_h, k_h> / sqrt(c) equals one dot product of k with the head-weighted q, computed per
        pair by einsum (no per-pair copies; on the CPU 3x faster than the batched matrix-vector matmul).
        """
        return torch.einsum("bqkc,bqc->bqk", k, self._mixed(q, mix))

    def _spatial_logits(
        self, x: torch.Tensor, y: torch.Tensor, d: torch.Tensor, rel: torch.Tensor, dist2: torch.Tensor
    ) -> torch.Tensor:
        """Spatial head Hs: geometry of the query within its neighbourhood, (B,Q,K).

        The per-pair key is spatial_key's MLP, hidden layer h then the linear map W h + b, and the head
        takes its dot product with the query's mixed vector q: (W h + b) . q = h . (W^T q) + b . q, so
        the last layer is applied to the query (once) instead of to every pair, and the pairs' inputs
        are written into one buffer instead of being concatenated.
        """
        n_freq = self.config.n_freq
        centroid = y.mean(dim=2)
        radius = (y - centroid.unsqueeze(2)).norm(dim=-1).mean(dim=-1).clamp(min=0.5)  # (B,Q)
        scale = radius.unsqueeze(-1)
        q_in = torch.cat([fourier_encode((x - centroid) / scale, n_freq), torch.log(radius).unsqueeze(-1)], -1)
        scale_k = scale.unsqueeze(-1)
        first, _, last = self.spatial_key
        pairs = rel.new_empty((*rel.shape[:-1], first.in_features))  # the pairs' inputs, as _spatial_inputs
        enc = 3 + 6 * n_freq
        fourier_encode(rel / scale_k, n_freq, out=pairs[..., :enc])
        torch.div(torch.sqrt(dist2 + 1e-12).unsqueeze(-1), scale_k, out=pairs[..., enc : enc + 1])
        if self.config.consistency:
            dev = d - d.median(dim=2, keepdim=True).values
            dev_norm = dev.norm(dim=-1, keepdim=True)
            torch.div(dev, 1.0 + dev_norm, out=pairs[..., enc + 1 : enc + 4])
            torch.log1p(dev_norm, out=pairs[..., enc + 4 : enc + 5])
        hidden = torch.relu_(first(pairs))  # (B,Q,K,pair_hidden): spatial_key without its last layer
        q = self._mixed(self.spatial_query(q_in), self.spatial_out)  # (B,Q,dim)
        logits = torch.einsum("bqkc,bqc->bqk", hidden, q @ last.weight)
        return logits + (q @ last.bias).unsqueeze(-1) if last.bias is not None else logits

    def _semantic_logits(self, x_feat: torch.Tensor, key_emb: torch.Tensor) -> torch.Tensor:
        """Semantic head Hf: image features at x against the key embeddings of the features at y, (B,Q,K)."""
        return self._heads(self.semantic_query(x_feat), key_emb, self.semantic_out)


# ------------------------------------------------------------------------------------------- the peers


class GaussianKernel(nn.Module):
    """Nadaraya-Watson over the K nearest keys with weight conf * exp(-r^2 / (2 sigma^2)), sigma in voxels."""

    def __init__(self, sigma: float = 3.0, k: int = 30, conf_eps: float = 1e-3) -> None:
        super().__init__()
        self.sigma, self.k, self.conf_eps = float(sigma), int(k), float(conf_eps)
        self.query_chunk = 65536

    def forward(
        self,
        query_xyz: torch.Tensor,
        query_feat: torch.Tensor | None,
        key_xyz: torch.Tensor,
        key_disp: torch.Tensor,
        key_feat: torch.Tensor | None,
        key_conf: torch.Tensor | None,
    ) -> torch.Tensor:
        """Displacements (B,Q,3); log-domain weights so far queries still get their nearest keys."""
        _check_inputs(query_xyz, key_xyz, key_disp)
        key_xyz, key_disp = key_xyz.float(), key_disp.float()
        log_conf = _log_conf(key_conf, key_xyz, self.conf_eps)
        out = []
        for start in range(0, query_xyz.shape[1], self.query_chunk):
            idx, w = self._weights(query_xyz[:, start : start + self.query_chunk].float(), key_xyz, log_conf)
            out.append((w.unsqueeze(-1) * gather_neighbours(key_disp, idx)).sum(dim=2))
        return torch.cat(out, dim=1)

    def neighbour_weights(
        self,
        query_xyz: torch.Tensor,
        query_feat: torch.Tensor | None,
        key_xyz: torch.Tensor,
        key_disp: torch.Tensor,
        key_feat: torch.Tensor | None,
        key_conf: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Neighbour indices and weights (B,Q,K): forward(...) == sum_k weights[..., k] * key_disp[idx[..., k]]."""
        _check_inputs(query_xyz, key_xyz, key_disp)
        key_xyz = key_xyz.float()
        log_conf = _log_conf(key_conf, key_xyz, self.conf_eps)
        indices, weights = [], []
        for start in range(0, query_xyz.shape[1], self.query_chunk):
            idx, w = self._weights(query_xyz[:, start : start + self.query_chunk].float(), key_xyz, log_conf)
            indices.append(idx)
            weights.append(w)
        return torch.cat(indices, dim=1), torch.cat(weights, dim=1)

    def _weights(
        self, x: torch.Tensor, key_xyz: torch.Tensor, log_conf: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One chunk of queries: the K nearest keys' indices and their softmax weights (B,Q,K)."""
        idx = knn(x, key_xyz, self.k)
        rel = gather_neighbours(key_xyz, idx) - x.unsqueeze(2)
        logits = -(rel * rel).sum(-1) / (2.0 * self.sigma**2) + gather_neighbours(log_conf, idx)
        return idx, torch.softmax(logits, dim=-1)


class TPSKernel(nn.Module):
    """Thin-plate spline (3D polyharmonic kernel r plus an affine part) fitted on all keys.

    Uses scipy's RBFInterpolator (kernel "linear", i.e. -r, the 3D biharmonic spline, degree 1)
    with per-key smoothing `smoothing / conf`: confident keys are followed closely. K and the image
    features are ignored; the interface is the common one.
    """

    def __init__(self, smoothing: float = 0.1, conf_eps: float = 1e-3) -> None:
        super().__init__()
        self.smoothing, self.conf_eps = float(smoothing), float(conf_eps)

    def forward(
        self,
        query_xyz: torch.Tensor,
        query_feat: torch.Tensor | None,
        key_xyz: torch.Tensor,
        key_disp: torch.Tensor,
        key_feat: torch.Tensor | None,
        key_conf: torch.Tensor | None,
    ) -> torch.Tensor:
        """Displacements (B,Q,3) from a spline fitted per batch item (float64 on the CPU)."""
        _check_inputs(query_xyz, key_xyz, key_disp)
        outs = []
        for b in range(query_xyz.shape[0]):
            conf = None if key_conf is None else key_conf[b].detach().cpu().double().numpy()
            values = self._fit_eval(
                key_xyz[b].detach().cpu().double().numpy(),
                key_disp[b].detach().cpu().double().numpy(),
                conf,
                query_xyz[b].detach().cpu().double().numpy(),
            )
            outs.append(torch.from_numpy(values))
        return torch.stack(outs).to(device=query_xyz.device, dtype=torch.float32)

    def _fit_eval(self, keys: np.ndarray, disp: np.ndarray, conf: np.ndarray | None, queries: np.ndarray) -> np.ndarray:
        """Fit the spline on (keys, disp) and evaluate it at queries; degrade gracefully for few keys."""
        from scipy.interpolate import RBFInterpolator

        keys, keep = np.unique(keys, axis=0, return_index=True)
        disp = disp[keep]
        smoothing = self.smoothing if conf is None else self.smoothing / (conf[keep] + self.conf_eps)
        if len(keys) < 5:  # too few for an affine part plus a spline: use the mean
            return np.repeat(disp.mean(axis=0, keepdims=True), len(queries), axis=0)
        try:
            rbf = RBFInterpolator(keys, disp, kernel="linear", degree=1, smoothing=smoothing)
        except np.linalg.LinAlgError:  # coplanar keys: the affine part is not determined
            rbf = RBFInterpolator(keys, disp, kernel="linear", degree=0, smoothing=smoothing)
        return rbf(queries)


# ------------------------------------------------------------------------------------------ factories


def make_kernel(name: str, config: KernelConfig | None = None, weights_path: Path | None = None) -> nn.Module:
    """The kernel for `--kernel learned|tps|gaussian` (learned: from `weights_path` when given), in eval mode."""
    config = config or KernelConfig()
    if name == "tps":
        return TPSKernel(config.tps_smoothing, config.conf_eps).eval()
    if name == "gaussian":
        return GaussianKernel(config.gaussian_sigma, config.k, config.conf_eps).eval()
    if name != "learned":
        raise IkrError(f"unknown kernel {name!r}; choose one of {', '.join(KERNEL_NAMES)}")
    if weights_path is None:
        return LearnedKernel(config).eval()
    kernel, _ = load_weights(weights_path)
    if kernel.config.architecture() != config.architecture():
        wanted = {k: v for k, v in config.architecture().items() if kernel.config.architecture()[k] != v}
        have = {k: kernel.config.architecture()[k] for k in wanted}
        raise IkrError(f"these weights were trained with {have}, not {wanted}", weights_path)
    return kernel.eval()


def kernel_neighbours(kernel: nn.Module) -> int:
    """K, the nearest keys a kernel's value depends on (TPS uses every key: the default K serves its bookkeeping)."""
    if isinstance(kernel, LearnedKernel):
        return kernel.config.k
    if isinstance(kernel, GaussianKernel):
        return kernel.k
    return KernelConfig().k


def count_parameters(module: nn.Module) -> int:
    """The number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


# ------------------------------------------------------------------------------------------ control grid


def control_axes(shape_zyx: tuple[int, int, int], step: int) -> list[torch.Tensor]:
    """Evenly spaced control coordinates per axis (z, y, x), spanning first to last voxel, spacing <= step."""
    axes = []
    for n in shape_zyx:
        m = max(2, math.ceil((n - 1) / step) + 1) if n > 1 else 1
        axes.append(torch.linspace(0.0, n - 1, m, dtype=torch.float64).float())
    return axes


def save_weights(kernel: LearnedKernel, config: KernelConfig, path: Path, metadata: dict) -> Path:
    """Write an ikr-kernel-v1 weights file atomically: format, config, state_dict (CPU), metadata (JSON-able)."""
    return save_module(path, WEIGHTS_FORMAT, config.to_dict(), kernel, metadata)


def load_weights(path: Path) -> tuple[LearnedKernel, dict]:
    """Read an ikr-kernel-v1 file (weights_only) into a LearnedKernel in eval mode; refuse anything else."""
    path = Path(path)
    payload = load_payload(path, WEIGHTS_FORMAT, "kernel")
    try:
        config = KernelConfig.from_dict(dict(payload["config"]), path)
    except (IkrError, TypeError, KeyError) as exc:
        raise IkrError(f"bad kernel config in weights file: {exc}", path) from exc
    kernel = LearnedKernel(config)
    _check_state_dict(kernel, payload.get("state_dict"), path)
    kernel.load_state_dict(payload["state_dict"])
    return kernel.eval(), dict(payload.get("metadata") or {})


def _check_state_dict(kernel: LearnedKernel, state: object, path: Path) -> None:
    """Refuse a state dict whose keys or shapes do not fit the kernel built from the file's config."""
    if not isinstance(state, dict):
        raise IkrError("weights file has no state_dict", path)
    expected = {k: tuple(v.shape) for k, v in kernel.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    wrong = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
    if missing or extra or wrong:
        details = []
        if missing:
            details.append(f"missing {missing[:3]}")
        if extra:
            details.append(f"unexpected {extra[:3]}")
        if wrong:
            details.append(f"shape of {wrong[0]} is {found[wrong[0]]}, expected {expected[wrong[0]]}")
        raise IkrError("architecture mismatch between weights and config: " + "; ".join(details), path)
