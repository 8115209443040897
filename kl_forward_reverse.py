"""Forward and reverse KL divergence with a tiny f-GAN, in pure JAX.

A 2-D mixture of two Gaussians P (weights 0.75 and 0.25) is fitted by a generator Q_theta = G_theta(z),
z ~ U[0,1]^10, trained as an f-GAN (Nowozin et al. 2016, arXiv:1606.00709).  A critic V_omega gives
T = g_f(V), and the two networks play the saddle-point game

    F(theta, omega) = E_P[g_f(V(x))] - E_Q[f*(g_f(V(G(z))))]  <=  D_f(P||Q),

critic up, generator down.  With f(u) = u log u, D_f is forward KL, KL(P||Q), and Q spreads over both
modes (mode-covering); with f(u) = -log u it is reverse KL, KL(Q||P), and Q sits on one mode (mode-seeking).

The file follows the blog post it reimplements: 1 data, 2 the MLE Gaussian, 3 layers, 4 Adam, 5 divergences,
6 training, 7 evaluation, 8 figures; then the run, and last the speed-ups, which change no number.
`--objective post` runs the post's own objective, which does not show the effect: see README.md.

    python kl_forward_reverse.py --reverse      # reverse KL: one mode
    python kl_forward_reverse.py --compare      # forward and reverse, side by side
"""
import argparse
import contextlib
import difflib
import functools
import importlib.metadata
import importlib.util
import math
import os
import runpy
import signal
import sys
import tempfile
import threading
import time
from typing import NamedTuple

# ---------------------------------------------------------------------------
# 0. Settings: every flag, its default and what it accepts, in one place.
# ---------------------------------------------------------------------------


