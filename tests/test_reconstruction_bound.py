"""The ReRo bound (NOTES section 6): closed form, Monte Carlo, capture metas, the baseline kappa."""

import functools
import math

import numpy as np
import pytest
from scipy.stats import norm

from jaxleak.privacy import (
    baseline_kappa,
    bound_for_meta,
    mu_gaussian,
    mu_paper_calibration,
    reconstruction_bound,
)
from jaxleak.privacy.reconstruction import _monte_carlo

# ----------------------------------------------------------------------------
# reconstruction_bound
# ----------------------------------------------------------------------------


def test_known_value_and_the_closed_form():
    assert round(reconstruction_bound(0.1, mu=1.0), 3) == 0.389
    for kappa, mu in [(0.01, 0.5), (0.3, 2.0), (0.9, 0.1)]:
        expected = norm.cdf(norm.ppf(kappa) + mu)
        assert reconstruction_bound(kappa, mu=mu) == pytest.approx(expected, rel=1e-12)


def test_mu_zero_gives_kappa_and_the_edges():
    for kappa in (0.0, 0.05, 0.5, 1.0):
        assert reconstruction_bound(kappa, mu=0.0) == kappa
    assert reconstruction_bound(0.0, mu=3.0) == 0.0
    assert reconstruction_bound(1.0, mu=3.0) == 1.0
    assert reconstruction_bound(0.0, mu=math.inf) == 1.0  # disjoint releases: always found
    assert reconstruction_bound(0.2, noise_multiplier=0.0) == 1.0
    # no noise, subsampled: found iff sampled at least once, else the baseline
    assert reconstruction_bound(0.2, noise_multiplier=0.0, sampling_rate=0.1, steps=3) == \
        pytest.approx(1 - 0.9**3 * 0.8, rel=1e-12)
    assert reconstruction_bound(0.0, noise_multiplier=1.0, sampling_rate=0.5, steps=3) == 0.0
    assert reconstruction_bound(1.0, noise_multiplier=1.0, sampling_rate=0.5, steps=3) == 1.0


def test_monotone_in_mu_and_kappa():
    mus = np.linspace(0.0, 6.0, 25)
    kappas = np.linspace(0.0, 1.0, 21)
    grid = np.array([[reconstruction_bound(float(k), mu=float(m)) for m in mus] for k in kappas])
    assert (np.diff(grid, axis=1) >= 0).all() and (np.diff(grid, axis=0) >= 0).all()
    assert (grid >= kappas[:, None] - 1e-15).all() and (grid <= 1.0).all()
    # strictly, away from the saturated corner
    inner = grid[1:-1, :8]
    assert (np.diff(inner, axis=1) > 0).all() and (np.diff(inner, axis=0) > 0).all()


@pytest.mark.parametrize("kappa", [0.01, 0.1, 0.5, 0.9])
@pytest.mark.parametrize("z,steps", [(2.0, 1), (1.0, 1), (0.5, 1), (2.0, 4), (4.0, 16)])
def test_monte_carlo_at_q1_agrees_with_the_closed_form(kappa, z, steps):
    gamma, se = _monte_carlo(kappa, z, 1.0, steps, 50_000, seed=1)
    closed = reconstruction_bound(kappa, mu=math.sqrt(steps) / z)
    assert 0 < se < 0.01
    # 5 standard errors: a wrong estimator (say the upper tail mean or a flipped ratio) is off
    # by far more than that at every one of these points.
    assert abs(gamma - closed) <= 5 * se, (gamma, closed, se)


def test_monte_carlo_standard_error_is_honest():
    # The spread over seeds matches the reported standard error (within a factor of 2).
    draws = [_monte_carlo(0.1, 1.0, 0.3, 5, 4_000, seed=s) for s in range(20)]
    spread = np.std([g for g, _ in draws], ddof=1)
    reported = np.mean([se for _, se in draws])
    assert 0.5 < spread / reported < 2.0


