"""Tests of kl_forward_reverse.py: each compares against an independent reference
(the f-GAN identities, closed-form KL between Gaussians, jax.example_libraries.stax
and optimizers, finite differences, the post's own formulas) and asserts numbers.

Run: pytest -q   (about a minute on 2 CPU cores)."""
import argparse
import functools
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import random
from jax.test_util import check_grads

import kl_forward_reverse as K

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kl_forward_reverse.py")


# ---------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------

# f and f' written here independently of the script: f(u) = u log u (forward KL), -log u (reverse KL)
F = {"forward": (lambda u: u * np.log(u), lambda u: 1 + np.log(u)),
     "reverse": (lambda u: -np.log(u), lambda u: -1 / u)}


@pytest.mark.parametrize("divergence", ["forward", "reverse"])
def test_fenchel_young_equality_at_f_prime_and_inequality_elsewhere(divergence):
    f, f_prime = F[divergence]
    conjugate = K.DIVERGENCES[divergence]["conjugate"]
    u = np.linspace(0.05, 8.0, 200)
    t_opt = f_prime(u)
    # f(u) + f*(t) = u t exactly at t = f'(u) ...
    np.testing.assert_allclose(f(u) + np.asarray(conjugate(jnp.asarray(t_opt))), u * t_opt, atol=2e-5, rtol=1e-5)
    # ... and > u t at any other t in the domain of f*
    for shift in (-0.5, 0.3):
        t = t_opt + shift if divergence == "forward" else t_opt * np.exp(shift)   # reverse: t stays negative
        gap = f(u) + np.asarray(conjugate(jnp.asarray(t))) - u * t
        assert np.all(gap > 1e-4), gap.min()


@pytest.mark.parametrize("divergence", ["forward", "reverse"])
def test_stable_conjugate_of_activation_equals_composition(divergence):
    d = K.DIVERGENCES[divergence]
    v = jnp.linspace(-20.0, 20.0, 101)
    np.testing.assert_allclose(d["conjugate_of_activation"](v), d["conjugate"](d["activation"](v)), rtol=1e-5)
    if divergence == "reverse":   # -1 - log(exp(-v)) overflows at v = -100; v - 1 does not
        assert float(d["conjugate_of_activation"](jnp.float32(-100.0))) == -101.0


def gaussian_kl(m0, S0, m1, S1):
    """KL(N0 || N1), closed form."""
    S1_inv = np.linalg.inv(S1)
    d = m1 - m0
    return 0.5 * (np.trace(S1_inv @ S0) + d @ S1_inv @ d - len(m0) + np.log(np.linalg.det(S1) / np.linalg.det(S0)))


P_MEAN, P_COV = np.array([0.0, 0.0]), np.array([[1.0, 0.3], [0.3, 2.0]])
Q_MEAN, Q_COV = np.array([0.5, -0.3]), np.array([[0.8, 0.0], [0.0, 1.0]])


def optimal_critic_output(divergence, x, q_mean=Q_MEAN):
    """V* with g_f(V*) = f'(p/q): forward 1 + log(p/q), reverse log(p/q) (since -exp(-V*) = -q/p)."""
    log_ratio = (jax.scipy.stats.multivariate_normal.logpdf(x, P_MEAN, P_COV)
                 - jax.scipy.stats.multivariate_normal.logpdf(x, q_mean, Q_COV))
    return 1 + log_ratio if divergence == "forward" else log_ratio


