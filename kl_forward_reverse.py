"""Forward and reverse KL divergence with a tiny f-GAN, in pure JAX.

A 2-D mixture of two Gaussians P (weights 0.75 and 0.25) is fitted by a
generator Q_theta = G_theta(z), z ~ U[0,1]^10, trained as an f-GAN
(Nowozin et al. 2016, arXiv:1606.00709).  A critic V_omega gives T = g_f(V),
and the two networks play the saddle-point game

    F(theta, omega) = E_P[g_f(V(x))] - E_Q[f*(g_f(V(G(z))))]  <=  D_f(P||Q),

critic up, generator down.  With f(u) = u log u, D_f is forward KL, KL(P||Q),
and Q spreads over both modes (mode-covering); with f(u) = -log u it is reverse
KL, KL(Q||P), and Q sits on one mode (mode-seeking).

The file follows the blog post it reimplements: 1 data, 2 the MLE Gaussian,
3 layers, 4 Adam, 5 divergences, 6 training, 7 evaluation, 8 figures.  Layers
and Adam are written by hand with the old `stax`/`optimizers` interfaces.
`--objective post` reproduces the post's own objective (Sigmoid critic,
generator maximising E_Q[T]), which does not show the effect: see README.md.

    python kl_forward_reverse.py --reverse      # reverse KL: one mode
    python kl_forward_reverse.py                # forward KL: both modes
    python kl_forward_reverse.py --compare      # both, side by side
"""
import argparse
import difflib
import functools
import gc
import math
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

T_START = time.perf_counter()

# ---------------------------------------------------------------------------
# 0. Settings: every flag, its default and its accepted range, in one place.
#    Parsed before JAX is imported so that a bad flag fails in milliseconds.
# ---------------------------------------------------------------------------


