"""mil: multiple-instance learning on whole-slide tile features."""

__version__ = "0.1.0"