@pytest.mark.parametrize("divergence", ["forward", "reverse"])
def test_saddle_objective_at_optimal_critic_is_the_closed_form_kl(divergence):
    n = 400_000
    kp, kq = random.split(random.key(0))
    real = random.multivariate_normal(kp, P_MEAN, P_COV, (n,))
    fake = random.multivariate_normal(kq, Q_MEAN, Q_COV, (n,))
    value = float(K.f_gan_objective(optimal_critic_output(divergence, real), optimal_critic_output(divergence, fake),
                                    divergence))
    forward, reverse = gaussian_kl(P_MEAN, P_COV, Q_MEAN, Q_COV), gaussian_kl(Q_MEAN, Q_COV, P_MEAN, P_COV)
    expected = forward if divergence == "forward" else reverse
    assert abs(forward - reverse) > 0.05          # the two directions differ here, so a swap would show
    assert value == pytest.approx(expected, abs=0.02)
    # a worse critic gives a lower value: F is a lower bound
    worse = float(K.f_gan_objective(0.5 * optimal_critic_output(divergence, real),
                                    0.5 * optimal_critic_output(divergence, fake), divergence))
    assert worse < expected - 0.02


def post_loss_reference(output, y, reverse_kl):
    """The post's loss_function, copied from the post (numpy)."""
    eps = 1e-10
    if reverse_kl:
        return -np.mean(-y * np.exp(output) + (1 - y) * (output + eps + 1.), axis=0)[0]
    return -np.mean(y * output - (1. - y) * (np.exp(output - 1.)), axis=0)[0]


@pytest.mark.parametrize("divergence", ["forward", "reverse"])
def test_post_loss_equals_the_posts_formula(divergence):
    output = np.array([[0.1], [0.45], [0.8], [0.99]], dtype=np.float32)
    for y in (np.ones((4, 1), np.float32), np.zeros((4, 1), np.float32)):
        got = float(K.post_loss(jnp.asarray(output), jnp.asarray(y), divergence))
        assert got == pytest.approx(float(post_loss_reference(output, y, divergence == "reverse")), rel=1e-6)
    # hand-computed: forward, y = 1 -> -mean(output)
    assert float(K.post_loss(jnp.asarray(output), jnp.ones((4, 1)), "forward")) == pytest.approx(-0.585, rel=1e-6)


# ---------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------


def test_check_grads_layers_and_losses():
    with jax.enable_x64(True):
        key = random.key(1)
        x = random.uniform(key, (8, 2), dtype=jnp.float64)
        init, apply = K.serial(K.Dense(4), K.LeakyRelu, K.Dense(3), K.Sigmoid)
        _, params = init(key, (-1, 2))
        params = jax.tree.map(lambda a: a.astype(jnp.float64), params)
        check_grads(jax.jit(apply), (params, x), order=1, modes=("fwd", "rev"))
        _, critic = K.critic_init(random.key(2), (-1, 2))
        _, gen = K.generator_init(random.key(3), (-1, K.LATENT_DIM))
        critic, gen = (jax.tree.map(lambda a: a.astype(jnp.float64), t) for t in (critic, gen))
        noise = random.uniform(random.key(4), (8, K.LATENT_DIM), dtype=jnp.float64)
        for d in ("forward", "reverse"):
            check_grads(jax.jit(lambda c, r: K.discriminator_loss(c, r, x[::-1], d)), (critic, x), order=1,
                        modes=("rev",))
            check_grads(jax.jit(lambda g, c: K.generator_loss(g, c, noise, d)), (gen, critic), order=1, modes=("rev",))


GRAD_Q_MEAN = np.array([1.0, -0.6])        # further from P than Q_MEAN, so the two divergences' gradients differ


def gradient_at_the_optimal_critic(loss_of_critic_output, divergence, key):
    """d/dmu loss_of_critic_output(V*(x)) at mu0 = GRAD_Q_MEAN, for x = mu + chol z ~ Q_mu = N(mu, Q_COV), with the
    critic frozen at V* for mu0 (envelope theorem).  Returns it with the closed-form gradients at mu0 of
    KL(P||Q_mu) = Q^-1 (mu - mu_p) and of KL(Q_mu||P) = P^-1 (mu - mu_p)."""
    mu0 = jnp.asarray(GRAD_Q_MEAN)
    z = random.normal(key, (400_000, 2))
    chol = jnp.linalg.cholesky(jnp.asarray(Q_COV))
    grad = jax.grad(lambda mu: loss_of_critic_output(optimal_critic_output(divergence, mu + z @ chol.T, q_mean=mu0)))(mu0)
    forward, reverse = (np.linalg.inv(cov) @ (GRAD_Q_MEAN - P_MEAN) for cov in (Q_COV, P_COV))
    assert np.abs(forward - reverse).max() > 0.1
    return np.asarray(grad), forward, reverse