def _number(cast, accepted, what):
    """An argparse type: cast the text, and refuse it, naming what is accepted, unless accepted(value)."""
    def parse(text):
        try:
            value = cast(text)
        except ValueError:
            value = None
        if value is None or not accepted(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    return parse


_positive_int = _number(int, lambda v: v >= 1, "a positive integer")
_positive_float = _number(float, lambda v: math.isfinite(v) and v > 0, "a finite positive number")
_seed_int = _number(int, lambda v: 0 <= v < 2**32, "an integer in [0, 2**32)")


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad value is one line, and a misspelt flag gets a suggestion."""

    def error(self, message):
        if message.startswith("argument "):           # a value out of range or of the wrong type
            self.exit(2, f"{self.prog}: error: {message}\n")
        if message.startswith("unrecognized arguments:"):
            flags = [o for a in self._actions for o in a.option_strings if o.startswith("--")]
            hints = [f"{w} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(w, flags, 1)) else w
                     for w in message.split(":", 1)[1].split()]
            message = "unrecognized arguments: " + ", ".join(hints)
        super().error(message)


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's default in --help, except where there is nothing to say (an on/off flag, no default)."""

    def _get_help_string(self, action):
        return action.help if action.default is None or action.default is False else super()._get_help_string(action)


def parse_args(argv=None):
    p = _Parser(prog="kl_forward_reverse.py", allow_abbrev=False,
                description="Forward vs reverse KL with a tiny f-GAN on a 2-D mixture of two Gaussians.",
                formatter_class=_Help)
    what = p.add_mutually_exclusive_group()
    what.add_argument("--reverse", action="store_true",
                      help="train with reverse KL, KL(Q||P), instead of forward KL, KL(P||Q)")
    what.add_argument("--compare", action="store_true",
                      help="train both divergences and draw MLE | forward | reverse side by side")
    p.add_argument("--objective", choices=("saddle", "post"), default="saddle",
                   help="saddle: the f-GAN game; post: the blog post's Sigmoid critic and generator loss")
    p.add_argument("--steps", type=_positive_int, default=40000,
                   help="training steps (>= 1); the post used 7000, too few for forward KL to cover both modes")
    p.add_argument("--batch-size", type=_positive_int, default=64, help="real and generated points per step (>= 1)")
    p.add_argument("--lr-gen", type=_positive_float, default=1e-4, help="generator's Adam step size (> 0)")
    p.add_argument("--lr-disc", type=_positive_float, default=5e-4, help="critic's Adam step size (> 0)")
    p.add_argument("--seed", type=_seed_int, default=0, help="random seed; the same seed gives the same numbers")
    p.add_argument("--seeds", type=_positive_int, default=1,
                   help="independent training runs (seeds) trained at once with vmap (>= 1)")
    p.add_argument("--out", default="out", help="folder for the PNG figures (created if missing)")
    p.add_argument("--no-plot", action="store_true", help="draw no figures")
    p.add_argument("--save-samples", metavar="PATH.npz", default=None,
                   help="write 5000 generated points per seed, the scaling and the settings to this .npz")
    p.add_argument("--no-cache", action="store_true",
                   help="do not use JAX's persistent compilation cache (kept in the user's cache folder)")
    return p.parse_args(argv)


def check_writable(path, is_dir):
    """Refuse, before any training, an output that cannot be written: return an error line or None.

    A missing output folder is created (that is the only thing done before training)."""
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


if __name__ == "__main__":
    # A run lasts seconds, and importing (JAX, pandas, scipy) and tracing make some 300,000 objects that live to its
    # end: Python's cycle collector would walk them all five times, 0.4 - 0.6 s of a second run's 3 s.  Reference
    # counting still frees every object outside a cycle; what cycles there are go with the process.
    gc.disable()
    ARGS = parse_args()
    for _path, _is_dir in ((None if ARGS.no_plot else ARGS.out, True), (ARGS.save_samples, False)):
        if _path is not None and (_error := check_writable(_path, _is_dir)):
            print(f"kl_forward_reverse.py: error: {'--out' if _is_dir else '--save-samples'}: {_error}", file=sys.stderr)
            sys.exit(2)
    # With several seeds, one XLA CPU device per core, so that a 2-core machine trains half the seeds on each
    # (see run_training).  Only the CPU platform reads this flag; set before JAX is imported.
    if ARGS.seeds > 1 and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={os.cpu_count() or 1}").strip()
    # One seed's step is a chain of small kernels, which one thread runs nearly as fast as all cores.  XLA's
    # CPU client sizes its thread pool from NPROC when it is set: one thread leaves the other cores to what
    # runs beside the training (the seaborn import, the evaluation's compile), and one seed trains 10 - 20%
    # faster in the script than when the pool spreads its kernels onto those busy cores.
    if ARGS.seeds == 1:
        os.environ.setdefault("NPROC", "1")

import jax  # noqa: E402  (after the flags, on purpose: see above)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax, random  # noqa: E402
from jax.extend.random import threefry2x32_p  # noqa: E402
from jax.interpreters import mlir  # noqa: E402
from jax.scipy.special import logsumexp  # noqa: E402
from jax.scipy.stats import multivariate_normal  # noqa: E402

T_IMPORTED = time.perf_counter()

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
    """The post's data: num_blocks blocks of int(64 w_k) points from each component, stacked. Shape (64 num_blocks, 2)."""
    keys = random.split(key, len(MIXTURE))
    # x = mu + L eps, eps ~ N(0, I), with L L^T = Sigma: the components' Cholesky factors are constants
    blocks = [np.array(mean) + random.normal(k, (num_blocks, int(BLOCK_SIZE * w), 2)) @ np.linalg.cholesky(cov).T
              for k, (w, mean, cov) in zip(keys, MIXTURE)]
    return jnp.concatenate(blocks, axis=1).reshape(-1, 2)


def scale_to_unit(raw):
    """Min-max scaling by the global min and max over both coordinates, as in the post: x = (raw - lo) / (hi - lo)."""
    lo, hi = jnp.min(raw), jnp.max(raw)
    return (raw - lo) / (hi - lo), lo, hi


def gaussian_log_density(x, mean, cov):
    """log N(x; mu, Sigma) = -(1/2) (x - mu)^T Sigma^-1 (x - mu) - (1/2) log det(2 pi Sigma), for constant mu, Sigma.

    Sigma^-1 and the log-determinant are worked out once, in NumPy: nothing for XLA to factorise."""
    centred = x - np.array(mean)
    precision, (_, log_det) = np.linalg.inv(cov), np.linalg.slogdet(2 * np.pi * np.array(cov))
    return -0.5 * jnp.sum(centred @ precision * centred, axis=-1) - 0.5 * log_det


def component_log_densities(x, lo, hi):
    """log(w_k N(raw; mu_k, Sigma_k)) + 2 log(hi - lo) for each component k, at scaled points x. Shape (..., 2).

    raw = lo + x (hi - lo); the Jacobian of the scaling adds 2 log(hi - lo) in two dimensions."""
    raw = lo + x * (hi - lo)
    return jnp.stack([math.log(w) + gaussian_log_density(raw, mean, cov) for w, mean, cov in MIXTURE],
                     axis=-1) + 2 * jnp.log(hi - lo)


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


@jax.jit
def make_data(key):
    """The scaled data, its scaling (lo, hi), log p at every point, and the MLE Gaussian (mean, cov)."""
    data, lo, hi = scale_to_unit(sample_mixture(key))
    return data, lo, hi, mixture_log_density(data, lo, hi), fit_gaussian_mle(data)


# ---------------------------------------------------------------------------
# 3. Layers, stax-style: each is an (init_fun, apply_fun) pair with
#    init_fun(key, input_shape) -> (output_shape, params) and
#    apply_fun(params, inputs) -> outputs, so code written for
#    the old stax module runs unchanged.
# ---------------------------------------------------------------------------


def glorot_normal(key, shape):
    """Glorot (fan-average) normal weights, truncated at 2 std as in jax.nn.initializers.glorot_normal.

    0.8796... is the std of a standard normal truncated to (-2, 2); dividing by it keeps Var = 2 / (fan_in + fan_out)."""
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


LeakyRelu = elementwise(lambda x: jnp.where(x >= 0, x, 0.01 * x))
Sigmoid = elementwise(jax.nn.sigmoid)     # lax.logistic: no overflow, and a gradient that stays finite


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
generator_init, generator_apply = serial(Dense(2), Sigmoid)                 # G(z), z ~ U[0,1]^10
critic_init, critic_apply = serial(Dense(32), LeakyRelu, Dense(32), LeakyRelu, Dense(1))   # V(x), unbounded;
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
                    conjugate_of_activation=lambda v: jnp.exp(v - 1)),
    "reverse": dict(name="reverse KL, KL(Q||P)",     # -log u
                    activation=lambda v: -jnp.exp(-v),
                    conjugate=lambda t: -1 - jnp.log(-t),
                    conjugate_of_activation=lambda v: v - 1),   # = -1 - log(exp(-v)), without the overflow
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
    """The critic maximises F: loss = -(E_P[g_f(V)] - E_Q[f*(g_f(V))]).

    One pass of the critic over real and generated points together: half as many matrix products, twice
    as tall, which XLA:CPU runs faster (one seed trains 14% faster)."""
    v = critic_apply(critic_params, jnp.concatenate([real, fake]))
    return -f_gan_objective(v[:len(real)], v[len(real):], divergence)


