"""Tests for jaxleak.report: summaries, JSON records, text tables, image grids."""

import doctest
import json
import math

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import jaxleak.report
from jaxleak.report import format_table, save_image_grid, summarize, write_metrics_json
from jaxleak.report import grid as grid_module
from jaxleak.report import summary as summary_module


def test_public_api() -> None:
    assert set(jaxleak.report.__all__) == {
        "REPORT_FORMATS",
        "format_table",
        "save_image_grid",
        "summarize",
        "write_metrics_json",
        "write_report",
    }
    for name in set(jaxleak.report.__all__) - {"REPORT_FORMATS"}:
        assert callable(getattr(jaxleak.report, name))


# ----------------------------------------------------------------------------
# summarize / write_metrics_json
# ----------------------------------------------------------------------------


def test_summarize_ignores_inf_in_mean_and_counts_it() -> None:
    metrics = {
        "psnr": np.array([10.0, 20.0, np.inf, 30.0], np.float32),
        "ssim": jnp.array([0.3, 0.6, 1.0, 0.5]),
    }
    out = summarize(metrics)
    assert set(out) == {"psnr", "ssim", "asr@0.5"}
    psnr = out["psnr"]
    assert psnr["values"] == [10.0, 20.0, math.inf, 30.0]
    assert psnr["mean"] == 20.0
    assert psnr["std"] == pytest.approx(np.std([10.0, 20.0, 30.0]))
    assert (psnr["n_finite"], psnr["n_inf"], psnr["n_nan"]) == (3, 1, 0)
    # float32 values are written as their shortest decimal, not 0.30000001192092896.
    assert out["ssim"]["values"] == [0.3, 0.6, 1.0, 0.5]
    assert out["ssim"]["mean"] == pytest.approx(0.6)
    assert out["asr@0.5"] == 0.5


def test_summarize_nan_and_all_inf() -> None:
    out = summarize({"psnr": [math.inf, math.inf], "loss": [1.0, math.nan]})
    assert out["psnr"]["mean"] is None and out["psnr"]["std"] is None
    assert out["psnr"]["n_inf"] == 2
    assert out["loss"]["mean"] == 1.0 and out["loss"]["std"] == 0.0
    assert out["loss"]["n_nan"] == 1
    assert "asr@0.5" not in out


def test_summarize_integer_metrics_become_floats() -> None:
    out = summarize({"hits": np.array([1, 2, 3])})
    assert out["hits"]["values"] == [1.0, 2.0, 3.0]
    assert out["hits"]["mean"] == 2.0