@pytest.mark.parametrize("divergence", ["forward", "reverse"])
def test_generator_gradient_at_optimal_critic_is_the_divergence_gradient(divergence):
    """d/dmu of the generator's saddle loss = -(d/dmu) E_Q[f*(T*)] = d/dmu D_f(P||Q_mu) at mu0."""
    grad, forward, reverse = gradient_at_the_optimal_critic(lambda v: K.generator_objective(v, divergence),
                                                            divergence, random.key(5))
    np.testing.assert_allclose(grad, forward if divergence == "forward" else reverse, atol=0.03)


# ---------------------------------------------------------------------------
# Layers and Adam against the old stax / optimizers (the reference lives here only)
# ---------------------------------------------------------------------------


def test_layers_equal_stax():
    from jax.example_libraries import stax
    key = random.key(7)
    ours = K.serial(K.Dense(32), K.LeakyRelu, K.Dense(32), K.LeakyRelu, K.Dense(1), K.Sigmoid)
    ref = stax.serial(stax.Dense(32), stax.LeakyRelu, stax.Dense(32), stax.LeakyRelu, stax.Dense(1), stax.Sigmoid)
    shape, params = ours[0](key, (-1, 2))
    ref_shape, ref_params = ref[0](key, (-1, 2))
    assert shape == ref_shape == (-1, 1)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    x = random.normal(random.key(8), (16, 2)) * 3
    np.testing.assert_allclose(ours[1](params, x), ref[1](ref_params, x), rtol=1e-6, atol=1e-7)
    # Glorot-normal scale: std of a big layer's weights is sqrt(2 / (fan_in + fan_out))
    _, (W, b) = K.Dense(400)[0](random.key(9), (-1, 600))
    assert float(jnp.std(W)) == pytest.approx(np.sqrt(2 / 1000), rel=0.02)
    assert float(jnp.std(b)) == pytest.approx(0.01, rel=0.15)


def test_adam_equals_optimizers_adam():
    from jax.example_libraries import optimizers
    params = [(jnp.array([[1.0, -2.0], [0.5, 3.0]]), jnp.array([0.1, -0.1])), (), {"c": jnp.array(2.0)}]
    for step_size in (1e-2, lambda i: 1e-2 / (1 + i)):
        ours = K.adam(step_size)
        ref = optimizers.adam(step_size)
        s, r = ours[0](params), ref[0](params)
        for i in range(6):
            g = jax.tree.map(lambda p: jnp.sin(p * (i + 1)) + 0.1 * i, params)
            s, r = ours[1](i, g, s), ref[1](i, g, r)
        for a, b in zip(jax.tree.leaves(ours[2](s)), jax.tree.leaves(ref[2](r))):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
        assert not np.allclose(jax.tree.leaves(ours[2](s))[0], params[0][0])    # it did move


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------


