"""Training batches of (source view(s), target view) pairs, and the random streams they are drawn from.

Every random quantity of a training step has its own stream: a generator seeded from
``(seed, step, rank, stream)`` through NumPy's ``SeedSequence``, which mixes its inputs so that
neighbouring seeds give unrelated streams. One generator shared by two quantities couples them (the
object index and the timestep were once drawn from the same seed, and ``object % 8 == timestep % 8``
held in every draw). A step's batch is then a pure function of ``(seed, step, rank)``: a resumed run
draws exactly what the interrupted one would have, with or without DataLoader workers.

:func:`pair_batch` turns the views of a batch into the model's inputs; the store's
:class:`StepBatches` and the streaming reader both go through it and :func:`draw_views`, so the two
data paths draw and assemble pairs the same way.
"""

from __future__ import annotations

import numpy as np
import torch

from soda_diffusers.cameras import NMR_NUM_VIEWS, camera_rays

# The random quantities of a training step, each drawn from its own stream. Append only: a stream's
# position in this tuple is part of its seed.
STREAMS = ("objects", "views", "timesteps", "noise", "conditioning", "dropout")


def stream_seed(seed: int, step: int, rank: int, stream: str) -> int:
    """A 63-bit seed for ``stream`` (one of :data:`STREAMS`) at ``step`` on process ``rank``."""
    if stream not in STREAMS:
        raise ValueError(f"stream: expected one of {STREAMS}, got {stream!r}")
    words = np.random.SeedSequence([int(seed), int(step), int(rank), STREAMS.index(stream)]).generate_state(2)
    return (int(words[0]) << 31) ^ int(words[1])


def stream_generator(seed: int, step: int, rank: int, stream: str, device="cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(stream_seed(seed, step, rank, stream))


def draw_views(
    generator: torch.Generator, batch_size: int, num_source_views: int = 1, num_views: int = NMR_NUM_VIEWS
) -> torch.Tensor:
    """``(batch_size, num_source_views + 1)`` distinct views per row, uniformly: the source views,
    then the target (never one of the sources)."""
    if not 1 <= num_source_views < num_views:
        raise ValueError(f"num_source_views: expected 1..{num_views - 1}, got {num_source_views}")
    order = torch.rand(batch_size, num_views, generator=generator).argsort(dim=1)
    return order[:, : num_source_views + 1]


def pair_batch(images, world_mats, unprojections) -> dict[str, torch.Tensor]:
    """Model inputs from the views of a batch: ``images`` ``(B, k + 1, 3, S, S)`` uint8 (``k``
    source views, then the target), with their ``world_mats`` and ``unprojections``
    ``(B, k + 1, 4, 4)``. Rays are in the frame of the first source camera.

    Returns ``source_image`` ``(B, 3, S, S)`` (``(B, k, 3, S, S)`` and ``source_rays``
    ``(B, k, 6, S, S)`` when ``k > 1``; one view is encoded with the encoder's canonical rays),
    ``target_image`` and ``target_rays``, images in [-1, 1]."""
    images = torch.as_tensor(images).float() / 127.5 - 1
    world_mats, unprojections = torch.as_tensor(world_mats), torch.as_tensor(unprojections)
    batch, views, _, size = images.shape[:4]
    k = views - 1
    rays_of = slice(k, views) if k == 1 else slice(0, views)
    count = views - rays_of.start
    reference = world_mats[:, :1].expand(batch, count, 4, 4)
    rays = camera_rays(reference.reshape(-1, 4, 4), unprojections[:, rays_of].reshape(-1, 4, 4), size)
    rays = rays.view(batch, count, 6, size, size)
    pairs = {"target_image": images[:, k], "target_rays": rays[:, -1]}
    if k == 1:
        pairs["source_image"] = images[:, 0]
    else:
        pairs["source_image"] = images[:, :k]
        pairs["source_rays"] = rays[:, :k]
    return pairs


class StepBatches(torch.utils.data.Dataset):
    """Training batches from a :class:`~soda_diffusers.data.store.ViewStore`, indexed by step: item
    ``step`` is the batch of that step on process ``rank``, drawn from the ``objects`` and ``views``
    streams alone. Load it with ``DataLoader(StepBatches(...), batch_size=None, sampler=range(first, last))``:
    workers build whole batches, and a resumed run starts the range at its step."""

    def __init__(self, store, batch_size: int, seed: int, rank: int = 0, num_source_views: int = 1):
        self.store = store
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.rank = int(rank)
        self.num_source_views = int(num_source_views)
        draw_views(torch.Generator(), 1, self.num_source_views)  # checks num_source_views now

    def __len__(self) -> int:
        # Any step is an item: the length only bounds samplers that ask for it.
        return 2**62

    def __getitem__(self, step: int) -> dict[str, torch.Tensor]:
        return self.batch(step)

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        return self.pairs(*self.draws(step))

    def draws(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The objects ``(B,)`` and views ``(B, k + 1)`` of ``step``, each from its own stream."""
        generator = stream_generator(self.seed, step, self.rank, "objects")
        objects = torch.randint(self.store.num_objects, (self.batch_size,), generator=generator)
        views = draw_views(stream_generator(self.seed, step, self.rank, "views"), self.batch_size,
                           self.num_source_views)
        return objects, views

    def pairs(self, objects: torch.Tensor, views: torch.Tensor) -> dict[str, torch.Tensor]:
        """The batch of ``objects`` ``(B,)`` with ``views`` ``(B, k + 1)`` (sources, then target)."""
        rows = objects.numpy()[:, None]
        columns = views.numpy()
        store = self.store
        return pair_batch(store.images[rows, columns], store.world_mats[rows, columns],
                          store.unprojections[rows, columns])