def test_subsampling_lowers_the_bound_and_many_steps_stay_finite():
    full = reconstruction_bound(0.1, noise_multiplier=1.0, steps=10)
    sub = reconstruction_bound(0.1, noise_multiplier=1.0, sampling_rate=0.1, steps=10,
                               samples=20_000)
    assert 0.1 <= sub < full - 0.1
    lower = [reconstruction_bound(0.1, noise_multiplier=1.0, sampling_rate=q, steps=10,
                                  samples=20_000) for q in (0.05, 0.2, 0.6)]
    assert lower[0] < lower[1] < lower[2] < full
    many = reconstruction_bound(0.1, noise_multiplier=1.0, sampling_rate=0.01, steps=500,
                                samples=2_000)
    assert 0.1 <= many <= 1.0 and math.isfinite(many)
    # same seed, same number
    again = reconstruction_bound(0.1, noise_multiplier=1.0, sampling_rate=0.1, steps=10,
                                 samples=20_000)
    assert again == sub


@pytest.mark.parametrize("kwargs,needle", [
    ({"kappa": 1.5, "mu": 1.0}, "kappa"),
    ({"kappa": -0.1, "mu": 1.0}, "kappa"),
    ({"kappa": float("nan"), "mu": 1.0}, "kappa"),
    ({"kappa": 0.1, "mu": -1.0}, "mu must"),
    ({"kappa": 0.1}, "exactly one"),
    ({"kappa": 0.1, "mu": 1.0, "noise_multiplier": 1.0}, "exactly one"),
    ({"kappa": 0.1, "mu": 1.0, "steps": 4}, "noise_multiplier only"),
    ({"kappa": 0.1, "noise_multiplier": -1.0}, "noise_multiplier must"),
    ({"kappa": 0.1, "noise_multiplier": 1.0, "sampling_rate": 0.0}, "sampling_rate"),
    ({"kappa": 0.1, "noise_multiplier": 1.0, "sampling_rate": 1.5}, "sampling_rate"),
    ({"kappa": 0.1, "noise_multiplier": 1.0, "steps": 0}, "steps"),
    ({"kappa": 0.1, "noise_multiplier": 1.0, "steps": 2.5}, "steps"),
    ({"kappa": 0.1, "noise_multiplier": 1.0, "samples": 0}, "samples"),
])
def test_bad_inputs_give_one_line_errors(kwargs, needle):
    kappa = kwargs.pop("kappa")
    with pytest.raises(ValueError, match=needle) as e:
        reconstruction_bound(kappa, **kwargs)
    assert "\n" not in str(e.value)


def test_mu_helpers():
    assert mu_gaussian(1.0, 0.25) == 4.0
    assert mu_gaussian(0.0, 0.0) == 0.0 and mu_gaussian(1.0, 0.0) == math.inf
    with pytest.raises(ValueError, match="std"):
        mu_gaussian(1.0, -1.0)
    # NOTES: mu ~ eps / (lr sqrt(2 ln(1.25/delta))) under replace-one; add/remove is half that.
    eps, delta, lr = 10.0, 1e-5, 1e-3
    std = 2 * lr * 1.0 * math.sqrt(2 * math.log(1.25 / delta)) / eps
    mu = mu_paper_calibration(noise_std=std, clip=1.0)
    assert mu == pytest.approx(eps / (2 * lr * math.sqrt(2 * math.log(1.25 / delta))), rel=1e-12)
    assert mu_paper_calibration(noise_std=std, clip=1.0, batch_size=4, steps=9, layers=4) == \
        pytest.approx(mu * 3 * 2 / 4, rel=1e-12)
    with pytest.raises(ValueError, match="layers"):
        mu_paper_calibration(noise_std=std, clip=1.0, layers=0)


# ----------------------------------------------------------------------------
# bound_for_meta on real captures' meta
# ----------------------------------------------------------------------------


def _chain(defense: str, protocol, samples: int):
    """The chain ``jaxleak capture --defense`` builds: DP-SGD accounted over every local step."""
    from jaxleak.defenses import parse_chain

    batch = protocol.batch(samples)
    return parse_chain(defense, batch_size=batch, steps=protocol.total_steps(samples),
                       sampling_rate=batch / samples)


@functools.cache
def _victim():
    import jax

    from jaxleak.models import get_victim

    victim = get_victim("mlp", image_shape=(4, 4, 1), num_classes=3, hidden=(4,))
    return victim, victim.init(jax.random.PRNGKey(0))


def _capture_meta(defense: str, *, protocol=None, samples: int = 1) -> dict:
    """A real (tiny) capture's meta (one compilation each: about a second on an idle CPU)."""
    from jaxleak.capture import capture_updates
    from jaxleak.protocols import FEDSGD

    protocol = protocol or FEDSGD
    victim, variables = _victim()
    images = np.random.default_rng(0).uniform(size=(samples, 4, 4, 1)).astype(np.float32)
    labels = np.arange(samples) % 3
    cap = capture_updates(victim, variables, images, labels,
                          defenses=_chain(defense, protocol, samples), protocol=protocol,
                          samples=samples)
    return cap.meta


