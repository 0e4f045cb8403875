"""Calibration: choose each site's MTA configuration from data under an error budget."""

from .cost import default_candidates, relative_cost
from .search import calibrate

__all__ = ["calibrate", "default_candidates", "relative_cost"]