def generator_loss(generator_params, critic_params, noise, divergence):
    """Saddle-point generator loss: minimise -E_Q[f*(g_f(V(G(z))))] (the generator descends F)."""
    return generator_objective(critic_apply(critic_params, generator_apply(generator_params, noise)), divergence)


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
# 6. Training: one step is a pure function of (state, step index, key); the
#    whole loop is one lax.scan, and --seeds N runs N of them at once (vmap).
# ---------------------------------------------------------------------------


def init_state(key):
    """Generator and critic parameters (post's shapes), wrapped in their Adam states (params, m, v).

    Adam's init does not depend on the step size, so any adam(...)[0] does."""
    gen_key, critic_key = random.split(key)
    _, gen_params = generator_init(gen_key, (-1, LATENT_DIM))
    _, critic_params = critic_init(critic_key, (-1, 2))
    adam_init = adam(step_size=None)[0]
    return adam_init(gen_params), adam_init(critic_params)


def threefry2x32(k1, k2, x1, x2):
    """Threefry-2x32, 20 rounds (Salmon et al. 2011), the hash behind jax.random, written out round by round.

    Key words k1, k2 and counter words x1, x2 (uint32 arrays, NumPy or JAX) -> two words of random bits."""
    ks = (k1, k2, k1 ^ k2 ^ np.uint32(0x1BD11BDA))
    x1, x2 = x1 + ks[0], x2 + ks[1]
    for i in range(5):                              # 5 groups of 4 rounds, the key added after each group
        for r in ((13, 15, 26, 6), (17, 29, 16, 24))[i % 2]:
            x1 = x1 + x2
            x2 = x1 ^ ((x2 << np.uint32(r)) | (x2 >> np.uint32(32 - r)))     # x2 rotated left by r bits
        x1, x2 = x1 + ks[(i + 1) % 3], x2 + ks[(i + 2) % 3] + np.uint32(i + 1)
    return x1, x2


def unroll_threefry_on_cpu():
    """Have XLA:CPU run jax.random's hash as the straight-line code above: the same bits, faster.

    JAX 0.10 lowers threefry on the CPU as a 5-iteration loop whose rotation amounts are loop values, so every
    rotation is a variable shift; newer JAX lowers it unrolled on every platform (jax-ml/jax#37872), as this does.
    The hash then takes 8% of a training step instead of about 30%, and training runs 1.3x faster.
    Applies to the whole process, on the CPU only; main calls it."""
    # inline=False: lowered once per shape and called, as JAX does with its own unrolled form; written out at
    # each of the 60-odd draws in a run's programs, it would add 0.1 s of lowering
    mlir.register_lowering(threefry2x32_p, mlir.lower_fun(threefry2x32, multiple_results=True), platform="cpu",
                           inline=False)


def sample_batch(data, i, key, batch_size=64):
    """Step i's batch: batch_size data points, drawn with replacement (as the post's np.random.choice), and
    the generator's uniform noise; from fold_in(key, i) alone, so a step's batch depends on nothing else."""
    data_key, noise_key = random.split(random.fold_in(key, i))
    real = data[random.randint(data_key, (batch_size,), 0, data.shape[0])]
    noise = random.uniform(noise_key, (batch_size, LATENT_DIM))
    return real, noise


def make_train_step(divergence, objective="saddle", lr_gen=1e-4, lr_disc=5e-4):
    """Returns train_step(state, i, (real, noise)) -> (state, (bound, generator_loss)): one critic step, then
    one generator step.  bound is the critic's estimate of the divergence, F at the step's batch."""
    _, gen_update, gen_params_of = adam(lr_gen)
    _, disc_update, disc_params_of = adam(lr_disc)

    def saddle_step(state, i, batch):
        gen_state, disc_state = state
        real, noise = batch
        fake = generator_apply(gen_params_of(gen_state), noise)      # a constant for the critic's step
        d_loss, d_grads = jax.value_and_grad(discriminator_loss)(disc_params_of(disc_state), real, fake, divergence)
        disc_state = disc_update(i, d_grads, disc_state)
        # then the generator, on the same noise, against the updated critic (as in the post)
        g_loss, g_grads = jax.value_and_grad(generator_loss)(
            gen_params_of(gen_state), disc_params_of(disc_state), noise, divergence)
        return (gen_update(i, g_grads, gen_state), disc_state), (-d_loss, g_loss)

    def post_step(state, i, batch):
        """The post's step: two critic updates (data, y=1; generated, y=0) sharing the index i, then the generator."""
        gen_state, disc_state = state
        real, noise = batch
        fake = generator_apply(gen_params_of(gen_state), noise)
        ones, zeros = jnp.ones((real.shape[0], 1)), jnp.zeros((real.shape[0], 1))

        def critic_loss(params, x, y):
            return post_loss(post_critic_apply(params, x), y, divergence)

        real_loss, grads = jax.value_and_grad(critic_loss)(disc_params_of(disc_state), real, ones)
        disc_state = disc_update(i, grads, disc_state)
        fake_loss, grads = jax.value_and_grad(critic_loss)(disc_params_of(disc_state), fake, zeros)
        disc_state = disc_update(i, grads, disc_state)

        def post_generator_loss(params):
            return post_loss(post_critic_apply(disc_params_of(disc_state), generator_apply(params, noise)), ones,
                             divergence)
        g_loss, g_grads = jax.value_and_grad(post_generator_loss)(gen_params_of(gen_state))
        return (gen_update(i, g_grads, gen_state), disc_state), (-(real_loss + fake_loss), g_loss)

    return saddle_step if objective == "saddle" else post_step