@pytest.mark.parametrize(
    "bad, match",
    [
        ({}, "non-empty mapping"),
        ({"psnr": []}, "non-empty per-image"),
        ({"psnr": [[1.0, 2.0]]}, r"\[N\]"),
        ({"psnr": [1.0, 2.0], "ssim": [0.1]}, "same images"),
        ({"psnr": ["a", "b"]}, "real numbers"),
    ],
)
def test_summarize_validation(bad, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        summarize(bad)
    with pytest.raises(TypeError, match="strings"):
        summarize({3: [1.0]})


def test_write_metrics_json_roundtrip_with_inf(tmp_path) -> None:
    metrics = {
        "psnr": np.array([12.5, np.inf], np.float32),
        "ssim": np.array([0.25, 1.0], np.float32),
    }
    extra = {"eps": 8.0, "seed": np.int64(3), "noise": jnp.array([0.5, 1.5]), "dataset": "mnist"}
    path = write_metrics_json(tmp_path / "run" / "metrics.json", metrics, extra=extra)
    assert path == tmp_path / "run" / "metrics.json"
    text = path.read_text()
    assert text.startswith("{\n  ") and text.endswith("}\n")  # indented, newline-terminated
    # Strict JSON: no Infinity / NaN tokens; a perfect PSNR is null, counted by n_inf.
    loaded = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON token {c}"))
    assert loaded["n"] == 2
    assert loaded["eps"] == 8.0 and loaded["seed"] == 3 and loaded["dataset"] == "mnist"
    assert loaded["noise"] == [0.5, 1.5]
    assert loaded["metrics"]["psnr"]["values"] == [12.5, None]
    assert loaded["metrics"]["psnr"]["n_inf"] == 1
    assert loaded["metrics"]["psnr"]["mean"] == 12.5
    assert loaded["metrics"]["asr@0.5"] == 0.5
    expected = summarize(metrics)
    expected["psnr"]["values"] = [12.5, None]
    assert loaded["metrics"] == expected


def test_write_metrics_json_without_extra_and_reserved_keys(tmp_path) -> None:
    path = write_metrics_json(tmp_path / "m.json", {"mse": [0.0, 0.5, 1.0]})
    assert set(json.loads(path.read_text())) == {"metrics", "n"}
    with pytest.raises(ValueError, match="reserved"):
        write_metrics_json(tmp_path / "x.json", {"mse": [0.0]}, extra={"n": 5})
    with pytest.raises(TypeError):
        write_metrics_json(tmp_path / "y.json", {"mse": [0.0]}, extra={"bad": object()})


# ----------------------------------------------------------------------------
# format_table
# ----------------------------------------------------------------------------


def test_format_table_exact() -> None:
    rows = [
        {"attack": "idlg", "eps": 1, "psnr": 12.3456, "ssim": np.float32(0.5)},
        {"attack": "inverting", "eps": 10, "psnr": math.inf, "ssim": 0.91234},
        {"attack": "none", "delta": 1e-5},
    ]
    expected = (
        "attack     eps   psnr    ssim\n"
        "---------  ---  -----  ------\n"
        "idlg         1  12.35     0.5\n"
        "inverting   10    inf  0.9123\n"
        "none"
    )
    assert format_table(rows, ["attack", "eps", "psnr", "ssim"]) == expected


def test_format_table_columns_line_up() -> None:
    rows = [{"a": "x", "b": 123456, "c": 0.5}, {"a": "longer text", "b": 7, "c": None}]
    header, rule, *body = format_table(rows, ["a", "b", "c"]).splitlines()
    # Column spans are the dash runs of the rule.
    spans, start = [], 0
    for dashes in rule.split("  "):
        spans.append((start, start + len(dashes)))
        start += len(dashes) + 2
    assert spans == [(0, 11), (13, 19), (21, 24)]
    assert [line[13:19] for line in body] == ["123456", "     7"]  # numbers right-aligned
    assert [line[0:11] for line in body] == ["x          ", "longer text"]  # text left-aligned
    assert body[0][21:24] == "0.5" and body[1] == "longer text       7"
    assert header == "a                 b    c"


def test_format_table_header_only_and_errors() -> None:
    assert format_table([], ["eps", "psnr"]) == "eps  psnr\n---  ----"
    with pytest.raises(ValueError, match="columns"):
        format_table([{"a": 1}], [])
    with pytest.raises(TypeError, match="mapping"):
        format_table([("a", 1)], ["a"])


# ----------------------------------------------------------------------------
# save_image_grid
# ----------------------------------------------------------------------------


def test_grid_size_mode_and_pixels_grayscale(tmp_path) -> None:
    originals = np.zeros((3, 28, 28, 1), np.float32)
    originals[1] = 1.0
    originals[2, 0, 0, 0] = 0.5
    recon = np.full((3, 28, 28, 1), 1.7)  # clipped to 1
    recon[0] = -0.3  # clipped to 0
    path = save_image_grid(tmp_path / "g.png", [originals, recon], pad=2, scale=3)
    image = Image.open(path)
    assert image.mode == "L"
    assert image.size == (2 + 3 * (84 + 2), 2 + 2 * (84 + 2))
    pixels = np.asarray(image)
    assert pixels[0, 0] == 255 and pixels[2, 2] == 0  # white frame, black first cell
    cell1 = pixels[2:86, 88:172]
    assert cell1.shape == (84, 84) and np.all(cell1 == 255)
    # Nearest-neighbour: pixel (0, 0) of image 2 fills a 3x3 block.
    block = pixels[2:5, 174:177]
    assert np.all(block == 128) and pixels[5, 174] == 0 and pixels[2, 177] == 0
    assert np.all(pixels[88:172, 2:86] == 0) and np.all(pixels[88:172, 88:172] == 255)


def test_grid_rgb_short_rows_and_mixed_channels(tmp_path) -> None:
    rng = np.random.default_rng(0)
    rgb = rng.random((2, 32, 32, 3))
    gray = np.full((4, 32, 32, 1), 0.25)
    path = save_image_grid(tmp_path / "sub" / "g.png", [rgb, gray], pad=1, scale=1)
    image = Image.open(path)
    assert image.mode == "RGB"
    assert image.size == (1 + 4 * 33, 1 + 2 * 33)
    pixels = np.asarray(image)
    np.testing.assert_array_equal(pixels[1:33, 1:33], np.round(rgb[0] * 255).astype(np.uint8))
    assert np.all(pixels[1:33, 67:99] == 255)  # first row has only 2 images: blank cell
    assert np.all(pixels[34:66, 1:33] == 64)  # gray repeated over RGB


def test_grid_auto_scale_and_labels(tmp_path) -> None:
    digits = np.zeros((2, 28, 28, 1))
    plain = Image.open(save_image_grid(tmp_path / "a.png", [digits, digits]))
    assert plain.size == (2 + 2 * (84 + 2), 2 + 2 * (84 + 2))  # auto scale 3 for 28x28
    labelled = Image.open(
        save_image_grid(tmp_path / "b.png", [digits, digits], row_labels=["original", "eps=1"])
    )
    extra = labelled.size[0] - plain.size[0]
    assert labelled.size[1] == plain.size[1] and extra > 20
    label_area = np.asarray(labelled)[:, :extra]
    assert label_area.min() < 128  # text drawn in black on white
    np.testing.assert_array_equal(np.asarray(labelled)[:, extra:], np.asarray(plain))
    big = Image.open(save_image_grid(tmp_path / "c.png", [np.zeros((1, 128, 128, 3))], pad=0))
    assert big.size == (128, 128)


@pytest.mark.parametrize(
    "rows, kwargs, match",
    [
        ([], {}, "non-empty"),
        (np.zeros((2, 8, 8, 1)), {}, "non-empty sequence"),
        ([np.zeros((8, 8, 1))], {}, r"\[N, H, W, C\]"),
        ([np.zeros((0, 8, 8, 1))], {}, "no images"),
        ([np.zeros((1, 8, 8, 2))], {}, "channels"),
        ([np.zeros((1, 8, 8, 1)), np.zeros((1, 9, 8, 1))], {}, "H x W"),
        ([np.zeros((1, 8, 8, 1))], {"row_labels": ["a", "b"]}, "row_labels"),
        ([np.zeros((1, 8, 8, 1))], {"scale": 0}, "scale"),
        ([np.zeros((1, 8, 8, 1))], {"pad": -1}, "pad"),
        ([np.array([[[["a"]]]])], {}, "numeric"),
    ],
)
def test_grid_validation(tmp_path, rows, kwargs, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        save_image_grid(tmp_path / "g.png", rows, **kwargs)
    assert not (tmp_path / "g.png").exists()


@pytest.mark.parametrize("module", [summary_module, grid_module])
def test_docstring_examples(module) -> None:
    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0
