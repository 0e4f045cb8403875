"""Calibration: choose each site's MTA configuration from data under an error budget."""

from .cost import MeasuredCosts, default_candidates, relative_cost
from .search import calibrate

__all__ = ["MeasuredCosts", "calibrate", "default_candidates", "relative_cost"]