def _number(cast, accepted, what):
    """An argparse type: the text cast, if accepted(value); otherwise an error naming what is accepted."""
    def parse(text):
        try:
            if accepted(value := cast(text)):
                return value
        except ValueError:
            pass
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return parse


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad value is one line, and a misspelt flag gets a suggestion."""

    def error(self, message):
        if message.startswith("argument "):
            self.exit(2, f"{self.prog}: error: {message}\n")
        if message.startswith("unrecognized arguments:"):
            flags = [o for a in self._actions for o in a.option_strings]
            message = "unrecognized arguments: " + ", ".join(
                f"{w} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(w, flags, 1)) else w
                for w in message.split(":", 1)[1].split())
        super().error(message)


def parse_args(argv=None):
    """The flags, checked; an output that cannot be written is refused here, before any training."""
    count = _number(int, lambda v: v >= 1, "a positive integer")
    rate = _number(float, lambda v: math.isfinite(v) and v > 0, "a finite positive number")
    p = _Parser(prog="kl_forward_reverse.py", allow_abbrev=False,
                description="Forward vs reverse KL with a tiny f-GAN on a 2-D mixture of two Gaussians.")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--reverse", action="store_true", help="train with reverse KL, KL(Q||P), not forward KL(P||Q)")
    what.add_argument("--compare", action="store_true", help="train both, and draw MLE | forward | reverse")
    p.add_argument("--objective", choices=("saddle", "post"), default="saddle",
                   help="saddle: the f-GAN game (default); post: the blog post's Sigmoid critic and generator loss")
    p.add_argument("--steps", type=count, default=25000, help="training steps (25000; the post: 7000)")
    p.add_argument("--batch-size", type=count, default=64, help="data and generated points per step (64)")
    p.add_argument("--lr-gen", type=rate, default=1e-4, help="the generator's Adam step size (1e-4)")
    p.add_argument("--lr-disc", type=rate, default=5e-4, help="the critic's Adam step size (5e-4)")
    p.add_argument("--noise", type=_number(float, lambda v: 0 <= v < math.inf, "a finite number >= 0"), default=0.1,
                   help="instance noise: its std at step 0, falling to 0 by the last step (0.1; 0: none)")
    p.add_argument("--seed", type=_number(int, lambda v: 0 <= v < 2**32, "an integer in [0, 2**32)"), default=0,
                   help="random seed (0); the same seed and flags give the same numbers")
    p.add_argument("--seeds", type=count, default=1, help="independent runs trained at once with vmap (1)")
    p.add_argument("--out", default="out", help="folder for the figures, created if missing (out)")
    p.add_argument("--no-plot", action="store_true", help="draw no PNG figures")
    p.add_argument("--animate", action="store_true", help="also write training.gif: seed 0 as it trains")
    p.add_argument("--save-samples", metavar="PATH.npz", help="write 5000 points per seed and the settings here")
    p.add_argument("--no-cache", action="store_true", help="do not use JAX's persistent compilation cache")
    p.add_argument("--no-speedups", action="store_true", help="run without the speed-ups (the same numbers)")
    args = p.parse_args(argv)
    if args.animate and args.objective == "post":
        p.error("--animate shades the saddle game's critic, log(p/q); the post's critic is no such estimate")
    outputs = [("--out", args.out, True)] * (args.animate or not args.no_plot)
    for flag, path, is_dir in outputs + [("--save-samples", args.save_samples, False)] * bool(args.save_samples):
        if error := check_writable(path, is_dir):
            p.exit(2, f"{p.prog}: error: {flag}: {error}\n")
    return args


def check_writable(path, is_dir):
    """An error line if path (a folder, created if missing, or a file in one) cannot be written, else None."""
    folder = path if is_dir else (os.path.dirname(path) or ".")
    if not is_dir and os.path.isdir(path):
        return f"{path} is a folder; give a file name such as samples.npz"
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):       # the only test that is right for root too
            pass
    except OSError as e:
        return f"cannot write to {folder}: {e.strerror or e}"
    return None


def signal_again(unraisable):
    """sys.unraisablehook: Python drops an exception raised where it cannot propagate, and a signal's handler may run
    there (in JAX's garbage-collection callback, say), so Ctrl-C's KeyboardInterrupt or SIGTERM's SystemExit would be
    lost and the run would go on: send that signal again, a moment later, from a thread, so that its handler runs
    outside this callback.  Any other exception is reported as Python does."""
    if isinstance(unraisable.exc_value, (KeyboardInterrupt, SystemExit)):
        signum = signal.SIGINT if isinstance(unraisable.exc_value, KeyboardInterrupt) else signal.SIGTERM
        again = threading.Timer(0.01, os.kill, (os.getpid(), signum))
        again.daemon = True
        again.start()
    else:
        sys.__unraisablehook__(unraisable)


if __name__ == "__main__":
    # The flags are read before JAX is imported (a second), so that a mistake fails at once; then the rest of
    # this file runs as a module, and trains.  SIGTERM unwinds like Ctrl-C, so that no partial output is left.
    settings = parse_args()
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    sys.unraisablehook = signal_again
    try:
        status = runpy.run_path(__file__)["run_as_script"](settings)       # with the speed-ups it does not return
    except (KeyboardInterrupt, SystemExit) as stop:         # Ctrl-C or SIGTERM: the partial outputs are gone by now
        print("interrupted: no partial figure or .npz was left behind", file=sys.stderr, flush=True)
        sys.stdout.flush()
        # leave without tearing down the interpreter: after a computation was cut short, that crashed once in 30
        # SIGTERMs here ("Fatal Python error: PyThreadState_Get", while finalizing)
        os._exit(1 if isinstance(stop, KeyboardInterrupt) else stop.code)
    sys.exit(status)

import jax  # noqa: E402  (after the flags, on purpose: see above)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax, random  # noqa: E402
from jax.scipy.special import logsumexp  # noqa: E402
from jax.scipy.stats import multivariate_normal  # noqa: E402

# ---------------------------------------------------------------------------
# 1. Data: the post's mixture, in its 64-point blocks, scaled to [0, 1].
# ---------------------------------------------------------------------------

#            weight   mean        covariance
MIXTURE = ((0.75, (0.5, 2.0), ((4.0, 0.0), (0.0, 1.5))),
           (0.25, (9.0, 9.0), ((1.0, 0.0), (0.0, 3.0))))
BLOCK_SIZE = 64        # the post drew its data 64 points at a time: 48 from the 0.75 mode, then 16 from the 0.25
NUM_BLOCKS = 10000     # 640,000 points in all
SMALL_MODE = 1         # index of the 0.25 component in MIXTURE


def sample_mixture(key, num_blocks=NUM_BLOCKS):
    """The post's data: num_blocks blocks of int(64 w_k) points of each component k. Shape (64 num_blocks, 2)."""
    keys = random.split(key, len(MIXTURE))
    # x = mu + L eps, eps ~ N(0, I), with L L^T = Sigma
    blocks = [np.array(mean) + random.normal(k, (num_blocks, int(BLOCK_SIZE * w), 2)) @ np.linalg.cholesky(cov).T
              for k, (w, mean, cov) in zip(keys, MIXTURE)]
    return jnp.concatenate(blocks, axis=1).reshape(-1, 2)


def scale_to_unit(raw):
    """Min-max scaling by the min and max over both coordinates, as in the post: x = (raw - lo) / (hi - lo)."""
    lo, hi = jnp.min(raw), jnp.max(raw)
    return (raw - lo) / (hi - lo), lo, hi


def component_log_densities(x, lo, hi):
    """log(w_k N(raw; mu_k, Sigma_k)) + 2 log(hi - lo) for each component k at scaled points x. Shape (..., 2).

    raw = lo + x (hi - lo); the Jacobian of the scaling adds 2 log(hi - lo) in two dimensions."""
    raw = lo + x * (hi - lo)
    return jnp.stack([math.log(w) + multivariate_normal.logpdf(raw, jnp.array(mean), jnp.array(cov))
                      for w, mean, cov in MIXTURE], axis=-1) + 2 * jnp.log(hi - lo)


def mixture_log_density(x, lo, hi):
    """log p(x), P's exact log-density in the scaled coordinates, through logsumexp (no log of zero)."""
    return logsumexp(component_log_densities(x, lo, hi), axis=-1)


# ---------------------------------------------------------------------------
# 2. The MLE Gaussian: the best single Gaussian under forward KL (moment matching).
# ---------------------------------------------------------------------------


def fit_gaussian_mle(x):
    """mu = (1/N) sum_n x_n,  Sigma = (1/N) sum_n (x_n - mu)(x_n - mu)^T."""
    mean = jnp.mean(x, axis=0)
    centred = x - mean
    return mean, centred.T @ centred / x.shape[0]


def sample_gaussian(key, mean, cov, n):
    return random.multivariate_normal(key, mean, cov, (n,))


class Data(NamedTuple):
    points: jax.Array      # (640000, 2), scaled to [0, 1]
    lo: jax.Array          # the scaling: raw = lo + points (hi - lo)
    hi: jax.Array
    log_p: jax.Array       # log p at every point
    mle_mean: jax.Array    # the MLE Gaussian
    mle_cov: jax.Array


@jax.jit
def make_data(key):
    """The scaled data, its scaling, log p at every point, and the MLE Gaussian."""
    points, lo, hi = scale_to_unit(sample_mixture(key))
    return Data(points, lo, hi, mixture_log_density(points, lo, hi), *fit_gaussian_mle(points))


# ---------------------------------------------------------------------------
# 3. Layers, stax-style: each is an (init_fun, apply_fun) pair with
#    init_fun(key, input_shape) -> (output_shape, params) and
#    apply_fun(params, inputs) -> outputs, so code written for the old stax runs unchanged.
# ---------------------------------------------------------------------------


def glorot_normal(key, shape):
    """Glorot (fan-average) normal weights, truncated at 2 std as in jax.nn.initializers.glorot_normal.

    0.8796... is the std of a standard normal truncated to (-2, 2): dividing by it keeps Var = 2/(fan_in + fan_out)."""
    fan_in, fan_out = shape
    std = jnp.sqrt(jnp.float32(2.0 / (fan_in + fan_out))) / jnp.float32(0.87962566103423978)
    return random.truncated_normal(key, -2.0, 2.0, shape) * std


def Dense(out_dim):
    """Fully connected layer y = x W + b; W Glorot-normal, b ~ N(0, 0.01^2), stax's defaults."""
    def init_fun(key, input_shape):
        w_key, b_key = random.split(key)
        W = glorot_normal(w_key, (input_shape[-1], out_dim))
        b = 0.01 * random.normal(b_key, (out_dim,))
        return input_shape[:-1] + (out_dim,), (W, b)

    def apply_fun(params, inputs, **kwargs):
        W, b = params
        return jnp.dot(inputs, W) + b
    return init_fun, apply_fun


def elementwise(fun):
    """A parameter-free layer applying fun to every entry."""
    def init_fun(key, input_shape):
        return input_shape, ()

    def apply_fun(params, inputs, **kwargs):
        return fun(inputs)
    return init_fun, apply_fun


LeakyRelu = elementwise(jax.nn.leaky_relu)        # negative slope 0.01, as in stax
Sigmoid = elementwise(jax.nn.sigmoid)


def serial(*layers):
    """Layers in sequence; params is a list with one entry per layer, as in stax.serial."""
    init_funs, apply_funs = zip(*layers)

    def init_fun(key, input_shape):
        params = []
        for init in init_funs:
            key, layer_key = random.split(key)
            input_shape, layer_params = init(layer_key, input_shape)
            params.append(layer_params)
        return input_shape, params

    def apply_fun(params, inputs, **kwargs):
        for apply, layer_params in zip(apply_funs, params):
            inputs = apply(layer_params, inputs, **kwargs)
        return inputs
    return init_fun, apply_fun


LATENT_DIM = 10
generator_init, generator_apply = serial(Dense(2), Sigmoid)                                 # G(z), z ~ U[0,1]^10
critic_init, critic_apply = serial(Dense(32), LeakyRelu, Dense(32), LeakyRelu, Dense(1))    # V(x), unbounded:
# the output activation T = g_f(V) belongs to the divergence (section 5).  The post put a Sigmoid here.


# ---------------------------------------------------------------------------
# 4. Adam, with the interface of the old optimizers.adam (once in JAX, now removed).
# ---------------------------------------------------------------------------


def adam(step_size, b1=0.9, b2=0.999, eps=1e-8):
    """Returns (init, update, get_params) on any pytree of arrays.

    state = (x, m, v);  update(i, g, state), i = 0, 1, 2, ... :
      m <- b1 m + (1 - b1) g,   v <- b2 v + (1 - b2) g^2,
      x <- x - step_size(i) * m / (1 - b1^(i+1)) / (sqrt(v / (1 - b2^(i+1))) + eps).
    step_size is a number or a function of i."""
    def init(params):
        zeros = jax.tree.map(jnp.zeros_like, params)
        return params, zeros, zeros

    def update(i, grads, state):
        x, m, v = state
        lr = step_size(i) if callable(step_size) else step_size
        m = jax.tree.map(lambda m, g: (1 - b1) * g + b1 * m, m, grads)
        v = jax.tree.map(lambda v, g: (1 - b2) * jnp.square(g) + b2 * v, v, grads)

        def step(x, m, v):
            m_hat = m / (1 - jnp.asarray(b1, m.dtype) ** (i + 1))      # bias corrections
            v_hat = v / (1 - jnp.asarray(b2, m.dtype) ** (i + 1))
            return x - lr * m_hat / (jnp.sqrt(v_hat) + eps)
        return jax.tree.map(step, x, m, v), m, v

    def get_params(state):
        return state[0]
    return init, update, get_params


# ---------------------------------------------------------------------------
# 5. Divergences.  For each f: the output activation g_f (T = g_f(V) must lie
#    in the domain of f*) and the conjugate f*(t) = sup_u (u t - f(u)).  The
#    optimal critic is T* = f'(p/q).  (Nowozin et al. 2016, Table 2.)
# ---------------------------------------------------------------------------

DIVERGENCES = {
    #              f(u)        g_f(v)                      f*(t)                           f*(g_f(v)), stable form
    "forward": dict(name="forward KL, KL(P||Q)",     # u log u
                    activation=lambda v: v,
                    conjugate=lambda t: jnp.exp(t - 1),
                    conjugate_of_activation=lambda v: jnp.exp(v - 1),
                    log_ratio=lambda v: v - 1),      # log(p/q) as the critic sees it: T* = 1 + log(p/q)
    "reverse": dict(name="reverse KL, KL(Q||P)",     # -log u
                    activation=lambda v: -jnp.exp(-v),
                    conjugate=lambda t: -1 - jnp.log(-t),
                    conjugate_of_activation=lambda v: v - 1,    # = -1 - log(exp(-v)), without the overflow
                    log_ratio=lambda v: v),          # T* = -q/p = -exp(-V*), so V* = log(p/q)
}


def f_gan_objective(v_real, v_fake, divergence):
    """F = E_P[g_f(V)] - E_Q[f*(g_f(V))] from the critic's outputs V at data and at generated points.

    For every critic F <= D_f(P||Q); the optimal critic T* = g_f(V*) = f'(p/q) makes it an equality."""
    d = DIVERGENCES[divergence]
    return jnp.mean(d["activation"](v_real)) - jnp.mean(d["conjugate_of_activation"](v_fake))


def generator_objective(v_fake, divergence):
    """The part of F that depends on the generator, negated for minimising: -E_Q[f*(g_f(V))]."""
    return -jnp.mean(DIVERGENCES[divergence]["conjugate_of_activation"](v_fake))


def discriminator_loss(critic_params, real, fake, divergence):
    """The critic maximises F: loss = -(E_P[g_f(V)] - E_Q[f*(g_f(V))]), one critic pass over both batches."""
    v = critic_apply(critic_params, jnp.concatenate([real, fake]))
    return -f_gan_objective(v[:len(real)], v[len(real):], divergence)


def generator_loss(generator_params, critic_params, z, divergence, jitter=0.0):
    """The generator descends F: minimise -E_Q[f*(g_f(V(G(z) + jitter)))] (jitter: instance noise, section 6)."""
    return generator_objective(critic_apply(critic_params, generator_apply(generator_params, z) + jitter), divergence)


POST_EPS = 1e-10


def post_loss(output, y, divergence):
    """The post's loss_function, verbatim: output = Sigmoid(V) in (0, 1), y = 1 for data, 0 for generated points.

    Its generator step uses y = 1 too, so the generator maximises E_Q[T] (the f-GAN paper's
    'alternative' objective): mode-seeking for both divergences."""
    if divergence == "reverse":
        return -jnp.mean(-y * jnp.exp(output) + (1 - y) * (output + POST_EPS + 1.), axis=0)[0]
    return -jnp.mean(y * output - (1. - y) * (jnp.exp(output - 1.)), axis=0)[0]


def post_critic_apply(critic_params, x):
    """The post's discriminator: Dense(32), LeakyRelu, Dense(32), LeakyRelu, Dense(1), Sigmoid."""
    return Sigmoid[1]((), critic_apply(critic_params, x))


# ---------------------------------------------------------------------------
# 6. Training: one step is a pure function of (state, step index, batch); the
#    whole loop is one lax.scan, and --seeds N trains N of them at once (vmap).
# ---------------------------------------------------------------------------


class State(NamedTuple):
    generator: tuple            # Adam state (params, m, v) of G
    critic: tuple               # Adam state (params, m, v) of V


class Metrics(NamedTuple):
    bound: jax.Array            # F at the step's batch: the critic's estimate of the divergence
    generator_loss: jax.Array


def init_state(key):
    """Generator and critic parameters (the post's shapes) in fresh Adam states (init ignores the step size)."""
    gen_key, critic_key = random.split(key)
    _, gen_params = generator_init(gen_key, (-1, LATENT_DIM))
    _, critic_params = critic_init(critic_key, (-1, 2))
    adam_init = adam(step_size=None)[0]
    return State(adam_init(gen_params), adam_init(critic_params))


def sample_batch(data, i, key, batch_size=64):
    """Step i's batch, from fold_in(key, i) alone: batch_size data points drawn with replacement (as the post's
    np.random.choice), the generator's uniform z, and standard normal draws for the instance noise (2, n, 2)."""
    data_key, z_key, noise_key = random.split(random.fold_in(key, i), 3)
    real = data[random.randint(data_key, (batch_size,), 0, len(data))]
    return real, random.uniform(z_key, (batch_size, LATENT_DIM)), random.normal(noise_key, (2, batch_size, 2))


@functools.lru_cache     # the same settings give the same function, so its compiled training is reused
def make_train_step(divergence, objective="saddle", lr_gen=1e-4, lr_disc=5e-4, noise=0.1, num_steps=25000):
    """Returns train_step(state, i, batch) -> (state, Metrics): one critic step, then one generator step.

    Instance noise (Sonderby et al. 2017; Arjovsky & Bottou 2017): the critic sees data and generated points moved
    by N(0, s_i^2), s_i = noise (1 - i / num_steps), so the game is played between P * N and Q * N, which overlap
    everywhere: their divergence is finite and its optimal critic smooth (README.md, "Every seed")."""
    _, gen_update, gen_params_of = adam(lr_gen)
    _, critic_update, critic_params_of = adam(lr_disc)

    def saddle_step(state, i, batch):
        real, z, normal = batch
        jitter = noise * jnp.maximum(0.0, 1.0 - i / num_steps) * normal          # instance noise, (2, n, 2)
        fake = generator_apply(gen_params_of(state.generator), z)                 # a constant for the critic
        d_loss, d_grads = jax.value_and_grad(discriminator_loss)(critic_params_of(state.critic), real + jitter[0],
                                                                 fake + jitter[1], divergence)
        critic = critic_update(i, d_grads, state.critic)
        # then the generator, on the same z and noise, against the updated critic (as in the post)
        g_loss, g_grads = jax.value_and_grad(generator_loss)(gen_params_of(state.generator), critic_params_of(critic),
                                                             z, divergence, jitter[1])
        return State(gen_update(i, g_grads, state.generator), critic), Metrics(-d_loss, g_loss)

    def post_step(state, i, batch):
        """The post's step: two critic updates (data, y=1; generated, y=0) sharing the index i, then the generator."""
        real, z, _ = batch
        fake = generator_apply(gen_params_of(state.generator), z)
        ones, zeros = jnp.ones((len(real), 1)), jnp.zeros((len(real), 1))

        def critic_loss(params, x, y):
            return post_loss(post_critic_apply(params, x), y, divergence)

        real_loss, grads = jax.value_and_grad(critic_loss)(critic_params_of(state.critic), real, ones)
        critic = critic_update(i, grads, state.critic)
        fake_loss, grads = jax.value_and_grad(critic_loss)(critic_params_of(critic), fake, zeros)
        critic = critic_update(i, grads, critic)
        g_loss, g_grads = jax.value_and_grad(lambda p: critic_loss(critic_params_of(critic), generator_apply(p, z),
                                                                   ones))(gen_params_of(state.generator))
        return State(gen_update(i, g_grads, state.generator), critic), Metrics(-(real_loss + fake_loss), g_loss)

    return saddle_step if objective == "saddle" else post_step


BLOCK = 100                     # steps whose batches are drawn in one call


def train(train_step, state, data, key, first_step, num_steps, batch_size=64):
    """num_steps steps from first_step in one compiled loop: (state, Metrics of every step, and (step, generator
    params, critic params) after every BLOCK steps and after the last).  Step i trains on sample_batch(data, i,
    key), as a Python loop of train_step would; a BLOCK's batches are drawn in one vectorised call (vmap)."""
    def steps(state, first, n):
        i = first + jnp.arange(n)
        batches = jax.vmap(sample_batch, in_axes=(None, 0, None, None))(data, i, key, batch_size)
        state, metrics = lax.scan(lambda state, step: train_step(state, step[0], step[1:]), state, (i,) + batches)
        return state, (metrics, (first + n, state.generator[0], state.critic[0]))

    full, rest = divmod(num_steps, BLOCK)
    state, (metrics, params) = lax.scan(lambda s, first: steps(s, first, BLOCK), state,
                                        first_step + BLOCK * jnp.arange(full))
    metrics = jax.tree.map(jnp.ravel, metrics)
    if rest:                                    # a last, shorter block
        state, (last_metrics, last_params) = steps(state, first_step + full * BLOCK, rest)
        metrics = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), metrics, last_metrics)
        params = jax.tree.map(lambda a, b: jnp.concatenate([a, b[None]]), params, last_params)
    return state, metrics, params


