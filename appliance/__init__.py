"""A single-container labeling appliance: Label Studio, interactive SAM, MMDetection pre-annotation, auto-training."""

__version__ = "0.1.0"