def train(train_step, state, data, key, first_step, num_steps, batch_size=64):
    """num_steps steps from first_step, fused into one lax.scan. Returns (state, (bound, generator_loss) per step).

    Step i trains on sample_batch(data, i, key), as a plain Python loop of train_step would."""
    def step(state, i):
        return train_step(state, i, sample_batch(data, i, key, batch_size))
    return lax.scan(step, state, first_step + jnp.arange(num_steps))


@jax.jit
def init_states(keys):
    """init_state for each key: the seeds are the leading axis."""
    return jax.vmap(init_state)(keys)


def generator_params(state):
    """state = (generator's Adam state (params, m, v), critic's Adam state)."""
    return state[0][0]


def chunk_lengths(steps, max_chunks=4):
    """Split training into a few equal compiled chunks, so progress can be printed between them (one compile)."""
    n = next(c for c in range(min(max_chunks, steps), 0, -1) if steps % c == 0)
    return [steps // n] * n


def first_nonfinite_step(history):
    """Index of the first step whose losses are not finite, per seed, or -1. history: (seeds, steps, 2)."""
    bad = ~np.all(np.isfinite(history), axis=-1)
    return np.where(bad.any(axis=1), bad.argmax(axis=1), -1)


def seed_keys(key, num_seeds):
    """Independent keys, one per seed; fold_in keeps seed i's key the same whatever num_seeds is."""
    return jax.vmap(lambda i: random.fold_in(key, i))(jnp.arange(num_seeds))


# Compiling is most of a first run, so how XLA:CPU compiles matters (measured with one seed; level 2 and
# the switched-off pass give the same numbers to the bit as XLA's defaults).  The programs that run once
# (data and initialisation, evaluation) compile in half the time with XLA's older fusion code generator and
# run as fast; the training loop runs twice as fast with the newer one, and 3 - 7% faster at optimisation
# level 2 than at the default 3.  XLA's loop-invariant code motion would lift randint's range (the 640,000
# data points) out of the training loop, where it is no longer a constant, so that every drawn index costs
# three hardware divisions; left in the loop it stays a constant, which LLVM divides by with a
# multiplication: with the pass off, one seed trains 20% faster, 16 seeds 25 - 30%.  Other backends (a GPU)
# compile with their defaults.
TRAINING_COMPILE = {"xla_backend_optimization_level": 2, "xla_disable_hlo_passes": "while-loop-invariant-code-motion"}
RUN_ONCE_COMPILE = {"xla_backend_optimization_level": 2, "xla_cpu_use_fusion_emitters": False}


def compile_program(jitted_or_traced, *args, options=RUN_ONCE_COMPILE):
    """Compile a jitted function for args (arrays or jax.ShapeDtypeStruct), or one already traced (no args)."""
    traced = jitted_or_traced.trace(*args) if args else jitted_or_traced
    return traced.lower().compile(compiler_options=options if jax.default_backend() == "cpu" else None)


def training_chunk(divergence, args):
    """chunk(state, keys, data, first_step) -> (state, (bound, generator_loss)), jitted: the next
    chunk_lengths(args.steps)[0] steps of every seed.  Seeds are the leading axis of state, keys and results.

    One seed is trained without vmap: XLA:CPU runs a batch of one matrix product at half the speed of the
    plain product.  Several seeds are split over the devices (each CPU core, when run as a script), each
    device running vmap on its share; the seeds are independent, so the devices never communicate."""
    devices = jax.devices()
    num_devices = max(n for n in range(1, len(devices) + 1) if args.seeds % n == 0)
    step = make_train_step(divergence, args.objective, args.lr_gen, args.lr_disc)
    train_chunk = functools.partial(train, step, num_steps=chunk_lengths(args.steps)[0], batch_size=args.batch_size)

    def chunk(state, keys, data, first_step):
        if args.seeds > 1:
            return jax.vmap(train_chunk, in_axes=(0, None, 0, None))(state, data, keys, first_step)
        state, history = train_chunk(jax.tree.map(lambda a: a[0], state), data, keys[0], first_step)
        return jax.tree.map(lambda a: a[None], (state, history))       # put the seed axis back

    if num_devices == 1:
        return jax.jit(chunk)
    mesh = jax.sharding.Mesh(np.array(devices[:num_devices]), ("seeds",))
    by_seed, whole = jax.sharding.PartitionSpec("seeds"), jax.sharding.PartitionSpec()
    chunk = jax.shard_map(chunk, mesh=mesh, in_specs=(by_seed, by_seed, whole, whole), out_specs=by_seed)
    by_seed, whole = jax.sharding.NamedSharding(mesh, by_seed), jax.sharding.NamedSharding(mesh, whole)
    return jax.jit(chunk, in_shardings=(by_seed, by_seed, whole, whole), out_shardings=by_seed)


def run_training(data, divergence, args, keys, state, chunk=None, log=print):
    """Train args.seeds generators at once from state (init_states(keys)), printing progress between chunks.
    chunk: training_chunk(divergence, args), compiled or not.  Returns (final states, history (seeds, steps, 2),
    seconds spent training)."""
    chunk = chunk or compile_program(training_chunk(divergence, args), state, keys, data, 0, options=TRAINING_COMPILE)
    # The inputs go to the devices that train them once, before the first chunk (not again at every call), and
    # through the host: a copy, where JAX would first compile a program to move each of the state's arrays from
    # device to device (0.3 s with 16 seeds on 2 devices).
    state, keys, data = jax.device_put(jax.device_get((state, keys, data)), chunk.input_shardings[0][:3])
    lengths = chunk_lengths(args.steps)
    histories, done, train_s = [], 0, 0.0
    for length in lengths:
        t0 = time.perf_counter()
        state, (bound, g_loss) = chunk(state, keys, data, done)
        histories.append(np.stack([np.asarray(bound), np.asarray(g_loss)], axis=-1))     # waits for the chunk
        train_s += time.perf_counter() - t0
        done += length
        recent = histories[-1][:, -max(1, length // 10):, 0].mean(axis=1)        # smooth the per-batch bound
        spread = "" if args.seeds == 1 else f"  (seeds: {np.nanmin(recent):.3f} to {np.nanmax(recent):.3f})"
        log(f"  step {done:>7}/{args.steps}  critic's estimate of {DIVERGENCES[divergence]['name']}: "
            f"{np.nanmedian(recent) if np.isfinite(recent).any() else float('nan'):.3f}{spread}")
        if (first_nonfinite_step(histories[-1]) >= 0).all():
            break                                    # every seed has blown up: the rest would be NaN too
    return jax.device_put(state, jax.devices()[0]), np.concatenate(histories, axis=1), train_s


@functools.partial(jax.jit, static_argnums=1)
def start(seed, num_seeds):
    """Everything a run starts from, from the one --seed, in one compiled call: the data (make_data), the
    training keys of num_seeds seeds and their initial states, and the evaluation's key."""
    data_key, train_key, eval_key = random.split(random.key(seed), 3)
    keys = seed_keys(train_key, num_seeds)
    return make_data(data_key), keys, init_states(keys), eval_key


# ---------------------------------------------------------------------------
# 7. Evaluation: mode shares, P's low-density region, and KL both ways, with
#    P's exact density and Q's from a Gaussian kernel density estimate.
# ---------------------------------------------------------------------------

PLOT_POINTS = 1000        # points in each kdeplot, as in the post
NUM_SAMPLES = 5000        # generated points per seed: saved, and the kernel estimate's data
NUM_EVAL = 2000           # fresh points of P and of Q at which the KLs are averaged
LOW_DENSITY_QUANTILE = 0.02


def generate(gen_params, key, n=NUM_SAMPLES):
    return generator_apply(gen_params, random.uniform(key, (n, LATENT_DIM)))


def kde_log_density(x, samples):
    """log q(x) for the Gaussian kernel density estimate on samples (n, 2), Scott's bandwidth n^(-1/6).

    The same estimate as jax.scipy.stats.gaussian_kde(samples.T).logpdf(x.T), computed through a matrix
    of whitened squared distances and logsumexp: stable far from every sample, and fast."""
    n, d = samples.shape
    cov = jnp.cov(samples.T) * n ** (-2.0 / (d + 4))
    chol = jnp.linalg.cholesky(cov)
    white_x = jax.scipy.linalg.solve_triangular(chol, x.T, lower=True).T
    white_s = jax.scipy.linalg.solve_triangular(chol, samples.T, lower=True).T
    sq_dist = (jnp.sum(white_x ** 2, 1)[:, None] + jnp.sum(white_s ** 2, 1)[None, :] - 2 * white_x @ white_s.T)
    log_norm = jnp.log(n) + jnp.sum(jnp.log(jnp.diag(chol))) + 0.5 * d * jnp.log(2 * jnp.pi)
    return logsumexp(-0.5 * jnp.maximum(sq_dist, 0.0), axis=1) - log_norm


def evaluate(q_samples, q_fresh, real, lo, hi, threshold):
    """Share of q_samples in each mode and below P's low-density threshold; KL(P||Q) and KL(Q||P).

    Q's log-density is the kernel estimate on q_samples; KL(P||Q) = E_P[log p - log q] is averaged at
    the real points, KL(Q||P) = E_Q[log q - log p] at q_fresh, points the estimate has not seen."""
    comps = component_log_densities(q_samples, lo, hi)
    in_small_mode = jnp.mean(jnp.argmax(comps, axis=-1) == SMALL_MODE)
    low_density = jnp.mean(logsumexp(comps, axis=-1) < threshold)
    kl_pq = jnp.mean(mixture_log_density(real, lo, hi) - kde_log_density(real, q_samples))
    kl_qp = jnp.mean(kde_log_density(q_fresh, q_samples) - mixture_log_density(q_fresh, lo, hi))
    return jnp.stack([1 - in_small_mode, in_small_mode, low_density, kl_pq, kl_qp])


def fit_gaussian_reverse_kl(init_mean, init_cov, key, lo, hi, steps=1000, num_eps=1024):
    """The single Gaussian minimising KL(Q||P) = E_Q[log q - log p], by reparameterised gradient descent.

    x = mu + L eps, L lower-triangular with a log-diagonal, eps ~ N(0, I) drawn once; E_Q[log q] = -H(Q)
    = -sum log L_ii - log(2 pi e) in closed form.  Returns (mean, cov, KL(Q||P))."""
    eps = random.normal(key, (num_eps, 2))

    def unpack(params):
        mean, log_diag, off = params
        return mean, jnp.array([[jnp.exp(log_diag[0]), 0.0], [off, jnp.exp(log_diag[1])]])

    def reverse_kl(params):
        mean, L = unpack(params)
        log_q = -jnp.sum(jnp.log(jnp.diag(L))) - jnp.log(2 * jnp.pi * jnp.e)
        return log_q - jnp.mean(mixture_log_density(mean + eps @ L.T, lo, hi))

    L = jnp.linalg.cholesky(init_cov)
    opt_init, opt_update, get_params = adam(1e-2)
    state = opt_init((init_mean, jnp.log(jnp.diag(L)), L[1, 0]))
    state = lax.fori_loop(0, steps, lambda i, s: opt_update(i, jax.grad(reverse_kl)(get_params(s)), s), state)
    mean, L = unpack(get_params(state))
    return mean, L @ L.T, reverse_kl(get_params(state))


def exact_gaussian_kls(mean, cov, real, key, lo, hi, n=NUM_EVAL):
    """KL(P||N) and KL(N||P) for a Gaussian N with its exact density (Monte Carlo at P's and N's points)."""
    x = sample_gaussian(key, mean, cov, n)
    return jnp.stack([jnp.mean(mixture_log_density(real, lo, hi) - multivariate_normal.logpdf(real, mean, cov)),
                      jnp.mean(multivariate_normal.logpdf(x, mean, cov) - mixture_log_density(x, lo, hi))])


def mixture_component_moments(lo, hi):
    """Each component's mean and covariance in the scaled coordinates, stacked: (2, 2), (2, 2, 2)."""
    scale = hi - lo
    return (jnp.stack([(jnp.array(m) - lo) / scale for _, m, _ in MIXTURE]),
            jnp.stack([jnp.array(c) / scale ** 2 for _, _, c in MIXTURE]))


@jax.jit
def evaluation(gen_params, data, lo, hi, threshold, mle, key):
    """Everything printed at the end, in one compiled call.

    gen_params: a list of stacked generator params (one entry per divergence trained, leading axis = seeds);
    mle: the MLE Gaussian (mean, cov) from make_data.
    Returns the best Gaussians under each divergence, their KLs with exact densities, the evaluate()
    row of each Gaussian and each generator (Gaussians first), and the generators' samples."""
    sample_key, fresh_key, real_key, fit_key, exact_key = random.split(key, 5)
    real = data[random.randint(real_key, (NUM_EVAL,), 0, data.shape[0])]
    mle_mean, mle_cov = mle
    # reverse KL has a local optimum on each mode: start on the MLE and on each component, keep the best
    comp_means, comp_covs = mixture_component_moments(lo, hi)
    means, covs, kls = jax.vmap(fit_gaussian_reverse_kl, in_axes=(0, 0, None, None, None))(
        jnp.concatenate([mle_mean[None], comp_means]), jnp.concatenate([mle_cov[None], comp_covs]), fit_key, lo, hi)
    best = jnp.argmin(jnp.where(jnp.isfinite(kls), kls, jnp.inf))
    gauss_means, gauss_covs = jnp.stack([mle_mean, means[best]]), jnp.stack([mle_cov, covs[best]])
    exact = jax.vmap(exact_gaussian_kls, in_axes=(0, 0, None, None, None, None))(
        gauss_means, gauss_covs, real, exact_key, lo, hi)
    draw = jax.vmap(sample_gaussian, in_axes=(None, 0, 0, None))
    samples = [jax.vmap(generate, in_axes=(0, None, None))(p, sample_key, NUM_SAMPLES) for p in gen_params]
    fresh = [jax.vmap(generate, in_axes=(0, None, None))(p, fresh_key, NUM_EVAL) for p in gen_params]
    rows = jax.lax.map(lambda qs: evaluate(qs[0], qs[1], real, lo, hi, threshold),
                       (jnp.concatenate([draw(sample_key, gauss_means, gauss_covs, NUM_SAMPLES)] + samples),
                        jnp.concatenate([draw(fresh_key, gauss_means, gauss_covs, NUM_EVAL)] + fresh)))
    return (gauss_means, gauss_covs), exact, rows, samples, sample_gaussian(fresh_key, mle_mean, mle_cov, PLOT_POINTS)


EVAL_COLUMNS = ("0.75 mode", "0.25 mode", "low-density", "KL(P||Q)", "KL(Q||P)")


def format_table(rows):
    """rows: [(label, values)] -> aligned text."""
    width = max(len(label) for label, _ in rows)
    lines = [" " * width + "".join(f"{c:>13}" for c in EVAL_COLUMNS)]
    for label, values in rows:
        lines.append(f"{label:<{width}}" + "".join(f"{v:>13.3f}" for v in values))
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# 8. Figures: the post's kdeplots, ground truth in Reds and generated points
#    in Blues.  Drawn headless (Agg), without pyplot's global state.
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
                       mpatches.Patch(color=sns.color_palette("Blues")[2], label="Generated data")],
              loc="upper left")


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
    ax = axes[3]
    for (divergence, history), colour in zip(bounds.items(), ("tab:blue", "tab:red")):
        window = max(1, history.shape[1] // 200)
        smooth = history[:, :history.shape[1] // window * window].reshape(history.shape[0], -1, window).mean(-1)
        steps = (np.arange(smooth.shape[1]) + 0.5) * window
        for s, curve in enumerate(smooth):
            ax.plot(steps, curve, color=colour, lw=1.6 if s == 0 else 0.6, alpha=1 if s == 0 else 0.35,
                    label=DIVERGENCES[divergence]["name"] if s == 0 else None)
    ax.set_xlabel("training step")
    ax.set_ylabel("critic's estimate (nats)")
    ax.set_title("E_P[T] - E_Q[f*(T)], the f-GAN lower bound" + (f" ({len(smooth)} seeds)" if len(smooth) > 1 else ""),
                 fontsize=11)
    ax.set_ylim(bottom=min(0, ax.get_ylim()[0]))
    ax.legend(loc="lower right")
    return fig


# ---------------------------------------------------------------------------
# Files are written whole or not at all: to a temporary name in the same
# folder, renamed into place only when every output of the run is complete.
# ---------------------------------------------------------------------------


class AtomicOutputs:
    """with AtomicOutputs() as out: out.path(final) gives a temporary path; all are renamed on success, removed otherwise."""

    def __enter__(self):
        self.pending = []
        return self

    def path(self, final):
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(final) or ".", prefix="." + os.path.basename(final) + ".",
                                   suffix=".tmp")
        os.close(fd)
        self.pending.append((tmp, final))
        return tmp

    def __exit__(self, exc_type, exc, tb):
        umask = os.umask(0)
        os.umask(umask)
        for tmp, final in self.pending:
            if exc_type is None:
                os.chmod(tmp, 0o666 & ~umask)          # mkstemp makes 0600 files; outputs get the usual mode
                os.replace(tmp, final)
            elif os.path.exists(tmp):
                os.remove(tmp)
        return False


# ---------------------------------------------------------------------------
# The run: what `python kl_forward_reverse.py` does, phase by phase, timed.
# ---------------------------------------------------------------------------


class Timer:
    """Seconds per phase; JAX's compile events are counted apart, wherever they happen."""

    def __init__(self):
        self.phases, self.compile_s, self.last = {}, 0.0, time.perf_counter()
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event, seconds, **kwargs):
        if event in ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                     "/jax/core/compile/backend_compile_duration"):
            self.compile_s += seconds

    def lap(self, phase):
        now = time.perf_counter()
        self.phases[phase] = self.phases.get(phase, 0.0) + now - self.last
        self.last = now