def _chain_meta(defense: str, *, protocol=None, samples: int = 1) -> dict:
    """The fields of a capture's meta that bound_for_meta reads, without simulating one."""
    from jaxleak.protocols import FEDSGD

    protocol = protocol or FEDSGD
    return {"defenses": _chain(defense, protocol, samples).meta, "update_scope": "head",
            "protocol": {"local_steps": protocol.total_steps(samples),
                         "local_batch": protocol.batch(samples)}}


@pytest.fixture(scope="module")
def real_metas():
    specs = ["dp-paper:eps=1,delta=1e-5", "dpsgd:z=2", "clip-norm:1.0,gaussian:1.0", "gaussian:0.01"]
    return {spec: _capture_meta(spec) for spec in specs}


def test_bound_for_meta_on_real_captures(real_metas):
    kappa = 0.1
    for spec, meta in real_metas.items():  # the stand-in metas below hold the same fields
        made = _chain_meta(spec)
        assert meta["defenses"] == made["defenses"] and meta["update_scope"] == "head"
        assert meta["protocol"]["local_steps"] == made["protocol"]["local_steps"]

    paper = real_metas["dp-paper:eps=1,delta=1e-5"]
    out = bound_for_meta(paper, kappa)
    mu = mu_paper_calibration(noise_std=paper["dp"]["noise_std"], clip=1.0)
    assert out["method"] == "closed form" and out["mu"] == pytest.approx(mu)
    assert out["mu"] == pytest.approx(1 / (2e-3 * math.sqrt(2 * math.log(1.25e5))), rel=1e-9)
    assert out["bound"] == pytest.approx(1.0) and "paper" in out["reason"]
    assert bound_for_meta(paper["dp"], kappa) == out  # the DP block alone (Chain.dp) reads the same

    out = bound_for_meta(real_metas["dpsgd:z=2"], kappa)
    assert out["method"] == "closed form" and out["mu"] == pytest.approx(0.5)
    assert out["bound"] == pytest.approx(norm.cdf(norm.ppf(kappa) + 0.5))

    out = bound_for_meta(real_metas["clip-norm:1.0,gaussian:1.0"], kappa)
    assert out["method"] == "closed form" and out["mu"] == 1.0
    assert round(out["bound"], 3) == 0.389 and "add/remove" in out["reason"]

    out = bound_for_meta(real_metas["gaussian:0.01"], kappa)
    assert out["bound"] is None and out["mu"] is None and out["method"] is None
    assert "unclipped" in out["reason"]


def test_bound_for_meta_chains():
    kappa = 0.1
    # later defenses are post-processing; a norm-increasing one between clip and noise is not
    assert bound_for_meta(_chain_meta("clip-norm:1,prune-smallest:0.5,gaussian:2,quantize:1"),
                          kappa)["mu"] == 0.5
    assert bound_for_meta(_chain_meta("clip-norm:1,clip-norm:0.5,gaussian:2"), kappa)["mu"] == 0.25
    assert bound_for_meta(_chain_meta("clip-norm:1,quantize:1,gaussian:2"), kappa)["bound"] is None
    for spec, needle in [("laplace:0.1", "unclipped"), ("prune-smallest:0.5", "adds no noise"),
                         ("clip-norm:1", "adds no noise"), ("clip-norm:1,laplace:1", "L1"),
                         ("dp-paper:eps=1,mechanism=laplace", "Laplace")]:
        out = bound_for_meta(_chain_meta(spec), kappa)
        assert out["bound"] is None and needle in out["reason"], out
    assert "no defense" in bound_for_meta({"defenses": []}, kappa)["reason"]
    # two guarantees on one release: the smaller bound holds
    both = bound_for_meta(_chain_meta("dpsgd:z=2,clip-norm:1,gaussian:0.1"), kappa)
    assert both["mu"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="meta_dp"):
        bound_for_meta({"epsilon": 1.0}, 0.1)


def _fedavg():
    from jaxleak.protocols import Protocol

    return Protocol(kind="fedavg", local_epochs=1, local_batch=2, optimizer="sgd", lr=0.1)


