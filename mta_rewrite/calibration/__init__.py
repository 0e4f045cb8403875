"""Calibration: choose each site's MTA configuration from data under an error budget."""

from .cost import MeasuredCosts, TimeModel, default_candidates, load_time_model, relative_cost
from .search import calibrate

__all__ = ["MeasuredCosts", "TimeModel", "calibrate", "default_candidates", "load_time_model", "relative_cost"]
