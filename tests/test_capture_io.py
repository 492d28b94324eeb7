"""The capture file, version 2: round trip, version 1 files, every rejection, atomic writes, fuzz.

Captures are built by hand (no simulation): tiny arrays, exact expectations.
"""

import functools
import io
import json
import math
import os
import tempfile
import warnings
import zipfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxleak.capture.io import (
    REQUIRED_META,
    Capture,
    CaptureFormatError,
    check_output_path,
    load_capture,
    save_capture,
    validate_capture,
)

N, M, B, E = 3, 5, 2, 2  # clients, images per client, local batch, local epochs
S = -(-M // B)  # local steps per epoch (the last batch is padded with -1)
IMAGE, FEATURE, K = [2, 2, 1], [1, 2, 3], 4
D = math.prod(FEATURE)


def _strict_json(text):
    def refuse(token):
        raise ValueError(f"non-strict JSON token {token}")

    return json.loads(text, parse_constant=refuse)


def _schedule(rng, n=N, m=M, b=B, e=E):
    s = -(-m // b)
    rows = [np.concatenate([rng.permutation(m), np.full(s * b - m, -1)]).reshape(s, b)
            for _ in range(n * e)]
    return np.stack(rows).reshape(n, e, s, b).astype(np.int32)


def _meta(*, m=M, b=B, e=E, kind="fedavg", dp=True, scope="all"):
    dp_record = {"calibration": "dpsgd", "mechanism": "gaussian", "epsilon": 8.0, "delta": 1e-5,
                 "clip": 1.0, "noise_std": 0.25, "noise_variance": 0.0625,
                 "noise_multiplier": 1.1, "accountant": "rdp", "steps": e * -(-m // b)}
    flat = ({k: dp_record[k] for k in ("calibration", "mechanism", "epsilon", "delta", "clip",
                                       "noise_std", "noise_variance")} if dp else
            {"calibration": "none", "mechanism": None, "epsilon": math.inf, "delta": None,
             "clip": None, "noise_std": 0.0, "noise_variance": 0.0})
    return {
        "format_version": 2, "model": "tiny", "image_shape": IMAGE, "num_classes": K,
        "feature_shape": FEATURE, "feature_layout": "HWC", "layer": "head",
        "layer_path": ["head"], "update_scope": scope,
        "protocol": {"kind": kind, "local_epochs": e, "local_batch": b, "local_steps": -(-m // b),
                     "samples": m, "optimizer": "sgd" if kind == "fedavg" else None,
                     "lr": 0.004 if kind == "fedavg" else None, "global_epoch": None},
        "defenses": ([{"name": "clip-norm", "c": 1.0}, {"name": "dpsgd", **dp_record}] if dp
                     else []),
        "dp": dp_record if dp else None,
        "dataset": "random", "dataset_split": "test", "seed": 7, "init_seed": 0,
        "jaxleak_version": "0.test", "batch_size": b, **flat,
    }


def _capture(*, m=M, b=B, e=E, kind="fedavg", dp=True, scope="all", params=True, seed=0):
    rng = np.random.default_rng(seed)
    variables = {"params/head/kernel": rng.standard_normal((D, K)).astype(np.float32),
                 "params/head/bias": rng.standard_normal(K).astype(np.float32),
                 "params/conv/kernel": rng.standard_normal((3, 3, 1, 2)).astype(np.float32),
                 "batch_stats/bn/mean": rng.standard_normal(2).astype(np.float32)}
    update = {k[len("params/"):]: rng.standard_normal((N, *v.shape)).astype(np.float32)
              for k, v in variables.items() if k.startswith("params/")}
    if scope == "head":
        update.pop("conv/kernel")
    return Capture(
        update=update,
        meta=_meta(m=m, b=b, e=e, kind=kind, dp=dp, scope=scope),
        params=variables if params else None,
        truth_images=rng.integers(0, 256, (N, m, *IMAGE), dtype=np.uint8),
        truth_labels=rng.integers(0, K, (N, m), dtype=np.int32),
        schedule=_schedule(rng, m=m, b=b, e=e),
    )


def _raw(path):
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


@functools.lru_cache(maxsize=1)
def _v2_bytes():
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "base.npz")
        save_capture(path, _capture())
        with open(path, "rb") as f:
            return f.read()


def _write(path, arrays):
    with open(path, "wb") as f:  # a file object: np.savez must not append ".npz"
        np.savez(f, **arrays)
    return path


def _meta_array(meta):
    return np.array(json.dumps(meta))


@pytest.fixture()
def saved(tmp_path):
    cap = _capture()
    path = tmp_path / "caps.npz"
    save_capture(path, cap)
    return path, cap


# ------------------------------------------------------------------------- round trip


def test_v2_round_trip_keeps_every_field_and_writes_strict_json(tmp_path):
    cap = _capture(dp=False)
    path = tmp_path / "caps.npz"
    save_capture(path, cap)
    raw = _raw(path)
    assert set(raw) == ({f"update/{k}" for k in cap.update} | set(cap.params)
                        | {"truth/images", "truth/labels", "truth/schedule", "meta"})
    assert raw["update/head/kernel"].dtype == np.float32 and raw["truth/images"].dtype == np.uint8
    assert raw["truth/labels"].dtype == np.int32 and raw["truth/schedule"].dtype == np.int32
    text = str(raw["meta"])
    assert "Infinity" not in text and "NaN" not in text
    meta = _strict_json(text)
    assert meta["epsilon"] is None  # inf is written as null
    assert set(REQUIRED_META) <= set(meta)

    back = load_capture(path)
    for k, v in cap.update.items():
        np.testing.assert_array_equal(back.update[k], v)
    for k, v in cap.params.items():
        np.testing.assert_array_equal(back.params[k], v)
    for field in ("truth_images", "truth_labels", "schedule"):
        np.testing.assert_array_equal(getattr(back, field), getattr(cap, field))
    assert back.meta == {**cap.meta, "epsilon": None}
    # the derived views
    assert back.n == N and back.samples == M and back.num_classes == K
    assert back.feature_shape == tuple(FEATURE) and back.image_shape == tuple(IMAGE)
    assert back.layer_key == "head" and back.protocol["kind"] == "fedavg"
    np.testing.assert_array_equal(back.fc_weight_grad, cap.update["head/kernel"].transpose(0, 2, 1))
    assert back.fc_weight_grad.shape == (N, K, D) and back.fc_weight_grad is back.fc_weight_grad
    np.testing.assert_array_equal(back.fc_bias_grad, cap.update["head/bias"])
    assert back.labels.shape == (N, M) and back.images.shape == (N, M, *IMAGE)
    np.testing.assert_allclose(back.images_float() * 255.0, cap.truth_images)
    assert back.whole_update is back.update
    assert "n=3" in repr(back)


def test_dp_meta_and_compression_round_trip(tmp_path):
    cap = _capture()
    save_capture(tmp_path / "c.npz", cap, compress=True)
    back = load_capture(tmp_path / "c.npz")
    assert back.meta == cap.meta and back.meta["dp"]["epsilon"] == 8.0


def test_single_image_clients_have_flat_label_and_image_views_and_head_scope(tmp_path):
    cap = _capture(m=1, b=1, e=1, kind="fedsgd", scope="head", params=False)
    save_capture(tmp_path / "c.npz", cap)
    back = load_capture(tmp_path / "c.npz")
    assert back.labels.shape == (N,) and back.images.shape == (N, *IMAGE)
    assert back.images_float().shape == (N, *IMAGE)
    assert back.whole_update is None and back.params is None
    assert back.schedule.shape == (N, 1, 1, 1)


def test_truth_is_optional(tmp_path):
    cap = _capture()
    bare = Capture(update=cap.update, meta=cap.meta)
    save_capture(tmp_path / "c.npz", bare)
    back = load_capture(tmp_path / "c.npz")
    assert back.labels is None and back.images is None and back.images_float() is None
    assert back.schedule is None and back.params is None


# ------------------------------------------------------------------------- version 1


def _v1_meta(batch, **over):
    meta = {"model": "tiny", "dataset": "random", "dataset_split": "test", "image_shape": IMAGE,
            "num_classes": K, "feature_shape": FEATURE, "feature_layout": "HWC", "layer": "head",
            "layer_path": ["head"], "protocol": "fedsgd", "batch_size": batch,
            "calibration": "none", "mechanism": "gaussian", "epsilon": "inf", "delta": 1e-5,
            "clip": 1.0, "noise_std": 0.0, "noise_variance": 0.0, "noise_multiplier": None,
            "seed": 0, "init_seed": 0, "jaxleak_version": "0.1", "scope": "all"}
    return {**meta, **over}


def _v1_arrays(batch=1, *, update=False, **meta_over):
    rng = np.random.default_rng(1)
    shape = (N,) if batch == 1 else (N, batch)
    arrays = {
        "fc_weight_grad": rng.standard_normal((N, K, D)).astype(np.float32),
        "fc_bias_grad": rng.standard_normal((N, K)).astype(np.float32),
        "labels": rng.integers(0, K, shape).astype(np.int64),
        "images": rng.integers(0, 256, (*shape, *IMAGE), dtype=np.uint8),
        "meta": _meta_array(_v1_meta(batch, **meta_over)),
    }
    if update:
        arrays["update/head/kernel"] = arrays["fc_weight_grad"].transpose(0, 2, 1).copy()
        arrays["update/head/bias"] = arrays["fc_bias_grad"]
        arrays["update/conv/kernel"] = rng.standard_normal((N, 3, 3, 1, 2)).astype(np.float32)
        arrays["params/head/kernel"] = np.zeros((D, K), np.float32)
        arrays["params/head/bias"] = np.zeros(K, np.float32)
        arrays["params/conv/kernel"] = np.zeros((3, 3, 1, 2), np.float32)
    return arrays


def test_v1_single_image_file_loads_with_the_same_views(tmp_path):
    arrays = _v1_arrays(1)
    cap = load_capture(_write(tmp_path / "v1.npz", arrays))
    np.testing.assert_array_equal(cap.fc_weight_grad, arrays["fc_weight_grad"])
    np.testing.assert_array_equal(cap.fc_bias_grad, arrays["fc_bias_grad"])
    np.testing.assert_array_equal(cap.labels, arrays["labels"])
    assert cap.labels.dtype == np.int32
    np.testing.assert_array_equal(cap.images, arrays["images"])
    assert cap.update["head/kernel"].shape == (N, D, K)
    m = cap.meta
    assert m["format_version"] == 2 and m["upgraded_from"] == 1 and m["update_scope"] == "head"
    assert m["protocol"] == {"kind": "fedsgd", "local_epochs": 1, "local_batch": 1,
                             "local_steps": 1, "samples": 1, "optimizer": None, "lr": None,
                             "global_epoch": None}
    assert m["defenses"] == [] and m["dp"] is None and m["epsilon"] == math.inf
    assert cap.whole_update is None
    np.testing.assert_array_equal(cap.schedule, np.zeros((N, 1, 1, 1)))


def test_v1_batch_file_with_update_and_dp_loads_and_saves_as_v2(tmp_path):
    arrays = _v1_arrays(3, update=True, calibration="paper", epsilon=10.0, noise_std=0.01,
                        noise_variance=1e-4, dp_lr=0.001, noise_scale=0.01)
    cap = load_capture(_write(tmp_path / "v1.npz", arrays))
    np.testing.assert_array_equal(cap.fc_weight_grad, arrays["fc_weight_grad"])
    np.testing.assert_array_equal(cap.labels, arrays["labels"])
    np.testing.assert_array_equal(cap.images, arrays["images"])
    assert cap.samples == 3 and cap.meta["update_scope"] == "all"
    assert sorted(cap.whole_update) == ["conv/kernel", "head/bias", "head/kernel"]
    np.testing.assert_array_equal(cap.schedule, np.broadcast_to(np.arange(3), (N, 1, 1, 3)))
    assert cap.meta["dp"]["epsilon"] == 10.0 and cap.meta["dp"]["lr"] == 0.001
    assert cap.meta["defenses"][0]["name"] == "dp-paper"
    save_capture(tmp_path / "v2.npz", cap)
    assert "fc_weight_grad" not in _raw(tmp_path / "v2.npz")
    again = load_capture(tmp_path / "v2.npz")
    np.testing.assert_array_equal(again.fc_weight_grad, cap.fc_weight_grad)
    assert again.meta["upgraded_from"] == 1


def test_v1_file_of_a_hidden_layer_keeps_its_width_and_checks_labels_against_classes(tmp_path):
    arrays = _v1_arrays(1, layer="first", layer_path=["Dense_0"])
    arrays["fc_weight_grad"] = np.ones((N, 7, D), np.float32)  # 7 hidden units, K = 4 classes
    arrays["fc_bias_grad"] = np.ones((N, 7), np.float32)
    cap = load_capture(_write(tmp_path / "v1.npz", arrays))
    assert cap.layer_key == "Dense_0" and cap.fc_weight_grad.shape == (N, 7, D)
    assert cap.update["Dense_0/kernel"].shape == (N, D, 7) and cap.num_classes == K
    arrays["labels"] = np.array([0, 1, 5])  # < 7 rows but not < 4 classes
    with pytest.raises(CaptureFormatError, match=r"truth/labels must be in \[0, 4\)"):
        load_capture(_write(tmp_path / "v1b.npz", arrays))


@pytest.mark.parametrize("change,message", [
    ({"fc_weight_grad": None}, "missing required key(s) ['fc_weight_grad']"),
    ({"fc_bias_grad": np.zeros((N, 3), np.float32)}, "fc_bias_grad must be [N, K]"),
    ({"fc_weight_grad": np.zeros((N, K, 5), np.float32)}, "meta.feature_shape"),
    ({"labels": np.array([0, 1, 9])}, "truth/labels must be in [0, 4)"),
    ({"labels": np.zeros(N, np.float32)}, "labels must be integers"),
    ({"images": np.zeros((N, 2, 2, 1), np.float32)}, "truth/images must be uint8"),
    ({"images": np.zeros((N, 3, 2, 1), np.uint8)}, "truth/images must have shape"),
    ({"stray": np.zeros(2)}, "unexpected key 'stray'"),
    ({"meta": _meta_array({"model": "x"})}, "meta is missing field(s)"),
    ({"meta": _meta_array(_v1_meta(2))}, "meta.batch_size must be 1"),
    ({"meta": _meta_array(_v1_meta(1, calibration=3))}, "meta.calibration"),
    ({"meta": _meta_array(_v1_meta(1, layer_path="head"))}, "meta.layer_path"),
])
def test_malformed_v1_files_are_rejected(tmp_path, change, message):
    arrays = _v1_arrays(1)
    for k, v in change.items():
        if v is None:
            arrays.pop(k)
        else:
            arrays[k] = v
    with pytest.raises(CaptureFormatError, match=None) as err:
        load_capture(_write(tmp_path / "bad.npz", arrays))
    assert message in str(err.value) and "\n" not in str(err.value)


# ------------------------------------------------------------------ version 2 rejections


def _set_meta(**over):
    def change(arrays):
        meta = json.loads(str(arrays["meta"]))
        for key, value in over.items():
            node = meta
            *parents, leaf = key.split(".")
            for p in parents:
                node = node[p]
            if value is _DROP:
                del node[leaf]
            else:
                node[leaf] = value
        arrays["meta"] = _meta_array(meta)

    return change


def _set(**arrays_over):
    def change(arrays):
        for key, value in arrays_over.items():
            key = key.replace("__", "/")
            if value is _DROP:
                arrays.pop(key)
            else:
                arrays[key] = value(arrays.get(key)) if callable(value) else value

    return change


_DROP = object()


def _with_nan(a):
    a = a.astype(np.float64)
    a.flat[3] = np.nan
    return a


def _duplicate_first_image(s):
    s = s.copy()
    s[1, 0, 0, 0] = s[1, 0, 0, 1] if s[1, 0, 0, 1] >= 0 else 0
    return s


REJECTIONS = [
    # meta as a whole
    (_set(meta=np.array(json.dumps([1, 2]))), "key 'meta' must be a JSON object, got a JSON array"),
    (_set(meta=np.array("{not json")), "key 'meta' is not valid strict JSON"),
    (_set(meta=np.array('{"epsilon": NaN}')), "not valid strict JSON (NaN is not strict JSON)"),
    (_set(meta=np.array(["{}"])), "key 'meta' must be a 0-d string"),
    (_set(meta=_DROP), "missing required key 'meta'"),
    (_set_meta(format_version=3), "meta.format_version 3 is not supported"),
    (_set_meta(protocol=_DROP), "meta is missing field(s) ['protocol']"),
    # numeric and typed fields
    (_set_meta(init_seed="x"), "meta.init_seed must be an integer or null, got 'x'"),
    (_set_meta(batch_size="x"), "meta.batch_size must be an integer, got 'x'"),
    (_set_meta(noise_variance="x"), "meta.noise_variance must be a number or null, got 'x'"),
    (_set_meta(epsilon="x"), "meta.epsilon must be a number or null, got 'x'"),
    (_set_meta(**{"dp.epsilon": "x"}), "meta.dp.epsilon must be a number or null"),
    (_set_meta(num_classes="x"), "meta.num_classes must be an integer >= 2, got 'x'"),
    (_set_meta(num_classes=1), "meta.num_classes must be an integer >= 2, got 1"),
    (_set_meta(seed=1.5), "meta.seed must be an integer"),
    (_set_meta(model=3), "meta.model must be a string"),
    (_set_meta(image_shape=[2, 2]), "meta.image_shape must be [H, W, C]"),
    (_set_meta(feature_shape=[1, 2, "3"]), "meta.feature_shape must be [H, W, C]"),
    (_set_meta(feature_layout="CHW"), "meta.feature_layout must be 'HWC'"),
    (_set_meta(layer_path="head"), "meta.layer_path must be a non-empty list"),
    (_set_meta(update_scope="some"), "meta.update_scope must be one of"),
    (_set_meta(checkpoint=5), "meta.checkpoint must be a string or null"),
    # protocol
    (_set_meta(protocol=[1]), "meta.protocol must be an object"),
    (_set_meta(**{"protocol.kind": "fedprox"}), "meta.protocol.kind must be one of"),
    (_set_meta(**{"protocol.lr": "fast"}), "meta.protocol.lr must be a number or null"),
    (_set_meta(**{"protocol.local_steps": 2}), "meta.protocol.local_steps must be ceil"),
    (_set_meta(**{"protocol.local_epochs": 0}),
     "meta.protocol.local_epochs must be an integer >= 1"),
    (_set_meta(**{"protocol.samples": _DROP}), "meta.protocol is missing field(s) ['samples']"),
    (_set_meta(**{"protocol.kind": "fedsgd"}), "meta.protocol: fedsgd takes one step"),
    (_set_meta(batch_size=3), "meta.batch_size must equal meta.protocol.local_batch 2"),
    # defenses and dp
    (_set_meta(defenses={"name": "x"}), "meta.defenses must be a list"),
    (_set_meta(defenses=[{"c": 1}]), "meta.defenses[0] must be an object with a string 'name'"),
    (_set_meta(dp=[1]), "meta.dp must be an object or null"),
    (_set_meta(dp=None), "meta.calibration must be 'none' when meta.dp is null"),
    (_set_meta(clip=2.0), "meta.clip 2.0 must copy meta.dp.clip 1.0"),
    # update
    (_set(update__head__kernel=_DROP), "update/head/kernel is missing"),
    (_set(update__head__kernel=lambda a: a[..., :3]),
     "update/head/kernel has K = 3 outputs but meta.num_classes is 4"),
    (_set(update__head__kernel=lambda a: a[:, :5]), "update/head/kernel has d = 5 inputs"),
    (_set(update__head__bias=lambda a: a[:, :3]), "update/head/bias must be [N, K] = (3, 4)"),
    (_set(update__head__bias=lambda a: a.astype(np.int32)), "update/head/bias must be floating"),
    (_set(update__conv__kernel=lambda a: a[:2]), "update/conv/kernel must lead with N = 3"),
    (_set(update__conv__kernel=_with_nan), "update/conv/kernel contains 1 non-finite value(s)"),
    (_set(update__extra__kernel=np.zeros((N, 2), np.float32)),
     "update/extra/kernel has no matching params/extra/kernel"),
    (_set(update__conv__kernel=lambda a: a[..., :1]),
     "update/conv/kernel is (3, 3, 1, 1) per client but params/conv/kernel is (3, 3, 1, 2)"),
    (_set(update__conv__kernel=_DROP),
     "meta.update_scope is 'all' but update/conv/kernel is missing"),
    (_set(params__head__bias=lambda a: a.astype(complex)), "params/head/bias must be numeric"),
    (_set(weights__x=np.zeros(2)), "unexpected key 'weights/x'"),
    # truth
    (_set(truth__images=lambda a: a.astype(np.float32)), "truth/images must be uint8"),
    (_set(truth__images=lambda a: a[:, :4]), "truth/images must have shape [N, M, *image_shape]"),
    (_set(truth__labels=lambda a: a + 4), "truth/labels must be in [0, 4)"),
    (_set(truth__labels=lambda a: a.astype(np.float32)), "truth/labels must hold integers"),
    (_set(truth__labels=lambda a: a[:2]), "truth/labels must have shape (3, 5)"),
    (_set(truth__labels=lambda a: a.astype(np.int64) + 2**40), "truth/labels holds values outside"),
    (_set(truth__schedule=lambda a: a + 5), "truth/schedule must be in [-1, 5)"),
    (_set(truth__schedule=lambda a: a[:, :1]), "truth/schedule must have shape (3, 2, 3, 2)"),
    (_set(truth__schedule=_duplicate_first_image),
     "truth/schedule: epoch 0 of client 1 does not visit each of the M = 5 images exactly once"),
    # not arrays a capture holds
    (_set(truth__labels=np.array([{"evil": 1}], dtype=object)), "holds pickled Python objects"),
]


@pytest.mark.parametrize("change,message", REJECTIONS, ids=[m[:40] for _, m in REJECTIONS])
def test_malformed_v2_files_are_rejected_with_one_line_naming_the_field(saved, tmp_path, change,
                                                                          message):
    path, _ = saved
    arrays = _raw(path)
    change(arrays)
    bad = _write(tmp_path / "bad.npz", arrays)
    with pytest.raises(CaptureFormatError) as err:
        load_capture(bad)
    text = str(err.value)
    assert message in text and "\n" not in text and text.startswith(str(bad))


def _npy_member(header_shape, descr="<f8", payload=b"\0" * 16):
    header = repr({"descr": descr, "fortran_order": False, "shape": header_shape})
    header = header.encode("latin1")
    pad = 64 - (10 + len(header) + 1) % 64
    header += b" " * pad + b"\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + payload


def test_a_huge_header_shape_is_refused_before_any_allocation(saved, tmp_path):
    path, _ = saved
    bad = tmp_path / "huge.npz"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(bad, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename == "truth/labels.npy":
                data = _npy_member((10**6, 10**6, 10**6))  # 8e18 bytes claimed
            dst.writestr(info.filename, data)
    with pytest.raises(CaptureFormatError, match="truth/labels.*header claims shape"):
        load_capture(bad)


def test_garbage_truncated_foreign_and_missing_files(saved, tmp_path):
    path, _ = saved
    (tmp_path / "garbage.npz").write_bytes(b"not a zip file at all")
    with pytest.raises(CaptureFormatError, match="not a readable .npz"):
        load_capture(tmp_path / "garbage.npz")
    data = path.read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(CaptureFormatError):
        load_capture(tmp_path / "cut.npz")
    with zipfile.ZipFile(tmp_path / "text.npz", "w") as z:
        z.writestr("readme.txt", "hello")
    with pytest.raises(CaptureFormatError, match="'readme.txt' is not a .npy array"):
        load_capture(tmp_path / "text.npz")
    np.save(tmp_path / "plain.npy", np.zeros(3))
    with pytest.raises(CaptureFormatError, match="not a readable"):
        load_capture(tmp_path / "plain.npy")
    with pytest.raises(CaptureFormatError, match="is a directory"):
        load_capture(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_capture(tmp_path / "absent.npz")


# --------------------------------------------------------------------------- writing


def test_save_validates_first_and_writes_nothing_on_error(tmp_path):
    cap = _capture()
    bad = Capture(update=cap.update, meta={**cap.meta, "num_classes": 9})
    with pytest.raises(CaptureFormatError, match="meta.num_classes is 9"):
        save_capture(tmp_path / "c.npz", bad)
    odd = Capture(update=cap.update, meta={**cap.meta, "extra": {1, 2}})
    with pytest.raises(CaptureFormatError, match="meta.extra is not JSON-ready: a set"):
        save_capture(tmp_path / "c.npz", odd)
    assert os.listdir(tmp_path) == []
    with pytest.raises(CaptureFormatError, match="meta must be a JSON object"):
        validate_capture(Capture(update={}, meta=[1]))


def test_a_failing_write_leaves_neither_target_nor_temp_file(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", boom)
    with pytest.raises(OSError, match="disk full"):
        save_capture(tmp_path / "c.npz", _capture())
    assert os.listdir(tmp_path) == []
    (tmp_path / "old.npz").write_bytes(b"old")
    with pytest.raises(OSError, match="disk full"):
        save_capture(tmp_path / "old.npz", _capture(), force=True)
    assert os.listdir(tmp_path) == ["old.npz"] and (tmp_path / "old.npz").read_bytes() == b"old"


def test_the_temp_file_is_hidden_next_to_the_target(tmp_path, monkeypatch):
    seen = []
    real = os.replace

    def spy(src, dst):
        seen.append((src, dst))
        real(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    save_capture(tmp_path / "sub" / "c.npz", _capture())  # missing folders are created
    (src, dst), = seen
    assert os.path.dirname(src) == str(tmp_path / "sub") and os.path.basename(src).startswith(".")
    assert src.endswith(".npz") and dst == str(tmp_path / "sub" / "c.npz")
    assert os.listdir(tmp_path / "sub") == ["c.npz"]


def test_existing_outputs_are_refused_unless_forced(saved, tmp_path):
    path, _ = saved
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="--force") as err:
        save_capture(path, _capture(seed=1))
    assert "\n" not in str(err.value) and path.read_bytes() == before
    save_capture(path, _capture(seed=1), force=True)
    assert path.read_bytes() != before
    np.testing.assert_array_equal(load_capture(path).update["head/bias"],
                                  _capture(seed=1).update["head/bias"])
    assert sorted(os.listdir(tmp_path)) == ["caps.npz"]


def test_check_output_path_catches_bad_targets_before_work(tmp_path, monkeypatch):
    check_output_path(tmp_path / "new" / "deeper" / "c.npz")
    with pytest.raises(IsADirectoryError, match="is a directory"):
        check_output_path(tmp_path)
    with pytest.raises(IsADirectoryError):
        save_capture(tmp_path, _capture(), force=True)
    assert os.listdir(tmp_path) == []
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(FileExistsError, match="--force"):
        check_output_path(tmp_path / "file")
    check_output_path(tmp_path / "file", force=True)
    with pytest.raises(NotADirectoryError, match="is a file, not a folder"):
        check_output_path(tmp_path / "file" / "c.npz")
    monkeypatch.setattr(os, "access", lambda *a, **k: False)  # root may write anywhere
    with pytest.raises(PermissionError, match="not writable"):
        check_output_path(tmp_path / "c.npz")


# ------------------------------------------------------------------------------ fuzz

_DTYPES = ["float32", "float64", "float16", "int32", "int64", "uint8", "bool", "complex64",
           "<U3", ">f4", "object"]
_FILLS = [0, 1, -1, 3, 255, 2**31, 1e30, 1e300, float("nan"), float("inf")]
_KEYS = ["update/head/kernel", "update/head/bias", "update/conv/kernel", "update/x",
         "params/head/kernel", "params/conv/kernel", "batch_stats/bn/mean", "truth/images",
         "truth/labels", "truth/schedule", "fc_weight_grad", "fc_bias_grad", "labels", "images",
         "meta", "other", "update/"]
_META_FIELDS = [*REQUIRED_META, "protocol.kind", "protocol.samples", "protocol.local_batch",
                "protocol.local_steps", "protocol.lr", "dp.epsilon", "init_seed", "layer_path",
                "upgraded_from"]
_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 2**70) | st.floats(allow_nan=True)
    | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner,
                                                                max_size=3),
    max_leaves=6,
)


def _array(dtype, shape, fill):
    if dtype == "object":
        return np.full(shape, fill, dtype=object)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return np.full(shape, fill).astype(dtype)
        except (ValueError, OverflowError, TypeError):
            return np.zeros(shape, dtype)


_edit = st.one_of(
    st.tuples(st.just("drop"), st.sampled_from(_KEYS)),
    st.tuples(st.just("array"), st.sampled_from(_KEYS), st.sampled_from(_DTYPES),
              st.lists(st.integers(0, 4), max_size=5), st.sampled_from(_FILLS)),
    st.tuples(st.just("reshape"), st.sampled_from(_KEYS), st.integers(0, 3)),
    st.tuples(st.just("meta"), st.sampled_from(_META_FIELDS), _json_values),
    st.tuples(st.just("meta_drop"), st.sampled_from(_META_FIELDS)),
    st.tuples(st.just("meta_text"), st.text(max_size=20) | _json_values.map(json.dumps)),
    st.tuples(st.just("bytes"), st.integers(0, 10**6), st.integers(0, 255)),
)


def _apply(arrays, edit):
    kind = edit[0]
    if kind == "drop":
        arrays.pop(edit[1], None)
    elif kind == "array":
        _, key, dtype, shape, fill = edit
        arrays[key] = _array(dtype, tuple(shape), fill)
    elif kind == "reshape" and edit[1] in arrays and arrays[edit[1]].ndim:
        a = arrays[edit[1]]
        cut = min(edit[2], a.ndim - 1)
        arrays[edit[1]] = a[(slice(None),) * cut + (slice(0, max(a.shape[cut] - 1, 0)),)]
    elif kind in ("meta", "meta_drop") and "meta" in arrays:
        try:
            meta = json.loads(str(arrays["meta"]))
            *parents, leaf = edit[1].split(".")
            node = meta
            for p in parents:
                node = node[p]
            if kind == "meta":
                node[leaf] = edit[2]
            else:
                node.pop(leaf, None)
            arrays["meta"] = np.array(json.dumps(meta))
        except (ValueError, KeyError, TypeError, AttributeError):
            pass
    elif kind == "meta_text":
        arrays["meta"] = np.array(edit[1])


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(version=st.sampled_from([1, 2]), edits=st.lists(_edit, min_size=1, max_size=4))
def test_fuzz_loader_returns_a_valid_capture_or_raises_capture_format_error(version, edits):
    arrays = _v1_arrays(2, update=True) if version == 1 else _raw(io.BytesIO(_v2_bytes()))
    corrupt = [e for e in edits if e[0] == "bytes"]
    for edit in edits:
        _apply(arrays, edit)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "f.npz")
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        data = bytearray(buf.getvalue())
        for _, at, value in corrupt:
            data[at % len(data)] = value
        with open(path, "wb") as f:
            f.write(data)
        try:
            cap = load_capture(path)
        except CaptureFormatError as e:
            assert "\n" not in str(e)
            return
        # Whatever loads is a capture that saves and loads back the same.
        out = os.path.join(tmp, "again.npz")
        save_capture(out, cap)
        back = load_capture(out)
        np.testing.assert_array_equal(back.fc_weight_grad, cap.fc_weight_grad)
        assert back.n == cap.n and sorted(back.update) == sorted(cap.update)