def test_data_blocks_range_and_density():
    raw = np.asarray(K.sample_mixture(random.key(0), num_blocks=500))
    assert raw.shape == (500 * 64, 2)
    blocks = raw.reshape(500, 64, 2)
    # 48 points from the 0.75 mode (mean (0.5, 2)) then 16 from the 0.25 mode (mean (9, 9)), in every block
    near_small = np.linalg.norm(blocks - np.array([9.0, 9.0]), axis=-1) < np.linalg.norm(blocks - np.array([0.5, 2.0]), axis=-1)
    assert near_small[:, :48].mean() < 0.01 and near_small[:, 48:].mean() > 0.99
    np.testing.assert_allclose(blocks[:, :48].mean(axis=(0, 1)), [0.5, 2.0], atol=0.05)
    np.testing.assert_allclose(blocks[:, 48:].var(axis=(0, 1)), [1.0, 3.0], rtol=0.05)

    data, lo, hi = K.scale_to_unit(jnp.asarray(raw))
    assert float(data.min()) == 0.0 and float(data.max()) == pytest.approx(1.0, abs=1e-6)
    assert float(lo) == raw.min() and float(hi) == raw.max()

    # the exact density integrates to 1 over the plane (grid well past [0, 1])
    h = 0.01
    g = np.arange(-0.6, 1.6, h) + h / 2
    xx, yy = np.meshgrid(g, g)
    grid = jnp.asarray(np.stack([xx.ravel(), yy.ravel()], -1))
    total = float(jnp.sum(jnp.exp(K.mixture_log_density(grid, lo, hi)))) * h * h
    assert total == pytest.approx(1.0, abs=2e-3)

    # and equals a plain numpy mixture density, with the scaling's Jacobian
    x = np.array([[0.3, 0.4], [0.7, 0.75], [0.5, 0.5]])
    r = float(lo) + x * (float(hi) - float(lo))

    def normal_pdf(r, m, c):
        d = r - m
        return np.exp(-0.5 * np.einsum("ni,ij,nj->n", d, np.linalg.inv(c), d)) / (2 * np.pi * np.sqrt(np.linalg.det(c)))
    p = 0.75 * normal_pdf(r, [0.5, 2], np.diag([4, 1.5])) + 0.25 * normal_pdf(r, [9, 9], np.diag([1, 3]))
    np.testing.assert_allclose(np.exp(K.mixture_log_density(jnp.asarray(x), lo, hi)),
                               p * (float(hi) - float(lo)) ** 2, rtol=1e-4)


def test_kde_log_density_equals_jax_gaussian_kde():
    samples = random.normal(random.key(3), (300, 2)) * jnp.array([0.1, 0.05]) + 0.4
    x = random.uniform(random.key(4), (20, 2))
    ours = K.kde_log_density(x, samples)
    ref = jax.scipy.stats.gaussian_kde(samples.T).logpdf(x.T)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-3)
    far = K.kde_log_density(jnp.array([[5.0, 5.0]]), samples)          # exp underflows; the log does not
    assert np.isfinite(float(far[0])) and float(far[0]) < -1000


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data():
    data, lo, hi, log_p, _ = K.make_data(random.key(0))
    return data, lo, hi, float(np.quantile(np.asarray(log_p), K.LOW_DENSITY_QUANTILE))


