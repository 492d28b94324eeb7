"""Simulated clients and the attacker's observations (capture files)."""

from jaxleak.capture.io import (
    FORMAT_VERSION,
    REQUIRED_META,
    REQUIRED_META_V1,
    Capture,
    CaptureFormatError,
    check_output_path,
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
    "FORMAT_VERSION",
    "REQUIRED_META",
    "REQUIRED_META_V1",
    "Capture",
    "CaptureFormatError",
    "capture_conv_impl",
    "capture_updates",
    "check_output_path",
    "flatten_tree",
    "load_capture",
    "per_example_grads",
    "quantize_images",
    "save_capture",
    "time_capture",
    "unflatten_tree",
    "validate_capture",
]
