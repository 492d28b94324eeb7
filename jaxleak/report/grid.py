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


def _check_captions(captions: Sequence[Any] | None, arrays: list[np.ndarray]) -> list[list[str] | None]:
    if captions is None:
        return [None] * len(arrays)
    if isinstance(captions, str) or len(captions) != len(arrays):
        raise ValueError(f"captions must hold one entry (None or a list of strings) per row "
                         f"({len(arrays)} rows).")
    out: list[list[str] | None] = []
    for r, (row, array) in enumerate(zip(captions, arrays)):
        if row is None:
            out.append(None)
            continue
        if isinstance(row, str) or len(row) != array.shape[0]:
            raise ValueError(f"captions[{r}] must hold one string per image of rows[{r}] ({array.shape[0]}).")
        out.append([str(text) for text in row])
    return out


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
    captions: Sequence[Sequence[str] | None] | None = None,
) -> Path:
    """Saves batches of images as a PNG grid, one row per batch.

    Cell ``(r, i)`` shows ``rows[r][i]``, upscaled by nearest neighbour.
    Values are clipped to [0, 1] (NaN shows as 0). Rows may hold different
    numbers of images (short rows are left blank) but must share H x W. The
    PNG is grayscale ("L") when every row has one channel, RGB otherwise
    (grayscale rows are then repeated over the channels). Cells are separated
    by ``pad`` white pixels, which also frame the grid. Labels, if given, are
    drawn in black on the left with PIL's default font. Captions, if given, are
    drawn centred under each cell of a row (e.g. the PSNR of a reconstruction);
    a row with captions is taller by one line of text.

    The output is ``label_width + pad + cols * (W * scale + pad)`` pixels wide
    and ``pad + len(rows) * (H * scale + pad)`` high (plus the caption lines),
    where ``cols`` is the longest row and ``label_width`` is 0 without labels,
    otherwise the widest label's width plus ``pad + 4``.

    Args:
        path: Output ``.png`` file; parent folders are created.
        rows: Sequence of arrays ``[N_r, H, W, C]`` with C in {1, 3}, values in [0, 1].
        row_labels: Optional text per row, e.g. ``["original", "eps=1", "eps=10"]``.
        pad: Gap between cells and around the grid, in output pixels (>= 0).
        scale: Integer upscaling factor (>= 1). ``None`` picks
            ``max(1, 96 // max(H, W))``: 3 for 28x28 or 32x32, 1 for 128x128.
        captions: Optional, one entry per row: ``None`` (no captions) or one
            string per image of that row, drawn under the image.

    Returns:
        The path written.

    Raises:
        ValueError: On an empty ``rows``, a row that is not ``[N, H, W, C]``
            with C in {1, 3}, differing image sizes, a label count different
            from the row count, a negative ``pad``, a ``scale`` below 1, or
            captions whose count differs from the rows' or a row's images.

    >>> import numpy as np, tempfile, os
    >>> from PIL import Image
    >>> out = os.path.join(tempfile.mkdtemp(), "grid.png")
    >>> images = np.zeros((4, 28, 28, 1))
    >>> Image.open(save_image_grid(out, [images, images], pad=2, scale=3)).size
    (346, 174)
    >>> psnr = ["12.1 dB", "9.8 dB", "30.2 dB", "inf dB"]
    >>> w, h = Image.open(save_image_grid(out, [images, images], captions=[None, psnr], scale=3)).size
    >>> w, h > 174
    (346, True)
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

    captions = _check_captions(captions, arrays)

    channels = 3 if any(array.shape[-1] == 3 for array in arrays) else 1
    cell_h, cell_w = height * scale, width * scale
    n_cols = max(array.shape[0] for array in arrays)

    font = ImageFont.load_default()
    caption_h = 0
    if any(captions):
        box = ImageDraw.Draw(Image.new("L", (1, 1))).textbbox((0, 0), "Ag0", font=font)
        caption_h = box[3] + 2  # the text's full height below its origin, and a gap above it
    # Row r starts at tops[r]; a row with captions is taller by caption_h.
    heights = [cell_h + (caption_h if row_captions else 0) for row_captions in captions]
    tops = [pad + sum(heights[:r]) + r * pad for r in range(len(arrays))]
    label_width = 0
    if row_labels:
        measure = ImageDraw.Draw(Image.new("L", (1, 1)))
        text_width = max(measure.textbbox((0, 0), label, font=font)[2] for label in row_labels)
        label_width = text_width + pad + 4 if text_width else 0

    canvas = np.full(
        (pad + sum(heights) + len(arrays) * pad, label_width + pad + n_cols * (cell_w + pad), channels),
        _BACKGROUND,
        dtype=np.uint8,
    )
    for r, array in enumerate(arrays):
        pixels = _to_uint8(array, channels)
        pixels = pixels.repeat(scale, axis=1).repeat(scale, axis=2)
        top = tops[r]
        for i, cell in enumerate(pixels):
            left = label_width + pad + i * (cell_w + pad)
            canvas[top : top + cell_h, left : left + cell_w] = cell

    # uint8 [H, W] becomes mode "L" and [H, W, 3] mode "RGB".
    image = Image.fromarray(canvas[..., 0] if channels == 1 else canvas)
    draw = ImageDraw.Draw(image)
    fill = _TEXT if channels == 1 else (_TEXT,) * 3
    if label_width:
        for r, label in enumerate(row_labels or []):
            box = draw.textbbox((0, 0), label, font=font)
            y = tops[r] + (cell_h - (box[3] - box[1])) // 2 - box[1]
            draw.text((pad, y), label, fill=fill, font=font)
    for r, row_captions in enumerate(captions):
        for i, text in enumerate(row_captions or []):
            left = label_width + pad + i * (cell_w + pad)
            text_w = draw.textbbox((0, 0), text, font=font)[2]
            # Centred under the cell; a caption wider than the cell starts at its left edge.
            draw.text((left + max(0, (cell_w - text_w) // 2), tops[r] + cell_h + 1), text, fill=fill,
                      font=font)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    return path
