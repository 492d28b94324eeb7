"""The audit file: checks before any work, defaults, cells, keys, shards (no JAX work)."""

import pytest

from jaxleak.audit.grid import AuditSpecError, expand, load_audit, parse_audit, parse_shard, shard

BASE = {"victims": [{"model": "mlp", "layer": "first"}], "attacks": [{"name": "spe"}]}


def spec(**changes):
    raw = {**BASE, **changes}
    return parse_audit(raw, source="a.toml")


def test_defaults_are_filled_in():
    s = spec()
    assert s["name"] == "a" and s["seeds"] == [0] and s["clients"] == 8 and s["null"] == "shuffle"
    assert s["data"]["datasets"] == ["mnist-embedded"] and s["data"]["public_split"] == "train"
    assert s["success"] == {"ssim": 0.5, "psnr": 20.0}
    assert s["protocols"][0]["kind"] == "fedsgd" and s["attacks"][0]["label"] == "spe"


@pytest.mark.parametrize("raw, where", [
    ({"attacks": [{"name": "ig2"}]}, "attacks[0].name: unknown attack 'ig2'"),
    ({"attacks": [{"name": "ig", "config": {"iterations": "many"}}]}, "attacks[0].config"),
    ({"attacks": [{"name": "ig", "config": {"no_such": 1}}]}, "attacks[0].config: ig has no setting 'no_such'"),
    ({"attacks": [{"name": "venom"}]}, "attacks[0].artifact: attack venom needs a trained network"),
    ({"attacks": [{"name": "sme", "options": {"chunks": 10}}]},
     "attacks[0].options.chunks: unknown option of sme; allowed: chunk, target_batch"),
    ({"attacks": [{"name": "spe", "options": {"chunk": 10}}]},
     "attacks[0].options.chunk: unknown option of spe; allowed: sigma2, chunk_size"),
    ({"attacks": [{"name": "spe"}, {"name": "spe"}]}, "attacks[1].label"),
    ({"victims": [{"model": "lenet9"}]}, "victims[0].model: unknown model 'lenet9'"),
    ({"victims": [{"model": "mlp", "wdith": 3}]}, "victims[0].wdith: unknown key"),
    ({"victims": [{"layer": "head"}]}, "victims[0].model: required"),
    ({"defenses": ["gaussian:-1"]}, "defenses[0]"),
    ({"defenses": ["nosuch:1"]}, "defenses[0]"),
    ({"protocols": [{"kind": "fedprox"}]}, "protocols[0].kind: must be one of fedsgd, fedavg"),
    ({"protocols": [{"kind": "fedsgd", "lr": 0.1}]}, "protocols[0].lr: applies to kind = 'fedavg' only"),
    ({"seeds": [0, 0]}, "seeds: must be"),
    ({"clients": 0}, "clients: must be an integer >= 1"),
    ({"clients": 1}, "null: 'shuffle'"),
    ({"null": "zeros"}, "null: must be one of shuffle, noise, none"),
    ({"data": {"datasets": ["no-such-data"]}}, "data.datasets[0]: unknown dataset 'no-such-data'"),
    ({"data": {"split": "train"}}, "data.public_split: must differ"),
    ({"success": {"ssim": 2.0}}, "success.ssim"),
    ({"success": {"lpips": 0.1}}, "success.lpips: unknown key"),
    ({"exclude": [{"attack": "ig"}]}, "exclude[0].attack: 'ig' is not in the grid"),
    ({"exclude": [{"colour": "red"}]}, "exclude[0].colour: unknown key"),
    ({"exclude": [{}]}, "exclude[0]: empty rule"),
    ({"colour": "red"}, "colour: unknown key"),
])
def test_malformed_audits_are_rejected_naming_the_key(raw, where):
    with pytest.raises(AuditSpecError) as e:
        spec(**raw)
    message = str(e.value)
    assert message.startswith("a.toml: ") and where in message and "\n" not in message


def test_known_attack_options_are_kept():
    s = spec(attacks=[{"name": "sme", "options": {"chunk": 50, "batching": "map"}},
                      {"name": "spe", "options": {"sigma2": "mechanism"}}])
    assert s["attacks"][0]["options"] == {"chunk": 50, "batching": "map"}
    assert s["attacks"][1]["options"] == {"sigma2": "mechanism"}


def test_bad_toml_and_file_errors(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("name = \n")
    with pytest.raises(AuditSpecError, match="bad.toml: not valid TOML"):
        load_audit(str(path))
    good = tmp_path / "good.toml"
    good.write_text('[[victims]]\nmodel = "mlp"\n[[attacks]]\nname = "spe"\n')
    assert load_audit(str(good))["name"] == "good"


def grid_spec():
    return spec(defenses=["none", "gaussian:0.1"], seeds=[0, 1],
                attacks=[{"name": "spe"}, {"name": "ig", "label": "ig-short", "config": {"iterations": 2}}],
                exclude=[{"defense": "none", "attack": "ig-short", "seed": 1}])


def test_cells_product_order_exclusions_and_shared_captures():
    cells = expand(grid_spec())
    assert len(cells) == 2 * 2 * 2 - 1
    assert [c.index for c in cells] == list(range(len(cells)))
    # The attack varies fastest; cells differing only in the attack share a capture.
    first = [(c.description["defense"], c.description["seed"], c.description["attack"]["label"]) for c in cells[:3]]
    assert first == [("none", 0, "spe"), ("none", 0, "ig-short"), ("none", 1, "spe")]
    assert cells[0].capture_key == cells[1].capture_key != cells[2].capture_key
    assert len({c.key for c in cells}) == len(cells)
    # ig needs the whole update and the weights: every capture stores them.
    assert all(c.description["store"] == {"keep_update": True, "keep_params": True} for c in cells)


def test_keys_are_stable_and_follow_the_description():
    a, b = expand(grid_spec()), expand(grid_spec())
    assert [c.key for c in a] == [c.key for c in b]
    changed = expand(spec(defenses=["none", "gaussian:0.1"], seeds=[0, 1], attacks=[
        {"name": "spe"}, {"name": "ig", "label": "ig-short", "config": {"iterations": 3}}]))
    assert changed[0].key == a[0].key and changed[1].key != a[1].key
    assert changed[1].capture_key == a[1].capture_key  # the attack's config is not the capture's


def test_shards_are_disjoint_cover_the_grid_and_keep_captures_whole():
    cells = expand(grid_spec())
    for n in (1, 2, 3, 5):
        parts = [shard(cells, i, n) for i in range(n)]
        keys = [c.key for part in parts for c in part]
        assert sorted(keys) == sorted(c.key for c in cells) and len(keys) == len(set(keys))
        for part in parts:
            others = {c.capture_key for p in parts if p is not part for c in p}
            assert not {c.capture_key for c in part} & others


@pytest.mark.parametrize("text", ["2/2", "a/b", "1", "-1/3", ""])
def test_bad_shards(text):
    with pytest.raises(ValueError, match="--shard takes i/n"):
        parse_shard(text)
