"""Reconstruction-quality metrics, batched over ``[N, ...]`` and jitted."""

from jaxleak.metrics._image import WIN_SIZE as SSIM_WIN_SIZE
from jaxleak.metrics._image import asr, mse, psnr, ssim
from jaxleak.metrics._lpips import lpips
from jaxleak.metrics._vectors import cosine_similarity

__all__ = ["SSIM_WIN_SIZE", "asr", "cosine_similarity", "lpips", "mse", "psnr", "ssim"]
