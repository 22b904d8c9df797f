"""The dense field of a key set: the kernel evaluated on a control grid, kept up to date locally.

The kernel's value at a point depends only on its K nearest keys (their positions, displacements,
confidences and features), so when keys are added, removed or re-weighted, only the control points
whose K-neighbourhood contains a changed key need to be evaluated again; the rest are kept. The
control grid is sampled trilinearly onto any target grid (the fixed image's own) in LPS mm.

Regions (optional; the lungs against everything else): a label volume on the working grid. A key
belongs to the region at its position and a point attends only to the keys of its own region (a
region without keys uses every key), so the field may slide at a region's boundary. Each region has
its own control values wherever its voxels can reach them through trilinear interpolation: the first
rows of the control points are the control grid, each point in its own region; rows after them
evaluate grid points again for a neighbouring region ("ghosts"). The field is the regions' fields
weighted by each region's indicator smoothed by REGION_BLEND_VOX (a Gaussian cut at two sigmas): a
tangential jump spread over a few millimetres, as in a CT, where a hard switch between two
independently estimated fields folds the grid wherever their normal components disagree.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from scipy import ndimage

from ..core.fields import Field
from ..core.geometry import Geometry
from .alignment import Alignment
from .features import sample_features
from .kernel import TPSKernel, control_axes, kernel_neighbours, knn
from .residual import ResidualSettings, fit_residual, sample_grid, sample_points

# sigma (working voxels) of the regions' blend across their boundary, cut at REGION_BLEND_RADIUS_VOX (a region's
# weight is zero beyond it). On bench's ev-thorax-sliding-s0 (2 mm grid) a hard switch folded 0.42 % of the body,
# sigma 1 (cut at 2) 0.002 %, sigma 1.5 (cut at 3) none: TRE 0.71 and 0.77 mm, SDlogJ 0.091 and 0.059 (the true
# field's 0.071); one region for all: 1.15 mm.
REGION_BLEND_VOX = 1.5
REGION_BLEND_RADIUS_VOX = 3

Box = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]  # ((z0, z1), (y0, y1), (x0, x1)), end excluded
EMPTY_BOX: Box = ((0, 0), (0, 0), (0, 0))


class DenseModel:
    """Kernel values on a control grid of the working grid, with each control point's K nearest keys.

    The control step comes from the registration's settings (RegistrationConfig.control_step_vox), K
    from the kernel (kernel_neighbours).
    """

    def __init__(
        self,
        kernel: torch.nn.Module,
        features: torch.Tensor | None,
        working: Geometry,
        control_step_vox: int,
        chunk: int = 16384,
        alignment: Alignment | None = None,
        regions: torch.Tensor | None = None,
    ) -> None:
        self.kernel = kernel
        self.alignment = None if alignment is None or alignment.is_identity else alignment
        # TPS is fitted on every key at once: any change moves the whole field, so it is not local.
        self.local = not isinstance(kernel, TPSKernel)
        self.features = features
        self.working = working
        self.k = kernel_neighbours(kernel)  # the keys a control value depends on (its kernel's K)
        self.chunk = chunk
        self.device = features.device if features is not None else torch.device("cpu")
        axes = control_axes(working.shape_zyx, max(1, int(control_step_vox)))
        self.control_shape = tuple(len(a) for a in axes)
        zz, yy, xx = torch.meshgrid(*axes, indexing="ij")
        grid = torch.stack([xx, yy, zz], dim=-1).reshape(-1, 3).to(self.device)
        # regions: (D, H, W) integer labels on the working grid, or None (one region, every key)
        self.regions = None if regions is None else regions.to(self.device).long()
        self.n_regions = 1 if self.regions is None else int(self.regions.max()) + 1
        self.region_weights = None if self.regions is None else blend_weights(self.regions, self.n_regions)
        grid_index = torch.arange(grid.shape[0], device=self.device)
        self.point_grid, self.point_region = grid_index, self.region_at(grid)
        if self.regions is not None:
            # a voxel with some weight of a region interpolates from control points this close to that region
            reach = max(1, int(control_step_vox)) + REGION_BLEND_RADIUS_VOX + 2
            ghosts = [
                grid_index[(self.point_region != r) & _near_region(self.regions == r, grid, reach)]
                for r in range(self.n_regions)
            ]
            self.point_grid = torch.cat([grid_index, *ghosts])
            labels = [torch.full_like(g, r) for r, g in enumerate(ghosts)]
            self.point_region = torch.cat([self.point_region, *labels])
        self.points = grid[self.point_grid]
        self.point_features = None if features is None else sample_features(features, self.points)
        self.values = torch.zeros(self.points.shape[0], 3, device=self.device)
        self.neighbours = torch.zeros(self.points.shape[0], 0, dtype=torch.long, device=self.device)
        self.kth_distance = torch.full((self.points.shape[0],), float("inf"), device=self.device)
        self.keys = torch.zeros(0, 3, device=self.device)
        self.disp = torch.zeros(0, 3, device=self.device)
        self.conf = torch.zeros(0, device=self.device)
        self.key_features: torch.Tensor | None = None
        self.key_region = torch.zeros(0, dtype=torch.long, device=self.device)
        self._target_weights: dict[tuple, np.ndarray] = {}
        # A smooth residual (1, 3, z, y, x) in working voxels on a grid spanning the working grid, added to
        # the kernel field everywhere (residual.py); the keys never change it, so refinement leaves it in place.
        self.residual: torch.Tensor | None = None

    def set_keys(self, key_xyz: torch.Tensor, key_disp: torch.Tensor, key_conf: torch.Tensor) -> None:
        """Replace the key set (working voxels, x y z) and evaluate every control point."""
        self._store_keys(key_xyz, key_disp, key_conf)
        self._evaluate(torch.arange(self.points.shape[0], device=self.device))

    def update_keys(self, key_xyz: torch.Tensor, key_disp: torch.Tensor, key_conf: torch.Tensor) -> torch.Tensor:
        """Replace the keys after a local change; re-evaluate only the affected control points.

        Keys are compared index by index with the previous set: a control point is re-evaluated when
        its K nearest keys included an old key that is gone or changed, or when a new or changed key
        falls within its K-nearest distance. Returns the indices of the re-evaluated control points.
        """
        old_keys, old_disp, old_conf = self.keys, self.disp, self.conf
        old_empty = self._empty_regions()
        self._store_keys(key_xyz, key_disp, key_conf)
        if not self.local or self._empty_regions() != old_empty:
            everything = torch.arange(self.points.shape[0], device=self.device)
            self._evaluate(everything)
            return everything
        affected = torch.zeros(self.points.shape[0], dtype=torch.bool, device=self.device)
        changed_old = torch.nonzero(
            _differing_keys(self.keys, self.disp, self.conf, old_keys, old_disp, old_conf)
        ).reshape(-1)
        if changed_old.numel() and self.neighbours.numel():
            affected |= torch.isin(self.neighbours, changed_old).any(dim=1)
        new_or_changed = _differing_keys(old_keys, old_disp, old_conf, self.keys, self.disp, self.conf)
        empty = torch.tensor(self._empty_regions(), dtype=torch.bool, device=self.device)
        for key, region in zip(self.keys[new_or_changed], self.key_region[new_or_changed], strict=True):
            dist = torch.linalg.vector_norm(self.points - key, dim=1)
            attends = (self.point_region == region) | empty[self.point_region]
            affected |= (dist <= self.kth_distance) & attends
        index = torch.nonzero(affected).reshape(-1)
        self._evaluate(index)
        return index

    def copy(self) -> DenseModel:
        """A model that shares the kernel and the image features but owns its keys and control values."""
        other = copy.copy(self)
        other.values = self.values.clone()
        other.neighbours = self.neighbours.clone()
        other.kth_distance = self.kth_distance.clone()
        return other

    def restore(
        self,
        control: torch.Tensor,
        values: torch.Tensor,
        neighbours: torch.Tensor,
        kth_distance: torch.Tensor,
        keys: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    ) -> None:
        """Put back saved control points (values, neighbours, K-th distances) and the key set they were made from."""
        self.values[control] = values
        self.neighbours[control] = neighbours
        self.kth_distance[control] = kth_distance
        self._store_keys(*keys)

    def _store_keys(self, key_xyz: torch.Tensor, key_disp: torch.Tensor, key_conf: torch.Tensor) -> None:
        """Keep the keys and their sampled features."""
        self.keys = key_xyz.float().to(self.device)
        self.disp = key_disp.float().to(self.device)
        self.conf = key_conf.float().to(self.device)
        self.key_features = None if self.features is None else sample_features(self.features, self.keys)
        self.key_region = self.region_at(self.keys)

    def region_at(self, points_xyz: torch.Tensor) -> torch.Tensor:
        """The region label (N,) at working-grid points (nearest voxel; 0 everywhere without regions)."""
        points_xyz = points_xyz.to(self.device)
        if self.regions is None:
            return torch.zeros(points_xyz.shape[0], dtype=torch.long, device=self.device)
        size = torch.tensor(self.regions.shape[::-1], device=self.device)
        index = torch.minimum(torch.round(points_xyz).long().clamp(min=0), size - 1)
        return self.regions[index[:, 2], index[:, 1], index[:, 0]]

    def _empty_regions(self) -> tuple[bool, ...]:
        """Per region: whether it has no key (its points then attend to every key)."""
        counts = torch.bincount(self.key_region, minlength=self.n_regions)
        return tuple(bool(c == 0) for c in counts.tolist())

    def _evaluate(self, index: torch.Tensor) -> None:
        """Evaluate the kernel (and the K nearest keys) at the control points `index`, region by region, in chunks."""
        if index.numel() == 0:
            return
        k = min(self.k, self.keys.shape[0])
        if self.neighbours.shape[1] != k:
            self.neighbours = torch.zeros(self.points.shape[0], k, dtype=torch.long, device=self.device)
        for queries, keys in split_by_region(self.point_region[index], self.key_region, self.n_regions):
            self._evaluate_with(index[queries], keys, k)

    def _evaluate_with(self, index: torch.Tensor, key_index: torch.Tensor, k: int) -> None:
        """Evaluate the control points `index` from the keys `key_index` alone; neighbours padded to `k` columns."""
        every = key_index.numel() == self.keys.shape[0]  # split_by_region keeps the order: all keys as they are
        pick = slice(None) if every else key_index
        keys, disp, conf = self.keys[pick][None], self.disp[pick][None], self.conf[pick][None]
        key_feat = None if self.key_features is None else self.key_features[pick][None]
        with torch.no_grad():
            for start in range(0, index.numel(), self.chunk):
                sel = index[start : start + self.chunk]
                q = self.points[sel][None]
                q_feat = None if self.point_features is None else self.point_features[sel][None]
                self.values[sel] = self.kernel(q, q_feat, keys, disp, key_feat, conf)[0]
                nn_idx = key_index[knn(q, keys, k)[0]]
                if nn_idx.shape[1] < k:  # a region with fewer keys than K: repeat its farthest neighbour
                    nn_idx = torch.cat([nn_idx, nn_idx[:, -1:].expand(-1, k - nn_idx.shape[1])], dim=1)
                self.neighbours[sel] = nn_idx
                self.kth_distance[sel] = torch.linalg.vector_norm(self.keys[nn_idx[:, -1]] - q[0], dim=1)

    def fit_residual(
        self, moving_features: torch.Tensor, mask: torch.Tensor, settings: ResidualSettings, seed: int = 0
    ) -> dict:
        """Fit the residual to the images (residual.py) on top of the current kernel field; returns its summary.

        The fixed image's descriptors are the model's own features (MIND-SSC of the fixed working image);
        `moving_features` are the moving image's, on the working grid; `mask` (1, 1, D, H, W) bool: where
        the image term is measured.
        """
        if self.features is None:
            raise ValueError("the residual needs the fixed image's features")
        points = sample_points(mask, settings.points, seed).to(self.device)
        with torch.enable_grad():
            base = self.kernel_at(points)
            self.residual, summary = fit_residual(self.features, moving_features, base, points, settings)
        return summary

    def control_volume(self, region: int | None = None) -> torch.Tensor:
        """The control-grid displacement (1, 3, cz, cy, cx) in working voxels (x, y, z): each grid point in its
        own region, or (`region` given) the values of that region (zero where its voxels never reach)."""
        n_grid = math.prod(self.control_shape)
        if region is None:
            return self.values[:n_grid].t().reshape(1, 3, *self.control_shape)
        rows = self.point_region == region
        grid = torch.zeros(n_grid, 3, device=self.device, dtype=self.values.dtype)
        grid[self.point_grid[rows]] = self.values[rows]
        return grid.t().reshape(1, 3, *self.control_shape)

    def kernel_at(self, points_xyz: torch.Tensor) -> torch.Tensor:
        """The kernel field alone (N, 3), working voxels, at working-grid points (trilinear from the control grid;
        with regions, the regions' fields blended by their weights there)."""
        points_xyz = points_xyz.to(self.device)
        if self.regions is None:
            return sample_grid(self.control_volume(), points_xyz, self.working.shape_zyx)
        out = torch.zeros(points_xyz.shape[0], 3, device=self.device)
        weights = sample_grid(self.region_weights, points_xyz, self.working.shape_zyx)  # (N, R)
        for r in range(self.n_regions):
            sel = weights[:, r] > 0
            if bool(sel.any()):
                field = sample_grid(self.control_volume(r), points_xyz[sel], self.working.shape_zyx)
                out[sel] += weights[sel, r : r + 1] * field
        return out

    def point_weights(
        self, points_xyz: torch.Tensor, key_xyz: torch.Tensor, key_disp: torch.Tensor, key_conf: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Take these keys and return the kernel at working-grid points as a linear map of their displacements: key
        indices and weights (Q, K) with kernel(points) == sum_k weights[:, k, None] * key_disp[index[:, k]], each point
        attending to the keys of its region (a region with fewer than K keys pads with weight 0). The control values
        are left for `set_keys` to evaluate. Needs a kernel with `neighbour_weights` (learned, Gaussian; not TPS)."""
        if not hasattr(self.kernel, "neighbour_weights"):
            raise ValueError(f"{type(self.kernel).__name__} has no neighbour weights (it is not a local kernel)")
        self._store_keys(key_xyz, key_disp, key_conf)
        points_xyz = points_xyz.to(self.device)
        k = min(self.k, self.keys.shape[0])
        index = torch.zeros(points_xyz.shape[0], k, dtype=torch.long, device=self.device)
        weights = torch.zeros(points_xyz.shape[0], k, device=self.device)
        point_features = None if self.features is None else sample_features(self.features, points_xyz)
        with torch.no_grad():
            for queries, key_index in split_by_region(self.region_at(points_xyz), self.key_region, self.n_regions):
                key_feat = None if self.key_features is None else self.key_features[key_index][None]
                for start in range(0, queries.numel(), self.chunk):
                    sel = queries[start : start + self.chunk]
                    idx, w = self.kernel.neighbour_weights(
                        points_xyz[sel][None], None if point_features is None else point_features[sel][None],
                        self.keys[key_index][None], self.disp[key_index][None], key_feat, self.conf[key_index][None],
                    )  # fmt: skip
                    n = idx.shape[2]
                    index[sel, :n] = key_index[idx[0]]
                    weights[sel, :n] = w[0]
                    if n < k:
                        index[sel, n:] = index[sel, :1]
        return index, weights

    def target_weights(self, target: Geometry) -> np.ndarray | None:
        """Each region's blend weight (R, z, y, x) float32 on `target` (trilinear from the working grid, its edge
        beyond it, as the field), or None without regions; kept per target grid."""
        if self.regions is None:
            return None
        key = (target.size, target.spacing_mm, target.origin_lps, tuple(np.ravel(target.direction)))
        if key not in self._target_weights:
            out = []
            for weight in self.region_weights[0].cpu().numpy():
                image = sitk.GetImageFromArray(weight)
                self.working.apply_to_sitk(image)
                resampled = sitk.Resample(
                    image, target.reference_image(), sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32, True
                )
                out.append(sitk.GetArrayFromImage(resampled))
            self._target_weights[key] = np.stack(out)
        return self._target_weights[key]

    def residual_at(self, points_xyz: torch.Tensor) -> torch.Tensor:
        """The residual alone (N, 3), working voxels, at working-grid points (zero when there is none)."""
        points_xyz = points_xyz.to(self.device)
        if self.residual is None:
            return torch.zeros(points_xyz.shape[0], 3, device=self.device)
        return sample_grid(self.residual, points_xyz, self.working.shape_zyx)

    def at_points(self, points_xyz: torch.Tensor) -> torch.Tensor:
        """Displacement (N, 3) in working voxels at working-grid points: kernel field plus residual."""
        return self.kernel_at(points_xyz) + self.residual_at(points_xyz)

    def field_on(self, target: Geometry, box: Box | None = None, out: Field | None = None) -> Field:
        """The displacement in LPS mm on `target`'s voxels (only the index box of `out` when given)."""
        if out is None:
            out = Field(np.zeros((*target.shape_zyx, 3), dtype=np.float32), target)
        (z0, z1), (y0, y1), (x0, x1) = box or full_box(target)
        if z1 <= z0 or y1 <= y0 or x1 <= x0:
            return out
        to_working = np.linalg.inv(self.working.index_to_lps_matrix()) @ target.index_to_lps_matrix()
        to_mm = self.working.voxel_to_mm_matrix()
        box = ((z0, z1), (y0, y1), (x0, x1))
        off_diagonal = to_working[:3, :3] - np.diag(np.diag(to_working[:3, :3]))
        if np.abs(off_diagonal).max() < 1e-9:  # target axes parallel to the working axes: separable
            self._separable_into(out, box, to_working, to_mm)
        else:
            self._sampled_into(out, box, to_working, to_mm)
        if self.alignment is not None:
            self._align_into(out, box)
        return out

    def key_displacement_mm(self, fixed_lps: np.ndarray, moving_lps: np.ndarray) -> np.ndarray:
        """The displacement (N, 3) in mm that a key at `fixed_lps` needs so that the field maps it to `moving_lps`."""
        moving = np.asarray(moving_lps, dtype=np.float64)
        aligned = moving if self.alignment is None else self.alignment.inverse_apply(moving)
        return aligned - np.asarray(fixed_lps, dtype=np.float64)

    def _align_into(self, out: Field, box: Box) -> None:
        """Compose the alignment in a box of `out`: d(x) <- A(x + d(x)) - x = M d(x) + (M - I) x + t."""
        (z0, z1), (y0, y1), (x0, x1) = box
        target = out.geometry
        matrix = self.alignment.matrix
        shift = (matrix - np.eye(3)) @ target.index_to_lps_matrix()[:3, :3]
        offset = (matrix - np.eye(3)) @ target.index_to_lps_matrix()[:3, 3] + self.alignment.translation
        yy, xx = np.meshgrid(np.arange(y0, y1), np.arange(x0, x1), indexing="ij")
        in_plane = xx[..., None] * shift[:, 0] + yy[..., None] * shift[:, 1] + offset  # (ny, nx, 3)
        for z in range(z0, z1):
            block = out.displacement_mm[z, y0:y1, x0:x1]
            block[...] = (block @ matrix.T.astype(np.float32)) + (in_plane + z * shift[:, 2]).astype(np.float32)

    def _axis_weights(self, axis: int, lo: int, hi: int, scale: float, shift: float, m: int) -> torch.Tensor:
        """Linear-interpolation matrix (hi - lo, m) from m evenly spaced points spanning working axis `axis`
        (x=0) to target indices lo..hi-1 whose working coordinate is scale * t + shift (clamped at the border)."""
        n = self.working.size[axis]
        t = torch.arange(lo, hi, dtype=torch.float64, device=self.device)
        c = (scale * t + shift) * ((m - 1) / max(1, n - 1)) if m > 1 else torch.zeros_like(t)
        c = c.clamp(0.0, m - 1)
        left = c.floor().clamp(max=max(0, m - 2)).long()
        frac = (c - left).float()
        weights = torch.zeros(hi - lo, m, device=self.device)
        rows = torch.arange(hi - lo, device=self.device)
        weights[rows, left] = 1.0 - frac
        if m > 1:
            weights[rows, left + 1] += frac
        return weights

    def _separable_into(self, out: Field, box: Box, to_working: np.ndarray, to_mm: np.ndarray) -> None:
        """Trilinear interpolation as three small matrix products (axis-aligned target), slab by slab."""
        (z0, z1), (y0, y1), (x0, x1) = box
        m = torch.tensor(to_mm, dtype=torch.float32, device=self.device)
        if self.regions is not None:
            self._separable_regions_into(out, box, to_working, m)
            return
        grids = [(self.values @ m.T).t().reshape(3, *self.control_shape)]  # (3, cz, cy, cx), mm
        if self.residual is not None:
            grids.append(torch.einsum("kc,czyx->kzyx", m, self.residual[0]))
        parts = self._planes(grids, box, to_working)
        ny, nx = y1 - y0, x1 - x0
        if not out.displacement_mm.flags.writeable:
            raise ValueError("the field to write into is read-only")
        target = torch.from_numpy(out.displacement_mm)  # the field's own memory: written in place
        slab = max(1, 1_000_000 // max(1, ny * nx))
        # one buffer for every slab: fresh memory costs the kernel's page zeroing (0.5 s of system time on the thorax)
        buffer = torch.empty(3 * min(slab, z1 - z0) * ny * nx, device=self.device)
        for start in range(z0, z1, slab):
            stop = min(z1, start + slab)
            values = buffer[: 3 * (stop - start) * ny * nx].view(3, stop - start, ny * nx)
            for k, (wz, plane) in enumerate(parts):  # (3, z, y * x): a batched matrix product per grid
                rows = wz[start - z0 : stop - z0].expand(3, -1, -1)
                if k == 0:
                    torch.bmm(rows, plane.flatten(2), out=values)
                else:
                    values.baddbmm_(rows, plane.flatten(2))
            # one strided copy into the (z, y, x, 3) field (numpy's copy of a permuted view took 0.5 s on the thorax)
            target[start:stop, y0:y1, x0:x1].copy_(values.view(3, stop - start, ny, nx).permute(1, 2, 3, 0))

    def _separable_regions_into(self, out: Field, box: Box, to_working: np.ndarray, m: torch.Tensor) -> None:
        """The separable interpolation with regions: each region's control values, each voxel its region's."""
        (z0, z1), (y0, y1), (x0, x1) = box
        weights = torch.from_numpy(self.target_weights(out.geometry)[:, z0:z1, y0:y1, x0:x1]).to(self.device)
        region_parts = []
        for r in range(self.n_regions):
            grid = torch.einsum("kc,czyx->kzyx", m, self.control_volume(r)[0])
            region_parts.append(self._planes([grid], box, to_working))
        residual = None
        if self.residual is not None:
            residual = self._planes([torch.einsum("kc,czyx->kzyx", m, self.residual[0])], box, to_working)
        slab = max(1, 4_000_000 // max(1, (y1 - y0) * (x1 - x0)))
        for start in range(z0, z1, slab):
            stop = min(z1, start + slab)
            values = torch.zeros(stop - start, y1 - y0, x1 - x0, 3, device=self.device)
            for r, parts in enumerate(region_parts):
                here = weights[r, start - z0 : stop - z0]
                if not bool((here > 0).any()):
                    continue
                wz, plane = parts[0]
                region_values = torch.einsum("zc,kcyx->zyxk", wz[start - z0 : stop - z0], plane)
                values += region_values * here.unsqueeze(-1)
            if residual is not None:
                wz, plane = residual[0]
                values += torch.einsum("zc,kcyx->zyxk", wz[start - z0 : stop - z0], plane)
            out.displacement_mm[start:stop, y0:y1, x0:x1] = values.cpu().numpy()

    def _planes(self, grids: list[torch.Tensor], box: Box, to_working: np.ndarray) -> list:
        """Per control grid (3, cz, cy, cx): its z weights and its in-plane interpolation (3, cz, ny, nx) over `box`."""
        (z0, z1), (y0, y1), (x0, x1) = box
        parts = []
        for grid in grids:
            cz, cy, cx = grid.shape[1:]
            wx = self._axis_weights(0, x0, x1, to_working[0, 0], to_working[0, 3], cx)
            wy = self._axis_weights(1, y0, y1, to_working[1, 1], to_working[1, 3], cy)
            wz = self._axis_weights(2, z0, z1, to_working[2, 2], to_working[2, 3], cz)
            parts.append((wz, torch.matmul(wy, torch.matmul(grid, wx.t()))))  # in plane: (3, cz, ny, nx)
        return parts

    def _sampled_into(self, out: Field, box: Box, to_working: np.ndarray, to_mm: np.ndarray) -> None:
        """Trilinear interpolation by grid_sample at every target voxel (any orientation), slab by slab."""
        (z0, z1), (y0, y1), (x0, x1) = box
        a = torch.tensor(to_working[:3, :3], dtype=torch.float32, device=self.device)
        b = torch.tensor(to_working[:3, 3], dtype=torch.float32, device=self.device)
        m = torch.tensor(to_mm, dtype=torch.float32, device=self.device)
        ny, nx = y1 - y0, x1 - x0
        yy, xx = torch.meshgrid(
            torch.arange(y0, y1, device=self.device, dtype=torch.float32),
            torch.arange(x0, x1, device=self.device, dtype=torch.float32),
            indexing="ij",
        )
        slab = max(1, 2_000_000 // max(1, nx * ny))
        for start in range(z0, z1, slab):
            stop = min(z1, start + slab)
            zz = torch.arange(start, stop, device=self.device, dtype=torch.float32)
            idx = torch.stack(
                [xx.expand(len(zz), -1, -1), yy.expand(len(zz), -1, -1), zz[:, None, None].expand(-1, ny, nx)], -1
            )
            disp_vox = self.at_points((idx.reshape(-1, 3) @ a.T) + b)
            values = (disp_vox @ m.T).reshape(stop - start, ny, nx, 3).cpu().numpy()
            out.displacement_mm[start:stop, y0:y1, x0:x1] = values

    def target_box(self, target: Geometry, control_index: torch.Tensor) -> Box:
        """The index box of `target` that the control points `control_index` (plus one cell) influence."""
        if control_index.numel() == 0:
            return EMPTY_BOX
        cz, cy, cx = self.control_shape
        iz, iy, ix = np.unravel_index(self.point_grid[control_index].cpu().numpy(), (cz, cy, cx))
        step = np.array(
            [(n - 1) / max(1, c - 1) for n, c in zip(self.working.shape_zyx[::-1], (cx, cy, cz), strict=True)]
        )
        lo = np.array([ix.min() - 1, iy.min() - 1, iz.min() - 1]) * step
        hi = np.array([ix.max() + 1, iy.max() + 1, iz.max() + 1]) * step
        corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
        t_idx = target.lps_to_index(self.working.index_to_lps(corners))
        return index_box(t_idx.min(axis=0), t_idx.max(axis=0), target)


def split_by_region(
    query_region: torch.Tensor, key_region: torch.Tensor, n_regions: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per region with queries: (query indices, key indices) of that region; a region without keys takes every key."""
    out = []
    for r in range(n_regions):
        queries = torch.nonzero(query_region == r).reshape(-1)
        if queries.numel() == 0:
            continue
        keys = torch.nonzero(key_region == r).reshape(-1)
        if keys.numel() == 0:
            keys = torch.arange(key_region.shape[0], device=key_region.device)
        out.append((queries, keys))
    return out


def blend_weights(regions: torch.Tensor, n_regions: int) -> torch.Tensor:
    """Each region's indicator smoothed by REGION_BLEND_VOX (Gaussian cut at REGION_BLEND_RADIUS_VOX), (1, R, D, H, W);
    they sum to one everywhere."""
    labels = regions.cpu().numpy()
    truncate = REGION_BLEND_RADIUS_VOX / REGION_BLEND_VOX
    smoothed = [
        ndimage.gaussian_filter((labels == r).astype(np.float32), REGION_BLEND_VOX, mode="nearest", truncate=truncate)
        for r in range(n_regions)
    ]
    weights = np.stack(smoothed)
    weights /= weights.sum(axis=0, keepdims=True)
    return torch.from_numpy(weights)[None].to(regions.device)


def _near_region(mask: torch.Tensor, points_xyz: torch.Tensor, reach: int) -> torch.Tensor:
    """Which working-grid points (N,) lie within `reach` voxels (along every axis) of a voxel of `mask` (D, H, W)."""
    grown = mask.float()[None, None]
    for axis in range(3):
        size = [1, 1, 1]
        size[axis] = 2 * reach + 1
        grown = F.max_pool3d(grown, tuple(size), stride=1, padding=tuple(s // 2 for s in size))
    size = torch.tensor(mask.shape[::-1], device=mask.device)
    index = torch.minimum(torch.round(points_xyz).long().clamp(min=0), size - 1)
    return grown[0, 0, index[:, 2], index[:, 1], index[:, 0]] > 0


def full_box(geometry: Geometry) -> Box:
    """The index box ((z0, z1), (y0, y1), (x0, x1)) of a whole grid."""
    return ((0, geometry.size[2]), (0, geometry.size[1]), (0, geometry.size[0]))


def index_box(lo_xyz: np.ndarray, hi_xyz: np.ndarray, geometry: Geometry, pad: int = 1) -> Box:
    """The integer index box covering continuous indices lo..hi (x, y, z) plus `pad`, clipped to the grid."""
    lo = np.floor(np.asarray(lo_xyz)) - pad
    hi = np.ceil(np.asarray(hi_xyz)) + pad + 1
    size = np.asarray(geometry.size)
    lo, hi = np.clip(lo, 0, size).astype(int), np.clip(hi, 0, size).astype(int)
    return ((lo[2], hi[2]), (lo[1], hi[1]), (lo[0], hi[0]))


def union_box(a: Box, b: Box) -> Box:
    """The smallest box covering two boxes (an empty box is ignored)."""
    boxes = [x for x in (a, b) if all(hi > lo for lo, hi in x)]
    if not boxes:
        return EMPTY_BOX
    return tuple((min(x[i][0] for x in boxes), max(x[i][1] for x in boxes)) for i in range(3))  # type: ignore[return-value]


def box_slices(box: Box) -> tuple[slice, slice, slice]:
    """numpy slices (z, y, x) of a box."""
    return tuple(slice(lo, hi) for lo, hi in box)  # type: ignore[return-value]


def _differing_keys(
    old_xyz: torch.Tensor,
    old_disp: torch.Tensor,
    old_conf: torch.Tensor,
    new_xyz: torch.Tensor,
    new_disp: torch.Tensor,
    new_conf: torch.Tensor,
) -> torch.Tensor:
    """Boolean mask over the new keys: those not present, identically, in the old key set."""
    old = torch.cat([old_xyz, old_disp, old_conf[:, None]], dim=1)
    new = torch.cat([new_xyz, new_disp, new_conf[:, None]], dim=1)
    if old.shape[0] == 0:
        return torch.ones(new.shape[0], dtype=torch.bool, device=new.device)
    n = min(old.shape[0], new.shape[0])
    differs = torch.ones(new.shape[0], dtype=torch.bool, device=new.device)
    differs[:n] = (old[:n] != new[:n]).any(dim=1)
    return differs