def enable_compilation_cache():
    """JAX's persistent compilation cache in the user's cache folder; a folder that cannot be used is skipped."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    path = os.path.join(root, "kl-forward-reverse", "jax")
    if check_writable(path, is_dir=True) is not None:
        print(f"note: compilation cache {path} is not writable; compiling afresh")
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


def start_plotting_imports():
    """Import seaborn (with pandas and scipy: a second of Python) on a thread: it runs while JAX trains."""
    import threading
    import matplotlib
    matplotlib.use("Agg")
    thread = threading.Thread(target=__import__, args=("seaborn",), daemon=True)
    thread.start()
    return thread


def main(args):
    timer = Timer()
    unroll_threefry_on_cpu()
    cache = None if args.no_cache else enable_compilation_cache()
    divergences = ("forward", "reverse") if args.compare else ("reverse",) if args.reverse else ("forward",)
    # A first run is mostly compiling.  The training chunk and the evaluation compile on a background thread
    # (chunk first: it is needed first) from the shapes of their inputs, while this thread compiles and runs
    # start: XLA lets go of the GIL while it compiles, so the compiles run side by side on two cores.
    start_traced = start.trace(args.seed, args.seeds)
    (data_shape, lo_shape, _, _, mle_shape), keys_shape, state_shape, eval_key_shape = start_traced.out_info
    compiler = ThreadPoolExecutor(max_workers=1)
    chunks = {d: compiler.submit(compile_program, training_chunk(d, args), state_shape, keys_shape, data_shape, 0,
                                 options=TRAINING_COMPILE) for d in divergences}
    evaluation_compiled = compiler.submit(compile_program, evaluation, [generator_params(state_shape)] * len(divergences),
                                          data_shape, lo_shape, lo_shape, lo_shape, mle_shape, eval_key_shape)
    compiler.shutdown(wait=False)
    (data, lo, hi, log_p_data, (mle_mean, mle_cov)), keys, state, eval_key = (
        compile_program(start_traced)(args.seed))
    plotting = None if args.no_plot else start_plotting_imports()

    # 1-2. data and the MLE Gaussian
    threshold = float(np.quantile(np.asarray(log_p_data), LOW_DENSITY_QUANTILE))   # host sort: no XLA sort to compile
    print(f"data: {data.shape[0]} points, scaled by min {float(lo):.3f} and max {float(hi):.3f}; "
          "MLE Gaussian mean ({:.3f}, {:.3f})".format(*np.asarray(mle_mean)))
    timer.lap("data")

    # 3-6. training
    results, failed = {}, {}
    for divergence in divergences:
        print(f"training {args.seeds} generator{'s' if args.seeds > 1 else ''} with "
              f"{DIVERGENCES[divergence]['name']} ({args.objective} objective), {args.steps} steps:")
        results[divergence] = run_training(data, divergence, args, keys, state, chunks[divergence].result())
        failed[divergence] = {s: f"first non-finite loss at step {b}"
                              for s, b in enumerate(first_nonfinite_step(results[divergence][1])) if b >= 0}
    timer.lap("train")

    # 7. evaluation, the best single Gaussians beside the trained generators
    (gauss_means, _), exact, table, samples, mle_points = jax.device_get(evaluation_compiled.result()(
        [generator_params(results[d][0]) for d in divergences], data, lo, hi, np.float32(threshold),
        (mle_mean, mle_cov), eval_key))                          # NumPy from here on: nothing more to compile
    samples = dict(zip(divergences, samples))
    for divergence in divergences:      # a saturated Sigmoid puts every point in one place: finite, but no result
        spread = samples[divergence].std(axis=1).min(axis=-1)
        for s in np.flatnonzero(spread < 1e-5):
            failed[divergence].setdefault(int(s), "the generator collapsed to a single point")
    failed = {d: f for d, f in failed.items() if f}
    timer.lap("evaluation")

    labels = ["forward-KL Gaussian (MLE)", "reverse-KL Gaussian"]
    for divergence in divergences:
        for s in range(args.seeds):
            diverged = s in failed.get(divergence, {})
            labels.append(f"{divergence} KL" + (f", seed {s}" if args.seeds > 1 else "") + (" DIVERGED" if diverged else ""))
    print(f"\nevaluation: shares of {NUM_SAMPLES} generated points per row (0.25 mode: the small one; "
          f"low-density: where log p is below P's own {LOW_DENSITY_QUANTILE:.0%} quantile);\n"
          f"KL in nats with P's exact density and Q's Gaussian kernel estimate")
    print(format_table(list(zip(labels, table))))
    print(f"(with their exact densities the Gaussians give KL(P||Q) {exact[0, 0]:.3f} (MLE) and KL(Q||P) "
          f"{exact[1, 1]:.3f} (reverse fit, mean ({gauss_means[1, 0]:.3f}, {gauss_means[1, 1]:.3f})): "
          f"the kernel estimate adds its own bias)")
    if args.seeds > 1:
        for i, divergence in enumerate(divergences):
            block = table[2 + i * args.seeds:2 + (i + 1) * args.seeds]
            print(f"{DIVERGENCES[divergence]['name']} over {args.seeds} seeds: 0.25-mode share "
                  f"{np.nanmin(block[:, 1]):.3f}-{np.nanmax(block[:, 1]):.3f}, low-density share "
                  f"{np.nanmin(block[:, 2]):.3f}-{np.nanmax(block[:, 2]):.3f}")

    if failed:
        for divergence, reasons in failed.items():
            seeds = [f"seed {s} ({why})" for s, why in sorted(reasons.items())]
            print(f"\nerror: training with {DIVERGENCES[divergence]['name']} diverged: {', '.join(seeds)}.",
                  file=sys.stderr)
        print(f"The rows marked DIVERGED above are not results. Try smaller step sizes than --lr-gen {args.lr_gen:g} "
              f"--lr-disc {args.lr_disc:g} (defaults 1e-4 and 5e-4). No figure or .npz was written.", file=sys.stderr)
        return 1

    # 8. figures, and the samples; written whole or not at all
    with AtomicOutputs() as out:
        if not args.no_plot:
            plotting.join()
            data = np.asarray(data)              # on the CPU, a view: NumPy slicing, nothing to compile
            figures = {"mle_fit.png": figure_fit(data, mle_points, "MLE Gaussian (forward-KL optimum)")}
            if args.compare:
                panels = [("MLE Gaussian", mle_points)] + [
                    (f"{DIVERGENCES[d]['name']}: {table[2 + i * args.seeds, 1]:.2f} in the 0.25 mode",
                     samples[d][0]) for i, d in enumerate(divergences)]
                figures["compare.png"] = figure_compare(data, panels, {d: results[d][1][..., 0] for d in divergences})
            else:
                d = divergences[0]
                figures[f"generated_{d}_kl.png"] = figure_fit(
                    data, samples[d][0], f"GAN trained with {DIVERGENCES[d]['name']}")
            for name, fig in figures.items():
                fig.savefig(out.path(os.path.join(args.out, name)), format="png", dpi=100)
        if args.save_samples:
            with open(out.path(args.save_samples), "wb") as f:
                # samples: (seeds, n, 2) in the scaled space; with --compare one array per divergence
                arrays = ({f"samples_{d}": samples[d] for d in divergences} if args.compare
                          else {"samples": samples[divergences[0]]})
                np.savez(f, **arrays, divergence=np.array(divergences), data_min=float(lo), data_max=float(hi),
                         objective=args.objective, steps=args.steps, batch_size=args.batch_size,
                         lr_gen=args.lr_gen, lr_disc=args.lr_disc, seed=args.seed, seeds=args.seeds)
    timer.lap("figures" if not args.no_plot else "output")
    if not args.no_plot:
        print(f"\nfigures: {', '.join(os.path.join(args.out, n) for n in figures)}")
    if args.save_samples:
        print(f"samples: {args.save_samples}")

    train_s = sum(r[2] for r in results.values())
    seed_steps = args.seeds * args.steps * len(divergences)
    phases = " | ".join(f"{k} {v:.2f} s" for k, v in timer.phases.items())
    print(f"\ntime: import {T_IMPORTED - T_START:.2f} s | {phases} | total {time.perf_counter() - T_START:.2f} s")
    print(f"      of which compiling {timer.compile_s:.2f} s (cache: {cache or 'off'}); training alone "
          f"{train_s:.2f} s, {seed_steps / train_s:,.0f} seed-steps/s")
    return 0


if __name__ == "__main__":
    import signal
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))   # run the clean-up, as Ctrl-C does
    try:
        status = main(ARGS)
    except KeyboardInterrupt:
        sys.exit("interrupted: no partial figure or .npz was left behind")
    # Every output is written and closed.  Tearing the interpreter down (JAX's runtime, pandas, scipy) would
    # take another half second and leave nothing different behind, so leave now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
