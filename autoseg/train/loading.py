"""Training and validation batches: patch sampling + augmentation, in background processes.

``make_loader`` returns a :class:`BatchStream`: an endless iterator of augmented torch batches
``{"data": (B, C, *P) float32, "seg": (B, 1, *P) int16, "keys": [case, ...]}`` (``P`` the stage's patch;
2-D configurations give (B, C, P0, P1)). Use it as a context manager, or call :meth:`BatchStream.close`,
so that no worker process outlives it.

Determinism: the same ``seed`` and ``num_processes`` give the same sequence of batches.

- Every worker process gets its own seeds, derived from (``seed``, worker index): one for the case and
  patch choices of its :class:`PatchDataLoader`, one for numpy's global generator (which the batchgenerators
  transforms draw from; ``MultiThreadedAugmenter`` seeds it) and one for Python's ``random`` (which
  batchgenerators' Gaussian noise and blur draw from, and which ``MultiThreadedAugmenter`` does not seed:
  without it the noise would differ from run to run).
- ``MultiThreadedAugmenter`` takes batches from the workers' queues in turn, so their order is fixed.
- With ``num_processes=0`` batches are made in the calling process; numpy's and Python's global generator
  states are swapped in for each batch and swapped out afterwards, so the stream neither disturbs nor
  depends on other users of those generators.

Different ``num_processes`` give different (equally valid) sequences: each worker draws its own batches.

Workers send numpy arrays, and the calling process wraps them as tensors (``torch.from_numpy``, no copy).
Sending tensors instead would pass them through torch's shared-memory file descriptors, which the
receiving thread fetches from the sending worker; a worker that has already exited when
``MultiThreadedAugmenter`` shuts down then makes that thread fail with a traceback.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from batchgenerators.dataloading.data_loader import DataLoader
from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter
from batchgenerators.transforms.abstract_transforms import AbstractTransform

from autoseg.errors import DataError
from autoseg.plans import Configuration, Stage
from autoseg.preprocess.cases import array_files, check_arrays
from autoseg.train.augmentation import spatial_augmentation, training_transforms, validation_transforms
from autoseg.train.sampling import PatchSampler

Batch = dict[str, Any]
"""``{"data": (B, C, ...) , "seg": (B, 1, ...), "keys": [case, ...]}``; numpy before the transforms, torch after."""


def derived_seed(seed: int, *stream: int) -> int:
    """A 32-bit seed for one named random stream of ``seed`` (e.g. worker 3's numpy generator)."""
    return int(np.random.SeedSequence([seed, *stream]).generate_state(1)[0])


class PatchDataLoader(DataLoader):
    """Endless batches of ``batch_size`` patches from ``sampler``: cases drawn uniformly with replacement,
    the last ``sampler.forced_in_batch`` samples lesion-forced (see ``autoseg.train.sampling``).

    Args:
        sampler: draws the patches; its ``rng`` is replaced by one seeded from ``seed`` (and the worker).
        batch_size: B.
        seed: base seed of the case and patch choices.

    Example:
        >>> batch = next(PatchDataLoader(sampler, batch_size=2, seed=0))
        >>> batch["data"].shape, batch["seg"].shape, batch["keys"]   # (2, C, *S), (2, 1, *S), [case, case]
    """

    def __init__(self, sampler: PatchSampler, batch_size: int, seed: int) -> None:
        if not sampler.identifiers:
            raise DataError("no cases to sample from")
        super().__init__(
            list(sampler.identifiers), batch_size, num_threads_in_multithreaded=1, seed_for_shuffle=seed, infinite=True
        )
        self.sampler = sampler
        self.seed = seed
        self.indices = list(range(len(sampler.identifiers)))
        self.num_channels = sampler.num_channels()
        sampler.rng = np.random.default_rng(derived_seed(seed, 0, 0))

    def set_thread_id(self, thread_id: int) -> None:
        """Called by ``MultiThreadedAugmenter`` in each worker process: give that worker its own random streams."""
        super().set_thread_id(thread_id)
        self.sampler.rng = np.random.default_rng(derived_seed(self.seed, thread_id, 0))
        random.seed(derived_seed(self.seed, thread_id, 1))  # this worker's Python ``random`` only

    def generate_train_batch(self) -> Batch:
        rng = self.sampler.rng
        keys = [self._data[i] for i in rng.integers(len(self._data), size=self.batch_size)]
        size = self.sampler.patch_size
        data = np.zeros((self.batch_size, self.num_channels, *size), np.float32)
        seg = np.zeros((self.batch_size, 1, *size), np.int16)
        for index, (key, forced) in enumerate(zip(keys, self.sampler.forced_in_batch(self.batch_size))):
            data[index], seg[index] = self.sampler.sample(key, forced)
        return {"data": data, "seg": seg, "keys": keys}


class BatchStream:
    """Endless iterator of transformed batches, made in ``num_processes`` background processes (0: here).

    Close it (``close()``, or use ``with``) to end the worker processes.

    Args:
        loader: the batch source (numpy batches).
        transform: applied to every batch (augmentation), numpy in and out; ``data`` and ``seg`` are then
            wrapped as torch tensors here.
        num_processes: background processes; 0 makes batches in the calling process.
        seed: base seed; with ``num_processes`` it fixes the sequence of batches.
        pin_memory: pin the tensors for fast transfer to a GPU (needs CUDA).
    """

    def __init__(
        self,
        loader: PatchDataLoader,
        transform: AbstractTransform,
        num_processes: int,
        seed: int,
        pin_memory: bool = False,
    ) -> None:
        if num_processes < 0:
            raise ValueError(f"num_processes must be >= 0, got {num_processes}")
        self.loader, self.transform, self.num_processes = loader, transform, num_processes
        self.pin_memory = pin_memory
        self._closed = False
        self._augmenter: MultiThreadedAugmenter | None = None
        if num_processes > 0:
            # A worker that fails only prints its error; find damaged arrays here first, so the error names them.
            check_arrays(loader.sampler.folder, loader.sampler.identifiers)
            seeds = [derived_seed(seed, worker, 2) for worker in range(num_processes)]
            self._augmenter = MultiThreadedAugmenter(
                loader, transform, num_processes, num_cached_per_queue=2, seeds=seeds
            )
        else:
            self._numpy_state = np.random.RandomState(derived_seed(seed, 0, 2)).get_state()
            self._python_state = random.Random(derived_seed(seed, 0, 1)).getstate()

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        if self._closed:
            raise RuntimeError("this BatchStream was closed")
        batch = self._next_from_workers() if self._augmenter is not None else self._next_here()
        for key in ("data", "seg"):
            if isinstance(batch[key], np.ndarray):  # a transform ending in NumpyToTensor has done it already
                batch[key] = torch.from_numpy(batch[key])
            if self.pin_memory:
                batch[key] = batch[key].pin_memory()
        return batch

    def _next_from_workers(self) -> Batch:
        """The next batch of the background workers. When a worker has died ("One or more background workers are
        no longer alive"), the arrays are checked again so that a file damaged meanwhile is named.

        Raises:
            DamagedArrayError: a case's array is damaged (the message names it).
        """
        try:
            return next(self._augmenter)
        except RuntimeError:
            check_arrays(self.loader.sampler.folder, self.loader.sampler.identifiers)
            raise

    def _next_here(self) -> Batch:
        """One batch made in this process, with the stream's own global generator states swapped in."""
        saved = np.random.get_state(), random.getstate()
        np.random.set_state(self._numpy_state)
        random.setstate(self._python_state)
        try:
            return self.transform(**next(self.loader))
        finally:
            self._numpy_state, self._python_state = np.random.get_state(), random.getstate()
            np.random.set_state(saved[0])
            random.setstate(saved[1])

    def close(self) -> None:
        """End the background processes (idempotent); the stream cannot be used afterwards."""
        if self._augmenter is not None:
            self._augmenter._finish()  # batchgenerators' shutdown: stop, drain the queues, join or terminate
            self._augmenter = None
        self._closed = True

    def __enter__(self) -> BatchStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def make_loader(
    folder: Path,
    identifiers: Sequence[str],
    configuration: Configuration,
    stage: Stage | None = None,
    num_processes: int = 0,
    seed: int = 0,
    train: bool = True,
    *,
    elastic: bool = False,
    pin_memory: bool = False,
) -> BatchStream:
    """Batches for training (augmented) or validation (not augmented) of ``configuration``.

    Args:
        folder: the preprocessed data folder (``AUTOSEG_PREPROCESSED/<dataset>/<data_identifier>``).
        identifiers: the cases to draw from (a fold's ``train`` or ``val`` list).
        configuration: patch sampling (``sampling``, ``dimension``, ``slice_axis``) and augmentation settings.
        stage: the schedule stage whose ``patch_size`` and ``batch_size`` to use; default the configuration's.
        num_processes: augmentation processes (0: in this process).
        seed: fixes the sequence of batches (for a given ``num_processes``).
        train: augment (True) or only sample and convert (False). Validation patches are lesion-forced in the
            same share as training ones, as in nnU-Net.
        elastic: add elastic deformation (training only).
        pin_memory: pin batch memory for a GPU.

    Returns:
        A :class:`BatchStream` of ``{"data": (B, C, *P) float32, "seg": (B, 1, *P) int16, "keys": [...]}``.

    Raises:
        DamagedArrayError: a case's array file is cut short (before background workers start, or when one dies,
            or when a batch made here reads it); the message names the file and says to re-run ``autoseg_plan``.
    """
    patch = tuple(stage.patch_size if stage is not None else configuration.patch_size)
    batch_size = stage.batch_size if stage is not None else configuration.batch_size
    if train:
        sampled = spatial_augmentation(configuration, patch).sampling_patch_size(patch)
        transform = training_transforms(configuration, patch, elastic, to_tensor=False)
    else:
        sampled, transform = patch, validation_transforms(to_tensor=False)
    sampler = PatchSampler(
        folder,
        identifiers,
        sampled,
        final_patch_size=patch,
        foreground_oversampling=configuration.sampling.foreground_oversampling,
        max_offset_fraction=configuration.sampling.max_offset_fraction,
        rng=np.random.default_rng(seed),  # replaced by the loader's per-worker generator
        slice_axis=configuration.slice_axis if configuration.dimension == 2 else None,
        lesion_choice=configuration.sampling.lesion_choice,
    )
    return BatchStream(PatchDataLoader(sampler, batch_size, seed), transform, num_processes, seed, pin_memory)


def case_identifiers(folder: Path) -> list[str]:
    """Sorted identifiers of the complete preprocessed cases in ``folder`` (``CASE.json`` is written last)."""
    folder = Path(folder)
    return sorted(p.stem for p in folder.glob("*.json") if all(a.is_file() for a in array_files(folder, p.stem)))
