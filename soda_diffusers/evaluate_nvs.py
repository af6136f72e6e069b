"""Old name of :mod:`soda_diffusers.evaluation.runner`: importing it gives that module itself, so old imports
(``from soda_diffusers.evaluate_nvs import evaluate``) keep working."""

import sys
import warnings

from soda_diffusers.evaluation import runner

warnings.warn("soda_diffusers.evaluate_nvs is now soda_diffusers.evaluation.runner", FutureWarning, stacklevel=2)
sys.modules[__name__] = runner
