"""Patch sampling from preprocessed cases: random or lesion-centred, read through memory maps.

Where a patch lies (per axis, in voxels of the preprocessed volume):

- *random*: the final patch starts anywhere in ``[0, n - P]`` for a volume of ``n`` voxels and a patch of
  ``P``, so it lies inside the volume; where the volume is smaller than the patch (``n < P``) the volume
  lies anywhere inside the patch and the rest is padding (data 0, labels 0).
- *lesion-forced*: the patch is centred on a random lesion voxel (from ``CASE_lesion.npy``) shifted by a
  uniform random integer offset of up to ``max_offset_fraction`` x ``P`` per axis, so the lesion is not
  always in the middle (acute stroke paper), then moved inside the range above. The chosen lesion voxel
  always stays inside the final patch (offsets are capped at half a patch for that). A case without
  lesion falls back to a random patch.

Larger patches for spatial augmentation: rotation and scaling look at voxels outside the final patch, so,
as in nnU-Net, the sampler reads a larger *sampling* patch ``S`` centred on the final patch ``P`` (see
``autoseg.train.augmentation.sampling_patch_size``) and ``SpatialTransform`` crops the centre back to ``P``
(``random_crop=False``). The placement rules above apply to the final patch; the margin ``(S - P) / 2``
around it reads real neighbouring voxels where there are any and zeros beyond the volume.

2-D configurations (``dimension`` 2, ``slice_axis`` s): one slice along s, i.e. a patch of edge 1 along s
(a lesion-forced slice contains the chosen lesion voxel), returned without that axis: (C, P0, P1) with the
in-plane axes in their volume order.

Which samples of a batch are lesion-forced (nnU-Net's rule): the *last* ``max(1, round(B x ratio))``
samples of a batch of ``B`` when ``ratio > 0`` (rounded half up, at most ``B``), none when ``ratio`` is 0.
Forcing a fixed count per batch, instead of tossing a coin per sample, keeps the lesion share steady
from one iteration to the next; at least one forced sample means every batch of a lesion dataset shows
lesion even for small batches.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage

from autoseg.io.files import load_array

Shape = tuple[int, ...]
"""Per-axis voxel counts in (x, y, z) order (or the two in-plane axes of a 2-D patch)."""


def forced_count(batch_size: int, ratio: float) -> int:
    """How many samples of a batch are lesion-forced: ``max(1, round(batch_size * ratio))`` for ratio > 0
    (half rounded up; at most ``batch_size``), 0 for ratio 0."""
    if ratio <= 0:
        return 0
    return min(batch_size, max(1, math.floor(batch_size * ratio + 0.5)))


class PatchSampler:
    """Draws patches from the preprocessed cases in ``folder``.

    Args:
        folder: preprocessed data folder (``CASE.npy`` (C, X, Y, Z), ``CASE_seg.npy``, ``CASE_lesion.npy``).
        identifiers: the cases this sampler may draw from.
        patch_size: size of the patches it returns: the *sampling* patch, possibly enlarged for spatial
            augmentation; 3 entries, or 2 (the in-plane axes) with ``slice_axis``.
        foreground_oversampling: share of lesion-forced samples per batch (see :meth:`forced_in_batch`).
        max_offset_fraction: largest shift of a lesion-centred patch, as a fraction of the final patch edge.
        rng: the generator for every random choice; may be replaced (``sampler.rng = ...``) to reseed.
        final_patch_size: the patch the network sees, centred in ``patch_size``; default ``patch_size``.
        slice_axis: for 2-D sampling, the volume axis the slices are taken along; None for 3-D.

    Raises:
        ValueError: sizes that disagree (wrong length, final patch larger than the sampling patch).

    Example:
        >>> sampler = PatchSampler(folder, ["case_1"], (96, 96, 96), foreground_oversampling=0.33,
        ...                        max_offset_fraction=0.5, rng=np.random.default_rng(0))
        >>> data, seg = sampler.sample("case_1", force_lesion=True)  # (C, 96, 96, 96), (1, 96, 96, 96)
    """

    def __init__(
        self,
        folder: Path,
        identifiers: Sequence[str],
        patch_size: Sequence[int],
        *,
        foreground_oversampling: float,
        max_offset_fraction: float,
        rng: np.random.Generator,
        final_patch_size: Sequence[int] | None = None,
        slice_axis: int | None = None,
        lesion_choice: str = "voxel",
    ) -> None:
        self.folder = Path(folder)
        self.identifiers = list(identifiers)
        self.patch_size: Shape = tuple(int(p) for p in patch_size)
        self.final_patch_size: Shape = tuple(int(p) for p in (final_patch_size or patch_size))
        self.foreground_oversampling = float(foreground_oversampling)
        self.max_offset_fraction = float(max_offset_fraction)
        self.rng = rng
        self.slice_axis = slice_axis
        expected = 3 if slice_axis is None else 2
        if len(self.patch_size) != expected or len(self.final_patch_size) != expected:
            raise ValueError(
                f"patch sizes {list(self.patch_size)} and {list(self.final_patch_size)} need "
                f"{expected} entries ({'3-D' if slice_axis is None else f'slices along axis {slice_axis}'})"
            )
        if any(f > p for f, p in zip(self.final_patch_size, self.patch_size)):
            raise ValueError(
                f"final patch {list(self.final_patch_size)} is larger than the sampling patch {list(self.patch_size)}"
            )
        if lesion_choice not in ("voxel", "lesion"):
            raise ValueError(f"lesion_choice must be 'voxel' or 'lesion', got '{lesion_choice}'")
        self.lesion_choice = lesion_choice
        self._lesions: dict[str, np.ndarray] = {}
        self._components: dict[str, list[np.ndarray]] = {}

    def forced_in_batch(self, batch_size: int) -> list[bool]:
        """Per sample of a batch, whether it is lesion-forced: the last :func:`forced_count` ones."""
        count = forced_count(batch_size, self.foreground_oversampling)
        return [index >= batch_size - count for index in range(batch_size)]

    def num_channels(self) -> int:
        """C of the cases (read from the first case's header)."""
        return int(load_array(self.folder / f"{self.identifiers[0]}.npy", mmap=True).shape[0])

    def sample(self, identifier: str, force_lesion: bool) -> tuple[np.ndarray, np.ndarray]:
        """One patch of ``identifier``.

        Returns:
            data: (C, *patch_size) float32, zero where the patch leaves the volume.
            seg: (1, *patch_size) uint8 labels, zero where the patch leaves the volume.
        """
        data = load_array(self.folder / f"{identifier}.npy", mmap=True)
        shape = tuple(data.shape[1:])
        centre = self._lesion_centre(identifier) if force_lesion else None
        sampled, final = self._volume_sizes(self.patch_size), self._volume_sizes(self.final_patch_size)
        start = [
            self._final_start(n, p, None if centre is None else int(centre[axis]))
            for axis, (n, p) in enumerate(zip(shape, final))
        ]
        start = [s - (q - p) // 2 for s, q, p in zip(start, sampled, final)]
        seg = load_array(self.folder / f"{identifier}_seg.npy", mmap=True)
        data_patch, seg_patch = _read_box(data, start, sampled), _read_box(seg[None], start, sampled)
        if self.slice_axis is not None:  # drop the slice axis: (C, 1, Y, Z) -> (C, Y, Z) etc.
            data_patch, seg_patch = (np.squeeze(a, axis=1 + self.slice_axis) for a in (data_patch, seg_patch))
        return data_patch, seg_patch

    def _volume_sizes(self, patch: Shape) -> Shape:
        """A patch size as three volume axes: edge 1 along the slice axis of 2-D sampling."""
        if self.slice_axis is None:
            return patch
        sizes = list(patch)
        sizes.insert(self.slice_axis, 1)
        return tuple(sizes)

    def _final_start(self, n: int, p: int, centre: int | None) -> int:
        """Start of the final patch (edge ``p``) along an axis of ``n`` voxels; lesion-centred if ``centre``."""
        low, high = min(0, n - p), max(0, n - p)
        if centre is None:
            return int(self.rng.integers(low, high + 1))
        # Offsets beyond [-(p - p//2 - 1), p//2] would push the chosen lesion voxel out of the patch.
        reach = int(self.max_offset_fraction * p)
        offset = int(self.rng.integers(-min(reach, p - p // 2 - 1), min(reach, p // 2) + 1))
        # Moving the patch inside [low, high] keeps the lesion voxel in it: that voxel lies inside the volume.
        return int(np.clip(centre + offset - p // 2, low, high))

    def _lesion_centre(self, identifier: str) -> np.ndarray | None:
        """A lesion voxel to centre a patch on: any voxel (``voxel``), or a voxel of a uniformly chosen connected
        lesion (``lesion``); None for a case without lesion."""
        if self.lesion_choice == "lesion":
            components = self._lesion_components(identifier)
            if not components:
                return None
            voxels = components[self.rng.integers(len(components))]
        else:
            voxels = self._lesion_voxels(identifier)
        return voxels[self.rng.integers(len(voxels))] if len(voxels) else None

    def _lesion_components(self, identifier: str) -> list[np.ndarray]:
        """The case's lesion voxels grouped by connected lesion (26-connected), cached."""
        if identifier not in self._components:
            voxels = self._lesion_voxels(identifier)
            if not len(voxels):
                self._components[identifier] = []
            else:
                seg = load_array(self.folder / f"{identifier}_seg.npy", mmap=True)
                labels, _ = ndimage.label(np.asarray(seg) > 0, structure=np.ones((3,) * seg.ndim))
                owner = labels[tuple(voxels.T)]
                self._components[identifier] = [voxels[owner == k] for k in np.unique(owner[owner > 0])]
        return self._components[identifier]

    def _lesion_voxels(self, identifier: str) -> np.ndarray:
        """(N, 3) lesion voxel indices of a case, cached (small: at most 10,000 rows)."""
        if identifier not in self._lesions:
            self._lesions[identifier] = np.asarray(load_array(self.folder / f"{identifier}_lesion.npy"))
        return self._lesions[identifier]


def _read_box(array: np.ndarray, start: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """``array[:, start:start + size]`` per spatial axis, zero-padded where the box leaves the array.

    Only the overlap is read, so a memory-mapped ``array`` (C, X, Y, Z) costs about the patch's bytes.
    """
    out = np.zeros((array.shape[0], *size), dtype=array.dtype)
    source, target = [slice(None)], [slice(None)]
    for begin, length, n in zip(start, size, array.shape[1:]):
        low, high = max(begin, 0), min(begin + length, n)
        if high <= low:  # no overlap along this axis: all padding
            return out
        source.append(slice(low, high))
        target.append(slice(low - begin, high - begin))
    out[tuple(target)] = array[tuple(source)]
    return out
