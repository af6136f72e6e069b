"""Evaluation of a SODA pipeline, in two modules:

* :mod:`~soda_diffusers.evaluation.views`: one object at a time, the pixelNeRF protocol's pieces: the
  target views of a source view, each target's noise seed, the generated views and their scores;
* :mod:`~soda_diffusers.evaluation.runner`: a whole split: the resumable NVS pass with its baselines, FID,
  the encoder probes, and the tables and plots they write (``soda-nvs evaluate`` calls it).

The names of :mod:`~soda_diffusers.evaluation.views` are importable from here too, where they were before
the split (``from soda_diffusers.evaluation import view_scores``).
"""

from soda_diffusers.evaluation.views import (
    VIEW_METRICS,
    generate_views_per_seed,
    light_grey_ratio,
    object_target_rays,
    seeded_view,
    target_views,
    view_scores,
    view_seeds,
)

__all__ = [
    "VIEW_METRICS",
    "generate_views_per_seed",
    "light_grey_ratio",
    "object_target_rays",
    "seeded_view",
    "target_views",
    "view_scores",
    "view_seeds",
]