def seed_keys(key, num_seeds):
    """Independent keys, one per seed; fold_in keeps seed i's key the same whatever num_seeds is."""
    return jax.vmap(lambda i: random.fold_in(key, i))(jnp.arange(num_seeds))


init_states = jax.jit(jax.vmap(init_state))      # one State per key, the seeds on the leading axis


class Training(NamedTuple):
    state: State                # the final states (NumPy), seeds on the leading axis
    metrics: Metrics            # each (seeds, steps); NaN for steps not run (every seed had diverged)
    snapshots: tuple            # seed 0's (steps, generator params, critic params), stacked: at 0 and every BLOCK
    steps_per_second: float     # training alone: seed-steps per second after the first chunk (which compiles)


@functools.partial(jax.jit, static_argnums=(0, 5, 6))
def train_chunk(train_step, states, keys, data, first_step, num_steps, batch_size):
    """train, for every seed at once (vmap): states and keys have the seeds on their leading axis."""
    return jax.vmap(lambda state, key: train(train_step, state, data, key, first_step, num_steps, batch_size))(
        states, keys)


def chunk_lengths(num_steps, max_chunks=5):
    """Up to max_chunks equal lengths in whole BLOCKs (so one compiled chunk), the last longer by what is left."""
    blocks = num_steps // BLOCK
    n = max(c for c in range(1, max_chunks + 1) if blocks % c == 0 and blocks >= c or c == 1)
    size = blocks // n * BLOCK
    return [size] * (n - 1) + [num_steps - size * (n - 1)]


