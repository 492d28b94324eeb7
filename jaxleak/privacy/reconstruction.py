"""What DP promises about reconstruction: the ReRo bound beside the attacks (NOTES section 6).

Reconstruction robustness (Balle, Cherubin & Hayes 2022; Hayes, Mahloujifar & Balle 2023): a
release is ``(eta, gamma)``-ReRo when no attack gets within error ``eta`` of the target with
probability above ``gamma``. The baseline ``kappa`` is the best success of a guess made without
the release; :func:`baseline_kappa` estimates it as the best fixed guess from a pool of public
images under the attack-success criterion itself (SSIM or PSNR above a threshold).

**Adjacency.** Every bound here compares the release with the target present to the release
with the target removed (add/remove adjacency: a clip ``C`` gives ``Delta = C``). Hayes et al.
2023 state the ReRo bound against exactly that pair: without the target the release does not
depend on it, so there the attack succeeds with probability at most ``kappa``; the
Neyman-Pearson blow-up of ``kappa`` between the two releases then bounds ``gamma``. The same
convention gives DP-SGD's ``mu = sqrt(T) / z`` and the Monte Carlo estimator below.
Replace-one adjacency (``Delta = 2 C``) would double every ``mu``; NOTES' approximation of the
``paper`` calibration's ``mu`` (``eps / (lr sqrt(2 ln(1.25/delta)))``) is that doubled value.

* ``mu``-GDP (one Gaussian release, or ``T`` full-batch steps composed):
  ``gamma <= Phi(Phi^-1(kappa) + mu)``.
* Poisson-subsampled DP-SGD (rate ``q``, noise ``z``, ``T`` steps): Hayes et al. 2023's Monte
  Carlo estimate of the same blow-up between ``mu0 = N(0, z^2)^T`` (target absent, one
  coordinate along the target's clipped gradient, in units of ``C``) and
  ``mu1 = ((1 - q) N(0, z^2) + q N(1, z^2))^T``. With ``L = dmu1/dmu0`` the best test rejects
  where ``L`` is large, and since ``E_mu0[L] = 1``,
  ``gamma = E_mu0[L 1{L >= t}] = 1 - E_mu0[L 1{L < t}]`` with ``t`` the ``(1 - kappa)``-quantile
  of ``L`` under ``mu0``: one minus ``(1 - kappa)`` times the mean of the lowest ``(1 - kappa)``
  fraction of the sampled ratios. At ``q = 1`` it is the closed form with ``mu = sqrt(T)/z``.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "baseline_kappa",
    "bound_for_meta",
    "mu_gaussian",
    "mu_paper_calibration",
    "reconstruction_bound",
]

CRITERIA = ("ssim", "psnr")
_DP_NAMES = ("dp-paper", "dpsgd")
# Update-stage defenses that never lengthen a vector: between a norm clip and the Gaussian
# noise they keep the release's sensitivity at the clip.
_NORM_NON_INCREASING = ("clip-norm", "clip-value", "prune-smallest", "keep-largest")
# Entries of the ratio matrix [samples, steps] drawn at once.
_MC_BLOCK = 2**22


def _is_number(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _check_kappa(kappa: float) -> float:
    if not (_is_number(kappa) and 0.0 <= kappa <= 1.0):
        raise ValueError(f"kappa must be a number in [0, 1], got {kappa!r}")
    return float(kappa)


def _gdp_bound(kappa: float, mu: float) -> float:
    """``Phi(Phi^-1(kappa) + mu)`` with its limits at ``kappa`` in ``{0, 1}`` and ``mu`` in ``{0, inf}``."""
    from scipy.special import ndtr, ndtri

    if math.isinf(mu):
        # Disjoint releases: a test that never fires without the target always fires with it.
        return 1.0
    if mu == 0 or kappa in (0.0, 1.0):
        return kappa
    return float(ndtr(ndtri(kappa) + mu))


def _monte_carlo(
    kappa: float, noise_multiplier: float, sampling_rate: float, steps: int, samples: int, seed: int
) -> tuple[float, float]:
    """Hayes et al. 2023's estimate of the subsampled blow-up and its standard error.

    The error is the influence-function one of the lower partial mean at an estimated quantile,
    ``sd((L - t) 1{L < t}) / sqrt(samples)`` (inf where ``t`` overflows a float64).
    """
    from scipy.special import logsumexp

    z, q = noise_multiplier, sampling_rate
    rng = np.random.default_rng(seed)
    log_ratio = np.zeros(samples)
    # x = z e with e ~ N(0, 1): (x^2 - (x - 1)^2) / (2 z^2) = e / z - 1 / (2 z^2).
    block = max(1, _MC_BLOCK // samples)
    for start in range(0, steps, block):
        e = rng.standard_normal((samples, min(block, steps - start)))
        shift = e / z - 0.5 / z**2
        if q == 1.0:
            log_ratio += shift.sum(axis=1)
        else:
            log_ratio += np.logaddexp(math.log1p(-q), math.log(q) + shift).sum(axis=1)
    log_ratio.sort()
    lowest = (1.0 - kappa) * samples  # how many of the sorted ratios lie below the quantile
    whole = min(int(lowest), samples - 1)
    weights = np.zeros(samples)
    weights[:whole] = 1.0
    weights[whole] = lowest - whole
    log_below = logsumexp(log_ratio, b=weights) - math.log(samples)
    gamma = 1.0 - math.exp(log_below)
    log_t = log_ratio[whole]
    scaled = np.where(log_ratio < log_t, np.expm1(np.minimum(log_ratio - log_t, 0.0)), 0.0)
    spread = float(np.std(scaled)) / math.sqrt(samples)
    se = spread * math.exp(log_t) if log_t < 709.0 else math.inf
    return gamma, se


def reconstruction_bound(
    kappa: float,
    *,
    mu: float | None = None,
    noise_multiplier: float | None = None,
    sampling_rate: float = 1.0,
    steps: int = 1,
    samples: int = 100_000,
    seed: int = 0,
) -> float:
    """The ReRo bound on an attack's success probability given its baseline ``kappa``.

    Closed form ``Phi(Phi^-1(kappa) + mu)`` for a ``mu``-GDP release: when ``mu`` is given, or
    when ``sampling_rate == 1`` (``T`` full-batch DP-SGD steps compose to
    ``mu = sqrt(T) / noise_multiplier``). For Poisson-subsampled DP-SGD (``sampling_rate < 1``)
    the Monte Carlo estimator of Hayes et al. 2023 with ``samples`` draws from ``seed`` (module
    docstring: derivation; its standard error is about ``1e-3`` at the default ``samples``).
    Add/remove adjacency throughout (``Delta = C``). The result never falls below ``kappa``.

    Args:
      kappa: the baseline success of a guess made without the release, in ``[0, 1]``.
      mu: the GDP parameter of the whole release (``>= 0``; ``inf``: no noise).
      noise_multiplier: DP-SGD's ``z >= 0`` (noise std over clip; ``0``: no noise).
      sampling_rate: DP-SGD's Poisson rate ``q`` in ``(0, 1]`` (only with ``noise_multiplier``).
      steps: DP-SGD steps ``T >= 1`` (only with ``noise_multiplier``).
      samples: Monte Carlo draws (``>= 1``).
      seed: Monte Carlo seed.

    Returns:
      The bound ``gamma`` in ``[kappa, 1]``.

    Raises:
      ValueError: on ``kappa`` outside ``[0, 1]``, a negative ``mu`` or ``z``, both or neither of
        ``mu`` / ``noise_multiplier``, ``sampling_rate`` / ``steps`` given with ``mu``,
        ``sampling_rate`` outside ``(0, 1]``, ``steps < 1`` or ``samples < 1``.

    >>> round(reconstruction_bound(0.1, mu=1.0), 3)
    0.389
    >>> round(reconstruction_bound(0.1, noise_multiplier=2.0, steps=4), 3)  # mu = sqrt(4) / 2
    0.389
    >>> reconstruction_bound(0.1, noise_multiplier=2.0, sampling_rate=0.1, steps=4) < 0.2
    True
    """
    kappa = _check_kappa(kappa)
    if (mu is None) == (noise_multiplier is None):
        raise ValueError(f"give exactly one of mu and noise_multiplier, got mu={mu!r}, "
                         f"noise_multiplier={noise_multiplier!r}")
    if not (isinstance(samples, numbers.Integral) and samples >= 1):
        raise ValueError(f"samples must be an integer >= 1, got {samples!r}")
    if mu is not None:
        if not (_is_number(mu) and mu >= 0):
            raise ValueError(f"mu must be a number >= 0, got {mu!r}")
        if sampling_rate != 1.0 or steps != 1:
            raise ValueError("mu is the whole release's GDP parameter; sampling_rate and steps "
                             "go with noise_multiplier only")
        return _gdp_bound(kappa, float(mu))
    z = noise_multiplier
    if not (_is_number(z) and 0 <= z < math.inf):
        raise ValueError(f"noise_multiplier must be a finite number >= 0, got {z!r}")
    if not (_is_number(sampling_rate) and 0 < sampling_rate <= 1):
        raise ValueError(f"sampling_rate must be in (0, 1], got {sampling_rate!r}")
    if not (isinstance(steps, numbers.Integral) and not isinstance(steps, bool) and steps >= 1):
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if z == 0:
        # Without noise a step that sampled the target reveals it; the others reveal nothing.
        return 1.0 - (1.0 - sampling_rate) ** steps * (1.0 - kappa)
    if sampling_rate == 1.0:
        return _gdp_bound(kappa, math.sqrt(steps) / z)
    if kappa in (0.0, 1.0):
        # mu1 << mu0 (both have full support): a test of size 0 has power 0.
        return kappa
    gamma, _ = _monte_carlo(kappa, float(z), float(sampling_rate), int(steps), int(samples), seed)
    return min(1.0, max(kappa, gamma))


def mu_gaussian(sensitivity: float, std: float) -> float:
    """The GDP parameter ``mu = Delta / sigma`` of one Gaussian release.

    Args:
      sensitivity: the L2 sensitivity ``Delta >= 0`` of the released vector.
      std: the per-coordinate noise std ``sigma >= 0``.

    Returns:
      ``Delta / sigma`` (``inf`` for ``sigma = 0 < Delta``; ``0`` for ``Delta = 0``).

    Raises:
      ValueError: on a negative or non-finite argument.

    >>> mu_gaussian(1.0, 0.5)
    2.0
    """
    for name, value in (("sensitivity", sensitivity), ("std", std)):
        if not (_is_number(value) and 0 <= value < math.inf):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if sensitivity == 0:
        return 0.0
    return math.inf if std == 0 else float(sensitivity) / float(std)


def mu_paper_calibration(
    *, noise_std: float, clip: float, batch_size: int = 1, steps: int = 1, layers: int = 1
) -> float:
    """The effective ``mu`` of the ``paper`` calibration from the noise drawn and the clip.

    The paper clips each layer's per-example gradient to ``C`` and adds noise of std ``sigma``
    to the batch mean, but sets ``sigma`` from ``s = 2 lr C / m``: the ``lr`` factor makes the
    noise ~``1/lr`` times too small for the clip (NOTES section 6). What the noise buys is
    what counts: removing one example moves each of ``layers`` released layers by at most
    ``C / m`` (add/remove), and ``steps`` noisy local steps compose by GDP:
    ``mu = sqrt(steps * layers) * C / (m sigma)``, about ``eps / (2 lr sqrt(2 ln(1.25/delta)))``.

    Args:
      noise_std: the Gaussian std ``sigma`` added to every coordinate (``meta["noise_std"]``).
      clip: the per-layer clip ``C``.
      batch_size: ``m``, the examples averaged per step.
      steps: noisy local steps the release depends on (FedSGD: 1).
      layers: separately clipped layers the release depends on (1 for the head alone).

    Returns:
      ``mu`` (``inf`` for ``noise_std = 0``).

    Raises:
      ValueError: on a negative or non-finite ``noise_std`` / ``clip`` or a count below 1.

    >>> round(mu_paper_calibration(noise_std=0.000969, clip=1.0))  # eps = 10, delta = 1e-5
    1032
    """
    for name, value in (("batch_size", batch_size), ("steps", steps), ("layers", layers)):
        if not (isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1):
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if not (_is_number(clip) and 0 < clip < math.inf):
        raise ValueError(f"clip must be a positive finite number, got {clip!r}")
    return math.sqrt(steps * layers) * mu_gaussian(clip / batch_size, noise_std)


# ----------------------------------------------------------------------------
# A capture's meta -> its bound.
# ----------------------------------------------------------------------------


def _result(bound: float | None, mu: float | None, method: str | None, reason: str) -> dict[str, Any]:
    return {"bound": bound, "mu": mu, "method": method, "reason": reason}


def _paper(d: Mapping[str, Any], kappa: float, protocol: Mapping[str, Any] | None,
           update_scope: str | None, layers: int | None) -> dict[str, Any]:
    if d.get("mechanism", "gaussian") != "gaussian":
        return _result(None, None, None, "dp-paper with Laplace noise: an L1 (pure DP) guarantee "
                       "against an L2 clip, growing with sqrt(dimension); no bound computed")
    steps = int((protocol or {}).get("local_steps") or 1)
    batch = d.get("batch_size") or (protocol or {}).get("local_batch")
    if batch is None:
        return _result(None, None, None, "dp-paper meta records no batch_size")
    # One FedSGD step stored for the head alone depends on the head's release only; the whole
    # update, or any later local step, depends on every layer's.
    whole = update_scope != "head" or steps > 1
    if d.get("scope", "all") == "layer":
        if whole:
            return _result(None, None, None, "dp-paper scope=layer protects one layer and the "
                           "release depends on the others, released unclipped: no DP guarantee")
        layers = 1
    elif not whole:
        layers = 1
    elif layers is None:
        return _result(None, None, None, "dp-paper clips each layer to C separately and the "
                       "release depends on every layer: pass layers=L (sensitivity sqrt(L) C / m)")
    mu = mu_paper_calibration(noise_std=float(d["noise_std"]), clip=float(d["clip"]),
                              batch_size=int(batch), steps=steps, layers=int(layers))
    eps = d.get("epsilon")
    return _result(_gdp_bound(kappa, mu), mu, "closed form",
                   f"paper calibration (nominal eps={eps}): Gaussian std {d['noise_std']:.3g} on "
                   f"the mean of {batch} per-layer-clipped (C={d['clip']:g}) gradients, "
                   f"{layers} layer(s), {steps} step(s); add/remove adjacency, "
                   f"mu = sqrt(steps*layers) C/(m sigma) = {mu:.4g} (the lr factor in its "
                   f"sensitivity makes the noise ~1/lr too small for the clip)")


def _dpsgd(d: Mapping[str, Any], kappa: float, samples: int, seed: int) -> dict[str, Any]:
    z = d.get("noise_multiplier")
    if z is None:
        return _result(None, None, None, "dpsgd meta records no noise_multiplier")
    q = float(d.get("sampling_rate") or 1.0)
    steps = int(d.get("steps") or 1)
    head = (f"DP-SGD: per-example clip C={d.get('clip')} of the whole gradient, "
            f"N(0, (zC)^2) on the sum, z={z:g}, {steps} step(s); add/remove adjacency (Delta = C)")
    if q == 1.0:
        mu = math.inf if z == 0 else math.sqrt(steps) / z
        bound = reconstruction_bound(kappa, noise_multiplier=float(z), steps=steps)
        return _result(bound, mu, "closed form",
                       f"{head}, full batch: mu = sqrt(T)/z = {mu:.4g} by GDP composition")
    bound = reconstruction_bound(kappa, noise_multiplier=float(z), sampling_rate=q,
                                 steps=steps, samples=samples, seed=seed)
    return _result(bound, None, "monte carlo",
                   f"{head}, Poisson rate q={q:g} as the accountant assumes (the simulation "
                   f"trains on shuffled fixed batches); Hayes et al. 2023 estimator, "
                   f"{samples} samples, seed {seed}")


def _clipped_gaussian(updates: Sequence[Mapping[str, Any]], kappa: float) -> dict[str, Any] | None:
    """The first Gaussian noise after a norm clip with only norm-non-increasing steps between."""
    clip = None
    for d in updates:
        name = d.get("name")
        if name == "clip-norm":
            clip = float(d["c"]) if clip is None else min(clip, float(d["c"]))
        elif name == "gaussian" and clip is not None:
            std = float(d["std"])
            mu = mu_gaussian(clip, std)
            return _result(_gdp_bound(kappa, mu), mu, "closed form",
                           f"Gaussian noise std {std:g} after a norm clip C={clip:g} of the whole "
                           f"update (user level: the client's whole data); add/remove adjacency "
                           f"(Delta = C), mu = C/std = {mu:.4g}; later defenses are post-processing")
        elif name not in _NORM_NON_INCREASING:
            clip = None
    return None


def _why_not(defenses: Sequence[Mapping[str, Any]]) -> str:
    if not defenses:
        return "no defense: the update is released as is, so no DP guarantee"
    why = []
    clipped = False
    for d in defenses:
        name = d.get("name")
        if name == "clip-norm":
            clipped = True
            why.append("clip-norm bounds the update but adds no noise")
        elif name in ("gaussian", "laplace") and not clipped:
            why.append(f"{name} noise on an unclipped update (unbounded sensitivity)")
        elif name == "laplace":
            why.append("laplace after a norm clip: an L1 guarantee growing with sqrt(dimension), "
                       "not computed")
        elif name == "gaussian":
            why.append("gaussian after a clip with a norm-increasing step between")
        else:
            why.append(f"{name} is a deterministic transform that adds no noise")
    return "no DP guarantee: " + "; ".join(why)


def bound_for_meta(
    meta_dp: Mapping[str, Any],
    kappa: float,
    *,
    layers: int | None = None,
    samples: int = 100_000,
    seed: int = 0,
) -> dict[str, Any]:
    """The ReRo bound a capture's defenses promise, or "no bound" and why.

    Reads a capture's ``meta`` (its ``defenses`` list, ``protocol.local_steps`` and
    ``update_scope``), or one defense's meta alone (``Chain.dp``; then one FedSGD step on the
    head is assumed). What it recognises, all under add/remove adjacency (``Delta = C``):

    * ``dp-paper`` (Gaussian): ``mu`` from the noise actually drawn
      (:func:`mu_paper_calibration`), composed over the local steps;
    * ``dpsgd``: ``mu = sqrt(T)/z`` at ``q = 1``, the Monte Carlo estimator otherwise;
    * ``clip-norm:C`` then ``gaussian:STD`` (with only ``clip-value`` / ``prune-smallest`` /
      ``keep-largest`` / ``clip-norm`` between): ``mu = C / STD``, a client-level guarantee.

    Defenses after the noise are post-processing. Where several guarantees hold, the smallest
    bound is returned. Everything else (noise without a clip, Laplace, pruning, quantization,
    no defense) gets ``bound = None`` and the reason.

    Args:
      meta_dp: a capture's meta, or one DP defense's meta.
      kappa: the baseline success in ``[0, 1]`` (e.g. from :func:`baseline_kappa`).
      layers: separately clipped layers the release depends on; needed only for ``dp-paper``
        with ``scope=all`` when the whole update is stored or the protocol takes several steps.
      samples: Monte Carlo draws (subsampled DP-SGD).
      seed: Monte Carlo seed.

    Returns:
      ``{"bound": float | None, "mu": float | None (None for Monte Carlo), "method":
      "closed form" | "monte carlo" | None, "reason": str}``.

    Raises:
      ValueError: on a ``kappa`` outside ``[0, 1]`` or a meta with neither ``defenses`` nor
        ``name``.

    >>> from jaxleak.defenses import clip_norm, gaussian, chain
    >>> meta = {"defenses": chain(clip_norm(1.0), gaussian(1.0)).meta, "update_scope": "head"}
    >>> out = bound_for_meta(meta, 0.1)
    >>> round(out["bound"], 3), out["mu"], out["method"]
    (0.389, 1.0, 'closed form')
    >>> bound_for_meta({"defenses": chain(gaussian(1.0)).meta}, 0.1)["bound"] is None
    True
    """
    kappa = _check_kappa(kappa)
    if "defenses" in meta_dp:
        defenses = list(meta_dp["defenses"] or [])
        protocol = meta_dp.get("protocol")
        update_scope = meta_dp.get("update_scope", "head")
    elif "name" in meta_dp:
        defenses, protocol, update_scope = [meta_dp], None, "head"
    else:
        raise ValueError("meta_dp must be a capture's meta (with 'defenses') or a defense's meta "
                         "(with 'name')")
    results = []
    reasons = []
    dp = [d for d in defenses if d.get("name") in _DP_NAMES]
    for d in dp:
        if d["name"] == "dp-paper":
            r = _paper(d, kappa, protocol, update_scope, layers)
        else:
            r = _dpsgd(d, kappa, samples, seed)
        if r["bound"] is None:
            reasons.append(r["reason"])
        else:
            results.append(r)
    updates = [d for d in defenses if d.get("name") not in _DP_NAMES]
    clipped = _clipped_gaussian(updates, kappa)
    if clipped is not None:
        results.append(clipped)
    if results:
        return min(results, key=lambda r: r["bound"])
    if updates or not reasons:
        reasons.append(_why_not(updates))
    return _result(None, None, None, "; ".join(reasons))


# ----------------------------------------------------------------------------
# The baseline kappa: the best fixed guess from a public pool.
# ----------------------------------------------------------------------------


@functools.cache
def _counter(criterion: str):
    """A jitted ``(guesses [p,H,W,C], truth [N,H,W,C], threshold) -> successes [p]``."""
    import jax
    import jax.numpy as jnp

    from jaxleak import metrics

    score = metrics.ssim if criterion == "ssim" else metrics.psnr

    @jax.jit
    def count(guesses, truth, threshold):
        p, n = guesses.shape[0], truth.shape[0]
        # Every (guess, target) pair as one flat batch for the metric's own vmap.
        x = jnp.repeat(guesses, n, axis=0)
        y = jnp.tile(truth, (p, 1, 1, 1))
        # Strict, as ASR is; NaN fails.
        return jnp.sum((score(x, y) > threshold).reshape(p, n), axis=1)

    return count


def _as_images(name: str, x: Any) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 4:
        raise ValueError(f"{name} must be images [N, H, W, C], got shape {x.shape}")
    if x.dtype == np.uint8:
        return x.astype(np.float32) / 255.0
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{name} must be uint8 or floats in [0, 1], got dtype {x.dtype}")
    return x.astype(np.float32)


def _clopper_pearson(successes: int, n: int, confidence: float) -> tuple[float, float]:
    from scipy.stats import beta

    alpha = 1.0 - confidence
    lo = 0.0 if successes == 0 else float(beta.ppf(alpha / 2, successes, n - successes + 1))
    hi = 1.0 if successes == n else float(beta.ppf(1 - alpha / 2, successes + 1, n - successes))
    return lo, hi


def baseline_kappa(
    truth: Any,
    pool: Any,
    *,
    criterion: str = "ssim",
    threshold: float | None = None,
    confidence: float = 0.95,
    chunk: int = 2048,
) -> tuple[float, tuple[float, float]]:
    """The baseline ``kappa``: the best fixed guess from a public pool, with its interval.

    Each image of ``pool`` is one guess made without the release; it "reconstructs" a target
    when the attack-success criterion holds (``ssim > threshold``, ASR's strict test, or
    ``psnr > threshold`` dB; :mod:`jaxleak.metrics`). ``kappa`` is the largest fraction of
    ``truth`` one guess reconstructs. The interval is the exact Clopper-Pearson one of that
    guess's binomial count. Choosing the best guess on the same targets biases ``kappa``
    upward, which raises the bound: the safe side for flagging attacks that beat it.

    All (guess, target) pairs are scored by one jitted, vmapped metric, ``chunk`` pairs per
    call (the pool padded to a whole number of chunks so one compilation serves all).

    Args:
      truth: the targets ``[N, H, W, C]``, uint8 or floats in ``[0, 1]``.
      pool: public images of the same domain ``[P, H, W, C]``, same shape and range.
      criterion: ``"ssim"`` or ``"psnr"``.
      threshold: success threshold (``ssim``: default 0.5, ASR@0.5; ``psnr``: required, dB).
      confidence: the interval's level in ``(0, 1)``.
      chunk: pairs scored per compiled call (memory, not the result).

    Returns:
      ``(kappa, (lo, hi))``.

    Raises:
      ValueError: on an unknown criterion, a missing PSNR threshold, mismatched or empty
        image batches (SSIM also needs sides >= 11), or ``confidence`` outside ``(0, 1)``.

    >>> import numpy as np
    >>> truth = np.stack([np.full((12, 12, 1), v, np.float32) for v in (0.1, 0.1, 0.9, 0.5)])
    >>> pool = truth[[0, 2]] + 0.01
    >>> kappa, (lo, hi) = baseline_kappa(truth, pool, criterion="psnr", threshold=30.0)
    >>> kappa, round(lo, 3), round(hi, 3)
    (0.5, 0.068, 0.932)
    """
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    if threshold is None:
        if criterion == "psnr":
            raise ValueError("criterion 'psnr' needs threshold= (dB)")
        threshold = 0.5
    if not _is_number(threshold):
        raise ValueError(f"threshold must be a number, got {threshold!r}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    if not (isinstance(chunk, numbers.Integral) and chunk >= 1):
        raise ValueError(f"chunk must be an integer >= 1, got {chunk!r}")
    truth = _as_images("truth", truth)
    pool = _as_images("pool", pool)
    if truth.shape[1:] != pool.shape[1:]:
        raise ValueError(f"truth and pool images differ in shape: {truth.shape[1:]} vs "
                         f"{pool.shape[1:]}")
    n, p = truth.shape[0], pool.shape[0]
    if n == 0 or p == 0:
        raise ValueError(f"truth and pool must be non-empty, got {n} and {p} images")
    if criterion == "ssim":
        from jaxleak.metrics import SSIM_WIN_SIZE

        if min(truth.shape[1:3]) < SSIM_WIN_SIZE:
            raise ValueError(f"SSIM needs image sides >= {SSIM_WIN_SIZE}, got {truth.shape[1:3]}")
    per_call = min(p, max(1, chunk // n))
    padded = -(-p // per_call) * per_call
    pool = np.concatenate([pool, np.repeat(pool[:1], padded - p, axis=0)])
    count = _counter(criterion)
    counts = np.concatenate([
        np.asarray(count(pool[i:i + per_call], truth, np.float32(threshold)))
        for i in range(0, padded, per_call)
    ])[:p]
    best = int(counts.max())
    return best / n, _clopper_pearson(best, n, confidence)
