"""Image grids (originals vs reconstructions) saved as PNG."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Auto scale aims for cells about this many pixels high, so 28x28 digits are
# shown 3x and 128x128 photos stay 1x.
_TARGET_CELL_PX = 96
_BACKGROUND = 255
_TEXT = 0


def _check_rows(rows: Sequence[Any]) -> list[np.ndarray]:
    if isinstance(rows, np.ndarray) or not isinstance(rows, Sequence) or len(rows) == 0:
        raise ValueError("rows must be a non-empty sequence of [N, H, W, C] arrays.")
    arrays = []
    for i, row in enumerate(rows):
        array = np.asarray(row)
        if array.ndim != 4:
            raise ValueError(f"rows[{i}] must be [N, H, W, C], got shape {array.shape}.")
        if array.shape[0] == 0:
            raise ValueError(f"rows[{i}] holds no images.")
        if array.shape[-1] not in (1, 3):
            raise ValueError(
                f"rows[{i}] must have 1 (grayscale) or 3 (RGB) channels, got {array.shape[-1]}."
            )
        if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
            raise ValueError(f"rows[{i}] must be numeric, got dtype {array.dtype}.")
        arrays.append(array)
    sizes = {array.shape[1:3] for array in arrays}
    if len(sizes) != 1:
        raise ValueError(f"all rows must share the image size H x W, got {sorted(sizes)}.")
    return arrays


def _to_uint8(images: np.ndarray, channels: int) -> np.ndarray:
    # NaN (a diverged reconstruction) shows as black rather than failing the plot.
    clipped = np.clip(np.nan_to_num(images.astype(np.float64), nan=0.0), 0.0, 1.0)
    pixels = np.round(clipped * 255.0).astype(np.uint8)
    if pixels.shape[-1] != channels:
        pixels = np.repeat(pixels, channels, axis=-1)
    return pixels


def save_image_grid(
    path: str | Path,
    rows: Sequence[Any],
    *,
    row_labels: Sequence[str] | None = None,
    pad: int = 2,
    scale: int | None = None,
) -> Path:
    """Saves batches of images as a PNG grid, one row per batch.

    Cell ``(r, i)`` shows ``rows[r][i]``, upscaled by nearest neighbour.
    Values are clipped to [0, 1] (NaN shows as 0). Rows may hold different
    numbers of images (short rows are left blank) but must share H x W. The
    PNG is grayscale ("L") when every row has one channel, RGB otherwise
    (grayscale rows are then repeated over the channels). Cells are separated
    by ``pad`` white pixels, which also frame the grid. Labels, if given, are
    drawn in black on the left with PIL's default font.

    The output is ``label_width + pad + cols * (W * scale + pad)`` pixels wide
    and ``pad + len(rows) * (H * scale + pad)`` high, where ``cols`` is the
    longest row and ``label_width`` is 0 without labels, otherwise the widest
    label's width plus ``pad + 4``.

    Args:
        path: Output ``.png`` file; parent folders are created.
        rows: Sequence of arrays ``[N_r, H, W, C]`` with C in {1, 3}, values in [0, 1].
        row_labels: Optional text per row, e.g. ``["original", "eps=1", "eps=10"]``.
        pad: Gap between cells and around the grid, in output pixels (>= 0).
        scale: Integer upscaling factor (>= 1). ``None`` picks
            ``max(1, 96 // max(H, W))``: 3 for 28x28 or 32x32, 1 for 128x128.

    Returns:
        The path written.

    Raises:
        ValueError: On an empty ``rows``, a row that is not ``[N, H, W, C]``
            with C in {1, 3}, differing image sizes, a label count different
            from the row count, a negative ``pad`` or a ``scale`` below 1.

    >>> import numpy as np, tempfile, os
    >>> from PIL import Image
    >>> out = os.path.join(tempfile.mkdtemp(), "grid.png")
    >>> images = np.zeros((4, 28, 28, 1))
    >>> Image.open(save_image_grid(out, [images, images], pad=2, scale=3)).size
    (346, 174)
    """
    arrays = _check_rows(rows)
    if row_labels is not None:
        row_labels = [str(label) for label in row_labels]
        if len(row_labels) != len(arrays):
            raise ValueError(f"row_labels has {len(row_labels)} entries for {len(arrays)} rows.")
    if isinstance(pad, bool) or not isinstance(pad, int | np.integer) or pad < 0:
        raise ValueError(f"pad must be a non-negative integer, got {pad!r}.")
    height, width = arrays[0].shape[1:3]
    if scale is None:
        scale = max(1, _TARGET_CELL_PX // max(height, width))
    if isinstance(scale, bool) or not isinstance(scale, int | np.integer) or scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale!r}.")

    channels = 3 if any(array.shape[-1] == 3 for array in arrays) else 1
    cell_h, cell_w = height * scale, width * scale
    n_cols = max(array.shape[0] for array in arrays)

    font = ImageFont.load_default()
    label_width = 0
    if row_labels:
        measure = ImageDraw.Draw(Image.new("L", (1, 1)))
        text_width = max(measure.textbbox((0, 0), label, font=font)[2] for label in row_labels)
        label_width = text_width + pad + 4 if text_width else 0

    canvas = np.full(
        (pad + len(arrays) * (cell_h + pad), label_width + pad + n_cols * (cell_w + pad), channels),
        _BACKGROUND,
        dtype=np.uint8,
    )
    for r, array in enumerate(arrays):
        pixels = _to_uint8(array, channels)
        pixels = pixels.repeat(scale, axis=1).repeat(scale, axis=2)
        top = pad + r * (cell_h + pad)
        for i, cell in enumerate(pixels):
            left = label_width + pad + i * (cell_w + pad)
            canvas[top : top + cell_h, left : left + cell_w] = cell

    # uint8 [H, W] becomes mode "L" and [H, W, 3] mode "RGB".
    image = Image.fromarray(canvas[..., 0] if channels == 1 else canvas)
    if label_width:
        draw = ImageDraw.Draw(image)
        fill = _TEXT if channels == 1 else (_TEXT,) * 3
        for r, label in enumerate(row_labels or []):
            top = pad + r * (cell_h + pad)
            box = draw.textbbox((0, 0), label, font=font)
            y = top + (cell_h - (box[3] - box[1])) // 2 - box[1]
            draw.text((pad, y), label, fill=fill, font=font)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    return path
