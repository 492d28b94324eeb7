"""Simulated clients and the attacker's observations (capture files)."""

from jaxleak.capture.io import (
    REQUIRED_META,
    Capture,
    CaptureFormatError,
    flatten_tree,
    load_capture,
    save_capture,
    unflatten_tree,
    validate_capture,
)
from jaxleak.capture.simulate import (
    capture_conv_impl,
    capture_updates,
    per_example_grads,
    quantize_images,
    time_capture,
)

__all__ = [
    "REQUIRED_META",
    "Capture",
    "CaptureFormatError",
    "capture_conv_impl",
    "capture_updates",
    "flatten_tree",
    "load_capture",
    "per_example_grads",
    "quantize_images",
    "save_capture",
    "time_capture",
    "unflatten_tree",
    "validate_capture",
]