@pytest.mark.parametrize("objective", ["saddle", "post"])
def test_scan_loop_equals_python_loop(data, objective):
    """train (one lax.scan over the steps, each drawing its own batch) equals a Python loop of jitted steps."""
    step, real = K.make_train_step("reverse", objective), data[0]
    key = random.key(11)
    state = K.init_state(key)
    scanned, (bounds, _) = jax.jit(functools.partial(K.train, step, num_steps=10))(state, real, key, 3)
    jitted_step, jitted_sample = jax.jit(step), jax.jit(K.sample_batch)
    looped, loop_bounds = state, []
    for i in range(3, 13):
        looped, (bound, _) = jitted_step(looped, i, jitted_sample(real, i, key))
        loop_bounds.append(float(bound))
    np.testing.assert_allclose(bounds, loop_bounds, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(scanned), jax.tree.leaves(looped)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    moved = [not np.allclose(a, b) for a, b in zip(jax.tree.leaves(scanned[0][0]), jax.tree.leaves(state[0][0]))]
    assert all(moved)
    # a batch depends on its step index: another index, another batch
    assert not np.allclose(jitted_sample(real, 3, key)[1], jitted_sample(real, 4, key)[1])


# Threefry-2x32, 20 rounds: Random123's known answers (Salmon et al. 2011), (k1, k2, x1, x2) -> (y1, y2)
THREEFRY_KNOWN_ANSWERS = [((0, 0, 0, 0), (0x6B200159, 0x99BA4EFE)),
                          ((0xFFFFFFFF,) * 4, (0x1CB996FC, 0xBB002BE7)),
                          ((0x13198A2E, 0x03707344, 0x243F6A88, 0x85A308D3), (0xC4923A9C, 0x483DF7A0))]


def test_unrolled_threefry_is_threefry_and_draws_the_same_batches(data):
    """threefry2x32 gives Random123's known answers; with it as the CPU lowering (as the script runs), the batches
    are the same to the bit, and the compiled draw has no loop left.  Tests after this one run with it too."""
    for words, expected in THREEFRY_KNOWN_ANSWERS:
        assert tuple(int(y[0]) for y in K.threefry2x32(*np.array(words, np.uint32)[:, None])) == expected

    def draw(real, key):      # a new function each time, so that jit lowers it afresh
        return jax.vmap(K.sample_batch, in_axes=(None, 0, None))(real, jnp.arange(50), key)
    key = random.key(5)
    before = jax.jit(lambda real, key: draw(real, key)).lower(data[0], key)
    K.unroll_threefry_on_cpu()
    after = jax.jit(lambda real, key: draw(real, key)).lower(data[0], key)
    for a, b in zip(before.compile()(data[0], key), after.compile()(data[0], key)):
        np.testing.assert_array_equal(a, b)
    if jax.default_backend() == "cpu":
        assert "while" in before.as_text() and "while" not in after.as_text()


def settings(**kw):
    defaults = K.parse_args([])
    base = dict(objective=defaults.objective, steps=defaults.steps, batch_size=defaults.batch_size,
                lr_gen=defaults.lr_gen, lr_disc=defaults.lr_disc, seeds=4)
    return argparse.Namespace(**{**base, **kw})


def shares(state, data):
    """(share in the 0.25 mode, share in P's low-density region) per seed."""
    _, lo, hi, threshold = data
    samples = jax.vmap(K.generate, in_axes=(0, None))(K.generator_params(state), random.key(99))
    comps = K.component_log_densities(samples, lo, hi)
    return (np.asarray(jnp.mean(jnp.argmax(comps, -1) == K.SMALL_MODE, axis=1)),
            np.asarray(jnp.mean(jax.scipy.special.logsumexp(comps, -1) < threshold, axis=1)))


def quiet(*args):
    pass


def test_forward_kl_covers_and_reverse_kl_seeks(data):
    """Default settings, 4 seeds trained in one vmapped call per divergence."""
    keys = K.seed_keys(random.key(21), 4)
    fwd_state, fwd_hist, _ = K.run_training(data[0], "forward", settings(), keys, K.init_states(keys), log=quiet)
    rev_state, rev_hist, _ = K.run_training(data[0], "reverse", settings(), keys, K.init_states(keys), log=quiet)
    fwd_small, fwd_low = shares(fwd_state, data)
    rev_small, rev_low = shares(rev_state, data)
    assert np.all(fwd_small >= 0.15) and np.all(fwd_low >= 0.20), (fwd_small, fwd_low)
    assert np.all((rev_small <= 0.02) | (rev_small >= 0.98)) and np.all(rev_low <= 0.06), (rev_small, rev_low)
    # the critics' final estimates are near the divergences they bound (reverse KL of the big mode: -log 0.75)
    assert fwd_hist.shape == (4, settings().steps, 2) and np.isfinite(fwd_hist).all() and np.isfinite(rev_hist).all()
    assert 0.1 < fwd_hist[:, -3000:, 0].mean() < 1.0
    assert abs(rev_hist[:, -3000:, 0].mean() - np.log(4 / 3)) < 0.1


def test_post_generator_loss_follows_reverse_kl_at_the_optimal_critic():
    """The post's generator step, post_loss(T(G(z)), y=1) = -E_Q[T], at the optimal forward-KL critic
    T* = 1 + log(p/q) frozen at mu0, descends KL(Q||P), not KL(P||Q): why the post's forward KL seeks a mode.
    d/dmu -E_Q[1 + log p - log q0] = -E_Q[grad log p] + E_Q[grad log q0] = P^-1 (mu - mu_p) at mu0."""
    grad, _, reverse = gradient_at_the_optimal_critic(
        lambda t: K.post_loss(t[:, None], jnp.ones((t.shape[0], 1)), "forward"), "forward", random.key(6))
    np.testing.assert_allclose(grad, reverse, atol=0.03)


def test_post_objective_does_not_cover(data):
    """The post's objective at its 7000 steps: forward KL seeks a mode too (the saddle objective covers, above)."""
    keys = K.seed_keys(random.key(5), 2)
    for d in ("forward", "reverse"):
        state, _, _ = K.run_training(data[0], d, settings(objective="post", steps=7000, seeds=2), keys,
                                     K.init_states(keys), log=quiet)
        small, _ = shares(state, data)
        assert np.all(small < 0.1), (d, small)


def test_first_nonfinite_step():
    history = np.zeros((3, 10, 2))
    history[1, 4, 0] = np.nan
    history[2, 7:, 1] = np.inf
    assert list(K.first_nonfinite_step(history)) == [-1, 4, 7]


def test_atomic_outputs_leave_nothing_on_failure(tmp_path):
    final = tmp_path / "a.png"
    with pytest.raises(RuntimeError):
        with K.AtomicOutputs() as out:
            with open(out.path(str(final)), "wb") as f:
                f.write(b"half")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    with K.AtomicOutputs() as out:
        with open(out.path(str(final)), "wb") as f:
            f.write(b"whole")
        assert not final.exists()                  # nothing under the final name until the end
    assert final.read_bytes() == b"whole" and len(list(tmp_path.iterdir())) == 1


# ---------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Subprocesses share one compilation cache in a temporary folder (never the user's)."""
    return {**os.environ, "XDG_CACHE_HOME": str(tmp_path_factory.mktemp("cache")), "PYTHONUNBUFFERED": "1"}


def run(args, env, cwd):
    return subprocess.run([sys.executable, SCRIPT] + args, env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_cli_writes_figures_and_samples(tmp_path, env):
    r = run(["--compare", "--steps", "300", "--seeds", "2", "--out", "figs/new", "--save-samples", "s/x.npz"],
            env, tmp_path)
    assert r.returncode == 0, r.stderr
    png = tmp_path / "figs" / "new" / "compare.png"
    assert png.stat().st_size > 20_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with np.load(tmp_path / "s" / "x.npz") as f:
        assert f["samples_forward"].shape == f["samples_reverse"].shape == (2, 5000, 2)
        assert 0 <= f["samples_forward"].min() and f["samples_forward"].max() <= 1       # the scaled space
        assert float(f["data_min"]) < 0 < 1 < float(f["data_max"])
        assert int(f["steps"]) == 300 and int(f["seeds"]) == 2 and str(f["objective"]) == "saddle"
    assert "evaluation" in r.stdout and "time: import" in r.stdout
    assert (tmp_path / "figs" / "new" / "mle_fit.png").stat().st_size > 20_000
    assert not [p for p in tmp_path.rglob("*.tmp")]


def test_cli_same_seed_same_samples_other_seed_other(tmp_path, env):
    common = ["--steps", "200", "--no-plot", "--objective", "post"]
    for name, seed in (("a", "3"), ("b", "3"), ("c", "4")):
        r = run(common + ["--seed", seed, "--save-samples", f"{name}.npz"], env, tmp_path)
        assert r.returncode == 0, r.stderr
    a, b, c = (np.load(tmp_path / f"{n}.npz")["samples"] for n in "abc")
    assert a.shape == (1, 5000, 2)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3


@pytest.mark.parametrize("args, flag", [
    (["--steps", "0"], "--steps"), (["--steps", "-3"], "--steps"), (["--steps", "abc"], "--steps"),
    (["--batch-size", "0"], "--batch-size"), (["--seeds", "0"], "--seeds"), (["--lr-gen", "-1"], "--lr-gen"),
    (["--lr-disc", "nan"], "--lr-disc"), (["--lr-disc", "inf"], "--lr-disc"), (["--seed", "-1"], "--seed"),
    (["--objective", "gan"], "--objective"),
])
def test_cli_bad_values_one_line_exit_2(args, flag, tmp_path, env):
    t = time.perf_counter()
    r = run(args, env, tmp_path)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and flag in lines[0] and ("expected" in lines[0] or "invalid choice" in lines[0]), r.stderr
    assert r.stdout == "" and time.perf_counter() - t < 10
    assert not list(tmp_path.iterdir())            # nothing written, not even the output folder


def test_cli_unknown_flag_gets_usage_and_suggestion(tmp_path, env):
    r = run(["--revrese"], env, tmp_path)
    assert r.returncode == 2
    assert r.stderr.startswith("usage: kl_forward_reverse.py") and "--revrese" in r.stderr
    assert "did you mean --reverse?" in r.stderr


@pytest.mark.parametrize("args, flag", [
    (["--out", "afile/figs"], "--out"),
    (["--save-samples", "afile/x.npz"], "--save-samples"),
    (["--out", "/proc/x"], "--out"),
    (["--save-samples", "/proc/x.npz"], "--save-samples"),
    (["--save-samples", "."], "--save-samples"),
])
def test_cli_unwritable_outputs_refused_before_training(args, flag, tmp_path, env):
    (tmp_path / "afile").write_text("a file, not a folder")
    t = time.perf_counter()
    r = run(args + ["--steps", "100000"], env, tmp_path)
    assert r.returncode == 2 and flag in r.stderr and "training" not in r.stdout, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and time.perf_counter() - t < 10


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_cli_read_only_folder_refused(tmp_path, env):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    r = run(["--out", str(ro)], env, tmp_path)
    assert r.returncode == 2 and "cannot write" in r.stderr


def test_cli_divergence_is_reported_and_writes_nothing(tmp_path, env):
    r = run(["--reverse", "--lr-disc", "10", "--lr-gen", "10", "--steps", "2000", "--seeds", "2",
             "--out", "figs", "--save-samples", "x.npz"], env, tmp_path)
    assert r.returncode == 1
    assert "reverse KL, KL(Q||P) diverged" in r.stderr and "seed 0 (first non-finite loss at step" in r.stderr
    assert "smaller step sizes" in r.stderr and "DIVERGED" in r.stdout
    assert not (tmp_path / "x.npz").exists() and not list((tmp_path / "figs").glob("*"))


def test_cli_collapsed_generator_is_reported(tmp_path, env):
    """--lr-gen 10 saturates the generator's Sigmoid: every loss stays finite, but all points land in one place."""
    r = run(["--lr-gen", "10", "--steps", "1000", "--save-samples", "x.npz", "--no-plot"], env, tmp_path)
    assert r.returncode == 1 and "collapsed to a single point" in r.stderr, r.stderr
    assert not (tmp_path / "x.npz").exists()


def test_cli_sigterm_leaves_no_partial_output(tmp_path, env):
    p = subprocess.Popen([sys.executable, SCRIPT, "--steps", "400000", "--out", "figs", "--save-samples", "x.npz"],
                         env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in p.stdout:                          # wait until it is training
        if line.startswith("training"):
            break
    time.sleep(1.0)
    p.send_signal(signal.SIGTERM)
    p.wait(timeout=120)
    assert p.returncode != 0
    assert not (tmp_path / "x.npz").exists() and not list((tmp_path / "figs").iterdir())