def train_seeds(train_step, states, data, keys, num_steps, batch_size=64, log=print, name=""):
    """Train every seed for num_steps steps in a few chunks, printing progress between them.  With several
    devices the seeds are split into equal groups, one per device, and each chunk runs on all at once (JAX
    dispatches asynchronously); a group has two seeds or more: a vmap over one rounds differently."""
    num_groups = max(g for g in range(1, jax.device_count() + 1) if len(keys) % g == 0 and len(keys) >= 2 * g
                     or g == 1)
    size = len(keys) // num_groups
    # the groups are cut on the host: slicing an array on a device compiles a program for each slice
    states, raw_keys = jax.device_get((states, random.key_data(keys)))
    groups = [jax.device_put((jax.tree.map(lambda a: a[part], states), raw_keys[part], data), device)
              for part, device in zip([slice(g * size, (g + 1) * size) for g in range(num_groups)], jax.devices())]
    groups = [(states, random.wrap_key_data(keys), data) for states, keys, data in groups]
    if num_groups > 1:
        log(f"  on {num_groups} devices at once, {size} seeds on each")
    snapshots = [jax.tree.map(lambda a: a[:1], (np.zeros(1, int), states.generator[0], states.critic[0]))]
    metrics, done = [], 0
    for length in chunk_lengths(num_steps):
        results = [train_chunk(train_step, states, keys, data, done, length, batch_size)      # on every device at once
                   for states, keys, data in groups]
        groups = [(states, keys, data) for (states, _, _), (_, keys, data) in zip(results, groups)]
        metrics.append(Metrics(*map(np.concatenate, zip(*jax.device_get([m for _, m, _ in results])))))
        snapshots.append(jax.tree.map(lambda a: np.asarray(a)[0], results[0][2]))      # seed 0 is in group 0
        if done == 0:                               # the first chunk compiles: the clock starts after it
            clock, first = time.perf_counter(), length
        done += length
        bound = metrics[-1].bound[:, -max(1, length // 10):].mean(axis=1)        # smooth the per-batch bound
        bound = np.sort(bound[np.isfinite(bound)])
        spread = f"  (seeds: {bound[0]:.3f} to {bound[-1]:.3f})" if len(keys) > 1 and len(bound) else ""
        log(f"  step {done:>7}/{num_steps}  critic's estimate of {name}: "
            + (f"{np.median(bound):.3f}{spread}" if len(bound) else "not finite"))
        if not len(bound):
            break                                    # every seed has blown up: the rest would be NaN too
    speed = (done - first) * len(keys) / (time.perf_counter() - clock) if done > first else float("nan")
    metrics = [np.pad(np.concatenate(m, axis=1), ((0, 0), (0, num_steps - done)), constant_values=np.nan)
               for m in zip(*metrics)]
    states = jax.tree.map(lambda *a: np.concatenate(a), *jax.device_get([states for states, _, _ in groups]))
    return Training(states, Metrics(*metrics), jax.tree.map(lambda *a: np.concatenate(a), *snapshots), speed)


def first_nonfinite_step(metrics):
    """Index of the first step whose losses are not finite, per seed, or -1."""
    bad = ~(np.isfinite(metrics.bound) & np.isfinite(metrics.generator_loss))
    return np.where(bad.any(axis=1), bad.argmax(axis=1), -1)


# ---------------------------------------------------------------------------
# 7. Evaluation: mode shares, P's low-density region, and KL both ways, with
#    P's exact density and Q's from a Gaussian kernel density estimate.
# ---------------------------------------------------------------------------

PLOT_POINTS = 1000          # points in each kdeplot, as in the post
NUM_SAMPLES = 5000          # generated points per seed: saved, and the kernel estimate's data
NUM_EVAL = 2000             # fresh points of P and of Q at which the KLs are averaged
LOW_DENSITY_QUANTILE = 0.02
EVAL_COLUMNS = ("0.75 mode", "0.25 mode", "low-density", "KL(P||Q)", "KL(Q||P)")


def generate(gen_params, key, n=NUM_SAMPLES):
    return generator_apply(gen_params, random.uniform(key, (n, LATENT_DIM)))


def kde_log_density(x, samples):
    """log q(x) for the Gaussian kernel density estimate on samples (n, 2), Scott's bandwidth n^(-1/6).

    The same estimate as jax.scipy.stats.gaussian_kde(samples.T).logpdf(x.T), through a matrix of whitened
    squared distances and logsumexp: stable far from every sample."""
    n, d = samples.shape
    chol = jnp.linalg.cholesky(jnp.cov(samples.T) * n ** (-2.0 / (d + 4)))
    white_x = jax.scipy.linalg.solve_triangular(chol, x.T, lower=True).T
    white_s = jax.scipy.linalg.solve_triangular(chol, samples.T, lower=True).T
    sq_dist = jnp.sum(white_x ** 2, 1)[:, None] + jnp.sum(white_s ** 2, 1)[None, :] - 2 * white_x @ white_s.T
    log_norm = jnp.log(n) + jnp.sum(jnp.log(jnp.diag(chol))) + 0.5 * d * jnp.log(2 * jnp.pi)
    return logsumexp(-0.5 * jnp.maximum(sq_dist, 0.0), axis=1) - log_norm


@jax.jit
def evaluate(q_samples, q_fresh, real, lo, hi, threshold):
    """Share of q_samples in each mode and below P's low-density threshold; KL(P||Q) and KL(Q||P).

    Q's log-density is the kernel estimate on q_samples; KL(P||Q) = E_P[log p - log q] is averaged at the real
    points, KL(Q||P) = E_Q[log q - log p] at q_fresh, points the estimate has not seen."""
    comps = component_log_densities(q_samples, lo, hi)
    in_small_mode = jnp.mean(jnp.argmax(comps, axis=-1) == SMALL_MODE)
    low_density = jnp.mean(logsumexp(comps, axis=-1) < threshold)
    kl_pq = jnp.mean(mixture_log_density(real, lo, hi) - kde_log_density(real, q_samples))
    kl_qp = jnp.mean(kde_log_density(q_fresh, q_samples) - mixture_log_density(q_fresh, lo, hi))
    return jnp.stack([1 - in_small_mode, in_small_mode, low_density, kl_pq, kl_qp])


class Evaluation(NamedTuple):
    gaussian_means: jax.Array   # (2, 2): the MLE Gaussian, then the best reverse-KL Gaussian (the 0.75 component)
    gaussian_covs: jax.Array    # (2, 2, 2)
    exact_kls: jax.Array        # (2, 2): [KL(P||N), KL(N||P)] of each Gaussian, with its exact density
    rows: jax.Array             # evaluate() of the two Gaussians, then of each generator, divergence by divergence
    samples: list               # per divergence trained: (seeds, NUM_SAMPLES, 2) generated points
    mle_points: jax.Array       # PLOT_POINTS points of the MLE Gaussian, for its figure


@jax.jit
def best_gaussians(data, key):
    """The MLE Gaussian and the best reverse-KL Gaussian, with [KL(P||N), KL(N||P)] of each from its exact density,
    and the points the evaluation uses: NUM_EVAL real ones, NUM_SAMPLES and NUM_EVAL of each Gaussian, and
    PLOT_POINTS of the MLE Gaussian.  The best reverse-KL Gaussian is the 0.75 component itself (its KL(Q||P),
    -log 0.75 less the overlap, is within 1e-6 nats of a gradient-descent fit's): the 0.25 mode is too far away."""
    sample_key, fresh_key, real_key, exact_key = random.split(key, 4)
    real = data.points[random.randint(real_key, (NUM_EVAL,), 0, len(data.points))]
    (_, big_mean, big_cov), scale = MIXTURE[0], data.hi - data.lo
    means = jnp.stack([data.mle_mean, (jnp.array(big_mean) - data.lo) / scale])
    covs = jnp.stack([data.mle_cov, jnp.array(big_cov) / scale ** 2])
    draw = jax.vmap(sample_gaussian, in_axes=(None, 0, 0, None))
    at_p = mixture_log_density(real, data.lo, data.hi)[None] - jax.vmap(multivariate_normal.logpdf, (None, 0, 0))(
        real, means, covs)
    x = draw(exact_key, means, covs, NUM_EVAL)
    at_n = jax.vmap(multivariate_normal.logpdf)(x, means, covs) - mixture_log_density(x, data.lo, data.hi)
    return dict(means=means, covs=covs, exact_kls=jnp.stack([at_p.mean(1), at_n.mean(1)], axis=1), real=real,
                samples=draw(sample_key, means, covs, NUM_SAMPLES), fresh=draw(fresh_key, means, covs, NUM_EVAL),
                mle_points=sample_gaussian(fresh_key, data.mle_mean, data.mle_cov, PLOT_POINTS),
                sample_key=sample_key, fresh_key=fresh_key)


generate_seeds = jax.jit(jax.vmap(generate, in_axes=(0, None, None)), static_argnums=2)   # params: seeds first


def evaluation(gen_params, data, threshold, key):
    """Everything the report prints.  gen_params: a list, one entry per divergence trained, of generator params
    stacked over the seeds; threshold: log p at P's LOW_DENSITY_QUANTILE.  Each row is one call of evaluate,
    compiled once whatever the number of seeds."""
    g = best_gaussians(data, key)
    samples = [generate_seeds(p, g["sample_key"], NUM_SAMPLES) for p in gen_params]
    fresh = [generate_seeds(p, g["fresh_key"], NUM_EVAL) for p in gen_params]
    # the points are split into rows on the host: splitting an array on a device compiles a program to do it
    samples, fresh, gaussians = jax.device_get((samples, fresh, (g["samples"], g["fresh"])))
    pairs = list(zip(*gaussians)) + [pair for s, f in zip(samples, fresh) for pair in zip(s, f)]
    rows = np.stack([evaluate(q, f, g["real"], data.lo, data.hi, threshold) for q, f in pairs])
    return Evaluation(g["means"], g["covs"], g["exact_kls"], rows, samples, g["mle_points"])


def format_table(labels, rows):
    """One aligned line per row under EVAL_COLUMNS."""
    width = max(len(label) for label in labels)
    lines = [" " * width + "".join(f"{c:>13}" for c in EVAL_COLUMNS)]
    return "\n".join(lines + [f"{label:<{width}}" + "".join(f"{v:>13.3f}" for v in row)
                              for label, row in zip(labels, rows)])


# ---------------------------------------------------------------------------
# 8. Figures: the post's kdeplots, ground truth in Reds and generated points
#    in Blues, drawn headless (matplotlib's Figure, no pyplot state).
# ---------------------------------------------------------------------------


def plot_dataset(ax, points, cmap="Reds", size=1.0):
    import seaborn as sns
    ax.set_aspect("equal")
    ax.set_xlim((0, size))
    ax.set_ylim((0, size))
    ax.tick_params(labelsize=10)
    # gridsize 100 (seaborn's default is 200): the same contours, four times fewer kernel evaluations
    sns.kdeplot(x=np.asarray(points[:, 0]), y=np.asarray(points[:, 1]), cmap=cmap, ax=ax, gridsize=100)


def add_legend(ax):
    import matplotlib.patches as mpatches
    import seaborn as sns
    ax.legend(handles=[mpatches.Patch(color=sns.color_palette("Reds")[2], label="Ground truth"),
                       mpatches.Patch(color=sns.color_palette("Blues")[2], label="Generated data")], loc="upper left")


def figure_fit(data, generated, title):
    """The post's figure: P's kdeplot and Q's, one square panel."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(6, 6), layout="constrained")
    ax = fig.subplots()
    plot_dataset(ax, data[:PLOT_POINTS])
    plot_dataset(ax, generated[:PLOT_POINTS], cmap="Blues")
    add_legend(ax)
    ax.set_title(title)
    return fig


def figure_compare(data, panels, bounds):
    """MLE | forward KL | reverse KL kdeplots, then the critic's estimate over training.

    panels: [(title, points)]; bounds: {divergence: (seeds, steps) array of per-step estimates}."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(20, 5.2), layout="constrained")
    axes = fig.subplots(1, 4, gridspec_kw=dict(width_ratios=(1, 1, 1, 1.25)))
    for ax, (title, points) in zip(axes, panels):
        plot_dataset(ax, data[:PLOT_POINTS])
        plot_dataset(ax, points[:PLOT_POINTS], cmap="Blues")
        ax.set_title(title, fontsize=11)
    add_legend(axes[0])
    for (divergence, history), colour in zip(bounds.items(), ("tab:blue", "tab:red")):
        window = max(1, history.shape[1] // 200)
        smooth = np.nanmean(history[:, :history.shape[1] // window * window].reshape(len(history), -1, window), -1)
        for s, curve in enumerate(smooth):
            axes[3].plot((np.arange(len(curve)) + 0.5) * window, curve, color=colour, lw=1.6 if s == 0 else 0.6,
                         alpha=1 if s == 0 else 0.35, label=DIVERGENCES[divergence]["name"] if s == 0 else None)
    axes[3].set(xlabel="training step", ylabel="critic's estimate (nats)", ylim=(min(0, axes[3].get_ylim()[0]), None))
    axes[3].set_title("E_P[T] - E_Q[f*(T)], the f-GAN lower bound" + f" ({len(smooth)} seeds)" * (len(smooth) > 1),
                      fontsize=11)
    axes[3].legend(loc="lower right")
    return fig


# ---------------------------------------------------------------------------
# 8b. The animation (--animate): seed 0 as it trains, over the critic's view
#     of where Q is missing mass.
# ---------------------------------------------------------------------------

ANIMATION_FRAMES = 26       # evenly spaced snapshots from step 0 to the last (every 800 steps by default)
GRID = 100                  # the critic is read on GRID x GRID points of [0, 1]^2
FRAME_POINTS = 500          # generated points drawn in each frame


@jax.jit
def frame_contents(gen_params, critic_params, grid, lo, hi):
    """For params stacked over the snapshots: FRAME_POINTS generated points (frames, n, 2), the critic's V on the
    grid (frames, grid points), and log p on the grid."""
    z = random.uniform(random.key(0), (FRAME_POINTS, LATENT_DIM))          # the same z in every frame
    points = jax.vmap(generator_apply, in_axes=(0, None))(gen_params, z)
    v = jax.vmap(critic_apply, in_axes=(0, None))(critic_params, grid)[..., 0]
    return points, v, mixture_log_density(grid, lo, hi)


def write_animation(path, data, trainings):
    """A GIF, one panel per divergence: P's contours, seed 0's generated points and, shaded, the critic's estimate
    of log(p/q), read from T = g_f(V): red where it says Q is missing mass, blue where Q has too much."""
    from matplotlib import colormaps, rc_context
    from matplotlib.animation import PillowWriter
    from matplotlib.figure import Figure
    axis = np.linspace(0, 1, GRID)
    grid = np.stack(np.meshgrid(axis, axis), axis=-1).reshape(-1, 2)
    fig = Figure(figsize=(4.3 * len(trainings) + 0.9, 4.6), layout="constrained")
    panels = []
    for ax, (divergence, training) in zip(np.atleast_1d(fig.subplots(1, len(trainings))), trainings.items()):
        frames = np.round(np.linspace(0, len(training.snapshots[0]) - 1, ANIMATION_FRAMES)).astype(int)
        steps, gen_params, critic_params = jax.tree.map(lambda a: a[np.unique(frames)], training.snapshots)
        points, v, log_p = jax.device_get(frame_contents(gen_params, critic_params, grid, data.lo, data.hi))
        log_p = log_p.reshape(GRID, GRID)
        log_ratio = np.asarray(DIVERGENCES[divergence]["log_ratio"](v)).reshape(-1, GRID, GRID)
        # the critic's estimate of the divergence at each frame: F over the 100 steps before it (the first step's F)
        estimates = [np.nanmean(training.metrics.bound[0, max(0, s - 100):max(1, s)]) for s in steps]
        image = ax.imshow(log_ratio[0], extent=(0, 1, 0, 1), origin="lower", vmin=-4, vmax=4,
                          cmap=colormaps["RdBu_r"].resampled(16))       # 16 flat colours: a GIF has 256
        ax.contour(axis, axis, log_p, levels=np.quantile(log_p, [0.6, 0.75, 0.9, 0.97]), colors="k", linewidths=0.8,
                   linestyles="solid")
        dots = ax.scatter(*points[0].T, s=2, c="#222222", linewidths=0)
        ax.set(xlim=(0, 1), ylim=(0, 1), aspect="equal", xticks=[], yticks=[])
        panels.append((ax, DIVERGENCES[divergence]["name"], steps, estimates, image, log_ratio, dots, points))
    fig.colorbar(image, ax=fig.axes, shrink=0.8, ticks=range(-4, 5, 2),
                 label="the critic's log(p/q): red, Q is missing mass there")

    def show(f):
        for ax, name, steps, estimates, image, log_ratio, dots, points in panels:
            image.set_data(log_ratio[f])
            dots.set_offsets(points[f])
            ax.set_title(f"{name}\nstep {steps[f]}: critic's estimate {estimates[f]:.2f} nats", fontsize=10)
    show(0)
    fig.draw_without_rendering()        # lay the figure out once, with its titles: every frame the same size, and
    fig.set_layout_engine("none")       # each drawn twice as fast as with constrained layout at every frame
    writer = PillowWriter(fps=6)
    writer.setup(fig, path, dpi=72)
    with rc_context({"savefig.bbox": None}):        # every frame the whole figure, as in Animation.save
        for f in range(len(steps)):
            show(f)
            writer.grab_frame()
    writer.finish()     # the GIF is written here, once every frame is drawn (writer.saving() would write it after an
    #                     error or Ctrl-C too, and fail if no frame had been drawn)


# ---------------------------------------------------------------------------
# Files are written whole or not at all: each to a temporary name in its
# folder, renamed into place only when every output of the run is complete.
# ---------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_outputs():
    """with atomic_outputs() as path: write to path(final); all are renamed to their final names when the block
    completes, and removed if it does not (an error, Ctrl-C, SIGTERM)."""
    pending = []

    def path(final):
        stem, extension = os.path.splitext(os.path.basename(final))      # writers go by the extension
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(final) or ".", prefix=f".{stem}.", suffix=f".tmp{extension}")
        os.close(fd)
        pending.append((tmp, final))
        return tmp
    try:
        yield path
    except BaseException:
        for tmp, _ in pending:
            if os.path.exists(tmp):
                os.remove(tmp)
        raise
    umask = os.umask(0)
    os.umask(umask)
    for tmp, final in pending:
        os.chmod(tmp, 0o666 & ~umask)              # mkstemp makes 0600 files; outputs get the usual mode
        os.replace(tmp, final)


# ---------------------------------------------------------------------------
# The run: what `python kl_forward_reverse.py` does.
# ---------------------------------------------------------------------------


def failures(training, samples):
    """{seed: why} for each seed whose losses stopped being finite or whose points all coincide."""
    why = {s: f"first non-finite loss at step {b}" for s, b in enumerate(first_nonfinite_step(training.metrics))
           if b >= 0}
    for s in np.flatnonzero(samples.std(axis=1).min(axis=-1) < 1e-5):      # a saturated Sigmoid: one point
        why.setdefault(int(s), "the generator collapsed to a single point")
    return why


def report(result, divergences, num_seeds, failed, log=print):
    """Print (through log) the evaluation table, the Gaussians' exact KLs and, with several seeds, each divergence's
    range; then, on stderr, which seeds diverged."""
    labels = ["forward-KL Gaussian (MLE)", "reverse-KL Gaussian"] + [
        f"{d} KL" + f", seed {s}" * (num_seeds > 1) + " DIVERGED" * (s in failed[d])
        for d in divergences for s in range(num_seeds)]
    log(f"\nevaluation: shares of {NUM_SAMPLES} generated points per row (0.25 mode: the small one; low-density: "
        f"where log p is below P's own {LOW_DENSITY_QUANTILE:.0%} quantile);\n"
        "KL in nats with P's exact density and Q's Gaussian kernel estimate")
    log(format_table(labels, result.rows))
    log(f"(with their exact densities the Gaussians give KL(P||Q) {result.exact_kls[0, 0]:.3f} (MLE) and KL(Q||P) "
        f"{result.exact_kls[1, 1]:.3f} (the 0.75 component): the kernel estimate adds its own bias)")
    for i, d in enumerate(divergences if num_seeds > 1 else ()):
        block = result.rows[2 + i * num_seeds:2 + (i + 1) * num_seeds]
        log(f"{DIVERGENCES[d]['name']} over {num_seeds} seeds: 0.25-mode share {block[:, 1].min():.3f}-"
            f"{block[:, 1].max():.3f}, low-density share {block[:, 2].min():.3f}-{block[:, 2].max():.3f}")
    for d in divergences:
        if failed[d]:
            log(f"\nerror: training with {DIVERGENCES[d]['name']} diverged: " + ", ".join(
                f"seed {s} ({why})" for s, why in sorted(failed[d].items())) + ".", file=sys.stderr)


def write_outputs(out, data, trainings, result, plot, animate, save_samples, settings):
    """The figures (into folder out), the animation and the .npz, all written whole or not at all: their paths."""
    samples, points, figures = dict(zip(trainings, result.samples)), np.asarray(data.points), {}
    if plot:
        figures["mle_fit.png"] = figure_fit(points, result.mle_points, "MLE Gaussian (forward-KL optimum)")
        if len(samples) == 2:
            panels = [("MLE Gaussian", result.mle_points)] + [
                (f"{DIVERGENCES[d]['name']}: {result.rows[2 + i * len(s), 1]:.2f} in the 0.25 mode", s[0])
                for i, (d, s) in enumerate(samples.items())]
            figures["compare.png"] = figure_compare(points, panels, {d: t.metrics.bound for d, t in trainings.items()})
        for d, s in samples.items() if len(samples) == 1 else ():
            figures[f"generated_{d}_kl.png"] = figure_fit(points, s[0], f"GAN trained with {DIVERGENCES[d]['name']}")
    paths = [os.path.join(out, name) for name in figures] + [os.path.join(out, "training.gif")] * animate
    with atomic_outputs() as path:
        for fig, final in zip(figures.values(), paths):
            fig.savefig(path(final), format="png", dpi=100)
        if animate:
            write_animation(path(paths[-1]), data, trainings)
        if save_samples:
            # samples: (seeds, n, 2) in the scaled space; with --compare one array per divergence
            arrays = {f"samples_{d}": s for d, s in samples.items()} if len(samples) == 2 else {
                "samples": next(iter(samples.values()))}
            with open(path(save_samples), "wb") as f:
                np.savez(f, **arrays, divergence=np.array(list(samples)), data_min=float(data.lo),
                         data_max=float(data.hi), **settings)
    return paths + [save_samples] * bool(save_samples)


def main(args, log=print):
    """One run of the script, printing through log: returns its exit status (0, or 1 if training diverged)."""
    started = time.perf_counter()
    divergences = ("forward", "reverse") if args.compare else ("reverse",) if args.reverse else ("forward",)
    data_key, train_key, eval_key = random.split(random.key(args.seed), 3)

    # 1-2. the data and the MLE Gaussian
    data = make_data(data_key)
    threshold = np.quantile(np.asarray(data.log_p), LOW_DENSITY_QUANTILE)      # P's own low-density region
    log(f"data: {len(data.points)} points, scaled by min {float(data.lo):.3f} and max {float(data.hi):.3f}; "
        "MLE Gaussian mean ({:.3f}, {:.3f})".format(*np.asarray(data.mle_mean)))

    # 3-6. training: every seed of each divergence at once
    keys, trainings = seed_keys(train_key, args.seeds), {}
    states = init_states(keys)                     # the same starting point for each divergence
    for d in divergences:
        log(f"training {args.seeds} generator{'s' * (args.seeds > 1)} with {DIVERGENCES[d]['name']} "
            f"({args.objective} objective), {args.steps} steps:")
        step = make_train_step(d, args.objective, args.lr_gen, args.lr_disc, args.noise, args.steps)
        trainings[d] = train_seeds(step, states, data.points, keys, args.steps,
                                   args.batch_size, log, DIVERGENCES[d]["name"])

    # 7. evaluation and the report
    result = jax.device_get(evaluation([t.state.generator[0] for t in trainings.values()], data, threshold,
                                       eval_key))
    failed = {d: failures(trainings[d], s) for d, s in zip(divergences, result.samples)}
    report(result, divergences, args.seeds, failed, log)
    if any(failed.values()):
        log(f"The rows marked DIVERGED above are not results. Try smaller step sizes than --lr-gen "
            f"{args.lr_gen:g} --lr-disc {args.lr_disc:g} (defaults 1e-4 and 5e-4). No figure or .npz was "
            "written.", file=sys.stderr)
        return 1

    # 8. figures and files
    settings = {k: getattr(args, k) for k in ("objective", "steps", "batch_size", "lr_gen", "lr_disc", "noise",
                                              "seed", "seeds")}
    written = write_outputs(args.out, data, trainings, result, not args.no_plot, args.animate,
                            args.save_samples, settings)
    speed = np.mean([t.steps_per_second for t in trainings.values()])      # NaN with one chunk, which compiles
    log(f"\nwritten: {', '.join(written) or 'nothing'}\ntime: {time.perf_counter() - started:.2f} s in all"
        + f"; training alone {speed:,.0f} seed-steps/s" * bool(np.isfinite(speed)))
    return 0


# ---------------------------------------------------------------------------
# Speed-ups, for a run of the script only (main above uses none of them): none
# changes a number (--no-speedups gives the same bits), and each is skipped
# where it does not apply.
# ---------------------------------------------------------------------------


def apply_speedups(num_seeds, cache, plotting):
    """Settings that JAX and XLA read before the first computation, and seaborn's import started early."""
    def config(name, value):          # a JAX option, skipped where this JAX has none of that name
        try:
            jax.config.update(name, value)
        except AttributeError:
            pass
    folder = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "kl-forward-reverse")
    if cache and check_writable(folder, is_dir=True) is None:    # JAX's persistent compilation cache
        config("jax_compilation_cache_dir", folder)
        config("jax_persistent_cache_min_compile_time_secs", 0.0)
        config("jax_persistent_cache_min_entry_size_bytes", 0)
    cpu_only = os.environ.get("JAX_PLATFORMS", "cpu") == "cpu" and not (
        importlib.metadata.entry_points(group="jax_plugins") or importlib.util.find_spec("libtpu"))
    if cpu_only and "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
        # LLVM's -O2 instead of -O3: the training program compiles in 2.6 s instead of 6.0 s (2 cores), runs as
        # fast, and gives the same bits
        os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=2"
    if num_seeds > 1:                 # one CPU device per core, each training its share of the seeds
        config("jax_num_cpu_devices", os.cpu_count() or 1)
    if plotting:                      # seaborn (with pandas and scipy) imports on a thread while JAX trains
        threading.Thread(target=importlib.import_module, args=("seaborn",), daemon=True).start()


def run_as_script(args):
    """main(args), with the speed-ups; then leave without tearing down the interpreter (JAX, pandas, scipy):
    every output is closed by then."""
    if args.no_speedups:
        return main(args)
    apply_speedups(args.seeds, not args.no_cache, not args.no_plot)
    status = main(args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