def _check_fedavg_dpsgd(meta):
    assert meta["defenses"][0]["sampling_rate"] == 0.5 and meta["defenses"][0]["steps"] == 2
    out = bound_for_meta(meta, 0.1, samples=20_000)
    assert out["method"] == "monte carlo" and out["mu"] is None
    full = reconstruction_bound(0.1, noise_multiplier=1.0, steps=2)
    assert 0.1 < out["bound"] < full
    assert out["bound"] == reconstruction_bound(0.1, noise_multiplier=1.0, sampling_rate=0.5,
                                                steps=2, samples=20_000)


def test_bound_for_meta_fedavg_dpsgd_is_monte_carlo_and_paper_needs_layers():
    _check_fedavg_dpsgd(_chain_meta("dpsgd:z=1", protocol=_fedavg(), samples=4))
    # paper over two local steps: every layer's noisy gradient feeds the head's update
    paper = _chain_meta("dp-paper:eps=1", protocol=_fedavg(), samples=4)
    out = bound_for_meta(paper, 0.1)
    assert out["bound"] is None and "layers=" in out["reason"]
    out = bound_for_meta(paper, 0.1, layers=4)
    std = paper["defenses"][0]["noise_std"]
    mu = mu_paper_calibration(noise_std=std, clip=1.0, batch_size=2, steps=2, layers=4)
    assert out["mu"] == pytest.approx(mu) and out["method"] == "closed form"
    # scope=layer with the other layers feeding later steps: no guarantee at all
    from jaxleak.defenses import parse_chain

    layer = parse_chain("dp-paper:eps=1,scope=layer", batch_size=2).meta
    out = bound_for_meta({**paper, "defenses": layer}, 0.1, layers=4)
    assert out["bound"] is None and "scope=layer" in out["reason"]
    assert bound_for_meta({"defenses": layer, "update_scope": "head"}, 0.1)["bound"] == \
        pytest.approx(1.0)


@pytest.mark.slow
def test_bound_for_meta_on_a_real_fedavg_capture():
    _check_fedavg_dpsgd(_capture_meta("dpsgd:z=1", protocol=_fedavg(), samples=4))


# ----------------------------------------------------------------------------
# baseline_kappa
# ----------------------------------------------------------------------------


def test_baseline_kappa_on_a_pool_with_a_known_answer():
    rng = np.random.default_rng(0)
    truth = rng.uniform(size=(10, 12, 12, 3)).astype(np.float32)
    truth[3:7] = truth[2]  # five targets are the same image
    pool = np.concatenate([rng.uniform(size=(6, 12, 12, 3)).astype(np.float32), truth[2:3]])
    kappa, (lo, hi) = baseline_kappa(truth, pool, criterion="ssim", chunk=16)
    assert kappa == 0.5
    # exact Clopper-Pearson interval of 5 / 10 at 95%
    from scipy.stats import beta
    assert lo == pytest.approx(beta.ppf(0.025, 5, 6)) and hi == pytest.approx(beta.ppf(0.975, 6, 5))
    # uint8 input and PSNR agree; the chunk size changes nothing
    as_uint8 = (truth * 255).round().astype(np.uint8)
    pool_uint8 = (pool * 255).round().astype(np.uint8)
    assert baseline_kappa(as_uint8, pool_uint8, criterion="psnr", threshold=40.0)[0] == 0.5
    assert baseline_kappa(truth, pool, criterion="psnr", threshold=40.0, chunk=1)[0] == 0.5
    # nothing in a pool of noise reconstructs a target
    kappa, (lo, hi) = baseline_kappa(truth, pool[:6])
    assert kappa == 0.0 and lo == 0.0 and hi == pytest.approx(1 - 0.025 ** (1 / 10))


@pytest.mark.parametrize("kwargs,needle", [
    ({"criterion": "lpips"}, "criterion"),
    ({"criterion": "psnr"}, "threshold"),
    ({"confidence": 1.0}, "confidence"),
])
def test_baseline_kappa_rejects_bad_options(kwargs, needle):
    x = np.zeros((2, 12, 12, 1), np.float32)
    with pytest.raises(ValueError, match=needle):
        baseline_kappa(x, x, **kwargs)
    with pytest.raises(ValueError, match="shape"):
        baseline_kappa(x, np.zeros((2, 12, 12, 3), np.float32))
    with pytest.raises(ValueError, match="SSIM"):
        baseline_kappa(np.zeros((2, 8, 8, 1), np.float32), np.zeros((2, 8, 8, 1), np.float32))
