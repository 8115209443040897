"""Forward and reverse KL divergence with a tiny f-GAN, in pure JAX.

A 2-D mixture of two Gaussians P (weights 0.75 and 0.25) is fitted by a generator Q = G(z), z ~ U[0,1]^10,
trained as an f-GAN (Nowozin et al. 2016, arXiv:1606.00709): a critic V gives T = g_f(V), and the two play

    F(theta, omega) = E_P[g_f(V(x))] - E_Q[f*(g_f(V(G(z))))]  <=  D_f(P||Q),

the critic up, the generator down.  With f(u) = u log u, D_f is forward KL, KL(P||Q), and Q spreads over both
modes (mode-covering); with f(u) = -log u it is reverse KL, KL(Q||P), and Q sits on one mode (mode-seeking).

Sections follow the blog post it reimplements: 0 settings, 1 data, 2 the MLE Gaussian, 3 layers, 4 Adam,
5 divergences, 6 training, 7 evaluation, 8 figures, 9 the run.

    python kl_forward_reverse.py --reverse      # reverse KL: one mode
    python kl_forward_reverse.py --compare      # forward and reverse, side by side
"""
import argparse
import contextlib
import functools
import math
import os
import signal
import sys
import tempfile
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax, random
from jax.sharding import NamedSharding, PartitionSpec
from jax.scipy.special import logsumexp
from jax.scipy.stats import multivariate_normal

# ---------------------------------------------------------------------------
# 0. Settings: every flag, its default and what it accepts.
# ---------------------------------------------------------------------------


def checked(cast, accepts, what):
    """An argparse type: cast(text) if accepts(value), else an error that names what the flag accepts."""
    def parse(text):
        try:
            value = cast(text)
        except ValueError:
            value = None
        if value is None or not accepts(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    return parse


# The defaults of each objective: the f-GAN game's, and the post's own settings.
DEFAULTS = {"saddle": dict(steps=10000, batch_size=128, lr_gen=6e-4, lr_disc=5e-3, noise=0.03),
            "post": dict(steps=7000, batch_size=64, lr_gen=1e-4, lr_disc=5e-4, noise=0.0)}


def parse_args(argv=None):
    """The flags, checked: a bad one is one line on stderr and exit status 2."""
    count = checked(int, lambda v: v >= 1, "an integer >= 1")
    both = {k: f"{v}; post: {DEFAULTS['post'][k]}" for k, v in DEFAULTS["saddle"].items()}     # the defaults, for help
    rate = checked(float, lambda v: 0 < v < math.inf, "a finite number > 0")
    p = argparse.ArgumentParser(prog="kl_forward_reverse.py", allow_abbrev=False,
                                description="Forward vs reverse KL (and other f-divergences) with a tiny f-GAN.")
    p.error = lambda message: p.exit(2, f"{p.prog}: error: {message}\n")      # one line, no usage
    what = p.add_mutually_exclusive_group()
    what.add_argument("--reverse", action="store_true", help="train with reverse KL, KL(Q||P); the default is forward")
    what.add_argument("--divergence", choices=list(DIVERGENCES), default="forward", help="train with this divergence")
    what.add_argument("--compare", nargs="*", choices=list(DIVERGENCES), metavar="NAME",
                      help="train each NAME, any of --divergence's (default: forward reverse), side by side")
    p.add_argument("--objective", choices=DEFAULTS, default="saddle",
                   help="saddle: the f-GAN game (default); post: the blog post's objective, at its settings")
    p.add_argument("--steps", type=checked(int, lambda v: v > 0 and v % 100 == 0, "a positive multiple of 100"),
                   help=f"training steps ({both['steps']})")
    p.add_argument("--batch-size", type=count, help=f"data points and generated points per step ({both['batch_size']})")
    p.add_argument("--lr-gen", type=rate, help=f"the generator's Adam step size, falling to 0 ({both['lr_gen']}, flat)")
    p.add_argument("--lr-disc", type=rate, help=f"the critic's Adam step size, falling to 0 ({both['lr_disc']}, flat)")
    p.add_argument("--noise", type=checked(float, lambda v: 0 <= v < math.inf, "a finite number >= 0"),
                   help=f"instance noise: its std at step 0, falling to 0 by the last step ({both['noise']})")
    p.add_argument("--seed", type=checked(int, lambda v: 0 <= v < 2**32, "an integer in [0, 2**32)"), default=0,
                   help="random seed (0): the same seed and flags give the same numbers")
    p.add_argument("--seeds", type=count, default=1, help="independent runs, trained at once (1)")
    p.add_argument("--out", default="out", help="folder for the figures, created if missing (out)")
    p.add_argument("--no-plot", action="store_true", help="draw no PNG figures")
    p.add_argument("--animate", action="store_true", help="also write training.gif: seed 0 as it trains")
    p.add_argument("--save-samples", metavar="PATH.npz",
                   help="write 5000 points per seed, the generators' W and b, and the settings, here")
    args = p.parse_args(argv)
    for name, value in DEFAULTS[args.objective].items():
        setattr(args, name, value if getattr(args, name) is None else getattr(args, name))
    args.divergences = (args.compare or ["forward", "reverse"] if args.compare is not None
                        else ["reverse"] if args.reverse else [args.divergence])
    if args.objective == "post" and not set(args.divergences) <= {"forward", "reverse"}:
        p.error("argument --objective: the post's objective exists for forward and reverse KL only")
    if args.objective == "post" and args.animate:
        p.error("argument --animate: it shades the saddle game's critic; not with --objective post")
    for flag, path, is_dir in [("--out", args.out, True)] * (args.animate or not args.no_plot) + [
            ("--save-samples", args.save_samples, False)] * bool(args.save_samples):
        if error := unwritable(path, is_dir):
            p.error(f"argument {flag}: {error}")
    return args


def unwritable(path, is_dir):
    """Why path (a folder, created if missing, or a file in one) cannot be written; None if it can."""
    folder = path if is_dir else (os.path.dirname(path) or ".")
    if not is_dir and os.path.isdir(path):
        return f"{path} is a folder; expected a file name such as samples.npz"
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):        # the one test that is right for root too
            pass
    except OSError as e:
        return f"cannot write to {folder}: {e.strerror or e}"
    return None


# ---------------------------------------------------------------------------
# 1. Data: the post's mixture, in its 64-point blocks, scaled to [0, 1].
# ---------------------------------------------------------------------------

#            weight   mean        covariance
MIXTURE = ((0.75, (0.5, 2.0), ((4.0, 0.0), (0.0, 1.5))),
           (0.25, (9.0, 9.0), ((1.0, 0.0), (0.0, 3.0))))
BLOCK_SIZE, NUM_BLOCKS = 64, 10000      # the post drew 48 points of the 0.75 mode, then 16 of the 0.25, 10000 times
SMALL_MODE = 1                          # index of the 0.25 component


def sample_mixture(key, num_blocks=NUM_BLOCKS):
    """The post's data: num_blocks blocks of int(64 w_k) points of each component k, x = mu + L eps (L L^T = Sigma)."""
    blocks = [jnp.array(mean) + random.normal(k, (num_blocks, int(BLOCK_SIZE * w), 2)) @ np.linalg.cholesky(cov).T
              for k, (w, mean, cov) in zip(random.split(key, len(MIXTURE)), MIXTURE)]
    return jnp.concatenate(blocks, axis=1).reshape(-1, 2)


def component_log_densities(x, lo, hi):
    """log(w_k N(raw; mu_k, Sigma_k)) + 2 log(hi - lo) at scaled points x, raw = lo + x (hi - lo). Shape (..., 2)."""
    raw = lo + x * (hi - lo)          # the scaling's Jacobian adds 2 log(hi - lo) in two dimensions
    return jnp.stack([math.log(w) + multivariate_normal.logpdf(raw, jnp.array(mean), jnp.array(cov))
                      for w, mean, cov in MIXTURE], axis=-1) + 2 * jnp.log(hi - lo)


def mixture_log_density(x, lo, hi):
    """log p(x), P's exact log-density in the scaled coordinates."""
    return logsumexp(component_log_densities(x, lo, hi), axis=-1)


# ---------------------------------------------------------------------------
# 2. The MLE Gaussian: the best single Gaussian under forward KL (moment matching).
# ---------------------------------------------------------------------------


def fit_gaussian_mle(x):
    """mu = (1/N) sum_n x_n,  Sigma = (1/N) sum_n (x_n - mu)(x_n - mu)^T."""
    mean = jnp.mean(x, axis=0)
    return mean, (x - mean).T @ (x - mean) / len(x)


class Data(NamedTuple):
    points: jax.Array       # (640000, 2), min-max scaled to [0, 1] over both coordinates, as in the post
    lo: jax.Array           # raw = lo + points (hi - lo)
    hi: jax.Array
    mle_mean: jax.Array
    mle_cov: jax.Array
    low_density: jax.Array  # log p at P's own 2% quantile: below it is P's low-density region


@jax.jit
def make_data(key):
    raw = sample_mixture(key)
    lo, hi = jnp.min(raw), jnp.max(raw)
    points = (raw - lo) / (hi - lo)
    return Data(points, lo, hi, *fit_gaussian_mle(points), jnp.quantile(mixture_log_density(points, lo, hi), 0.02))


# ---------------------------------------------------------------------------
# 3. Layers, stax-style: each is a pair (init_fun, apply_fun), init_fun(key, input_shape) -> (output_shape,
#    params) and apply_fun(params, inputs) -> outputs, so code written for the old stax runs unchanged.
# ---------------------------------------------------------------------------


def Dense(out_dim):
    """y = x W + b, with stax's initial values: W Glorot normal, b ~ N(0, 0.01^2)."""
    def init_fun(key, input_shape):
        w_key, b_key = random.split(key)
        W = jax.nn.initializers.glorot_normal()(w_key, (input_shape[-1], out_dim))
        return input_shape[:-1] + (out_dim,), (W, 0.01 * random.normal(b_key, (out_dim,)))

    def apply_fun(params, inputs, **kwargs):
        W, b = params
        return inputs @ W + b
    return init_fun, apply_fun


def elementwise(fun):
    """A layer without parameters that applies fun to every entry."""
    return (lambda key, input_shape: (input_shape, ())), (lambda params, inputs, **kwargs: fun(inputs))


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
generator_init, generator_apply = serial(Dense(2), Sigmoid)                                # G(z), z ~ U[0,1]^10
critic_init, critic_apply = serial(Dense(32), LeakyRelu, Dense(32), LeakyRelu, Dense(1))   # V(x), unbounded: T = g_f(V)
# belongs to the divergence (section 5).  The post ended its critic in a Sigmoid.


# ---------------------------------------------------------------------------
# 4. Adam, with the interface of the old optimizers.adam.
# ---------------------------------------------------------------------------


def adam(step_size, b1=0.9, b2=0.999, eps=1e-8):
    """(init, update, get_params) on any pytree.  state = (x, m, v); update(i, g, state), i = 0, 1, ...:
      m <- b1 m + (1 - b1) g,  v <- b2 v + (1 - b2) g^2,
      x <- x - step_size(i) m / (1 - b1^(i+1)) / (sqrt(v / (1 - b2^(i+1))) + eps);  step_size: number or function."""
    def init(params):
        return params, jax.tree.map(jnp.zeros_like, params), jax.tree.map(jnp.zeros_like, params)

    def update(i, grads, state):
        x, m, v = state
        lr = step_size(i) if callable(step_size) else step_size
        m = jax.tree.map(lambda m, g: (1 - b1) * g + b1 * m, m, grads)
        v = jax.tree.map(lambda v, g: (1 - b2) * jnp.square(g) + b2 * v, v, grads)
        bias1, bias2 = 1 - jnp.asarray(b1, jnp.float32) ** (i + 1), 1 - jnp.asarray(b2, jnp.float32) ** (i + 1)
        return jax.tree.map(lambda x, m, v: x - lr * (m / bias1) / (jnp.sqrt(v / bias2) + eps), x, m, v), m, v

    def get_params(state):
        return state[0]
    return init, update, get_params


# ---------------------------------------------------------------------------
# 5. Divergences (Nowozin et al. 2016, Table 2).  For each f: the output activation g_f, which keeps T = g_f(V)
#    in the domain of the conjugate f*(t) = sup_u (u t - f(u)); f*(g_f(v)) in a form that cannot overflow; and
#    log(p/q) read from V at the optimal critic T* = f'(p/q).
# ---------------------------------------------------------------------------


class Divergence(NamedTuple):
    name: str
    f: callable
    activation: callable                # g_f(v)
    conjugate: callable                 # f*(t)
    conjugate_of_activation: callable   # f*(g_f(v)), stable
    log_ratio: callable                 # log(p/q) where g_f(v) = f'(p/q)


LOG2 = math.log(2.0)
DIVERGENCES = {   # name: f(u), g_f(v), f*(t), f*(g_f(v)) stable, log(p/q) at the optimum
    "forward": Divergence("forward KL, KL(P||Q)", lambda u: u * jnp.log(u),
                          lambda v: v, lambda t: jnp.exp(t - 1), lambda v: jnp.exp(v - 1), lambda v: v - 1),
    "reverse": Divergence("reverse KL, KL(Q||P)", lambda u: -jnp.log(u),
                          lambda v: -jnp.exp(-v), lambda t: -1 - jnp.log(-t), lambda v: v - 1, lambda v: v),
    "pearson": Divergence("Pearson chi2(P||Q)", lambda u: (u - 1) ** 2,     # log(p/q) clipped where v < -2 (not T*)
                          lambda v: v, lambda t: t ** 2 / 4 + t, lambda v: v ** 2 / 4 + v,
                          lambda v: jnp.log1p(jnp.maximum(v / 2, -0.99))),
    "hellinger": Divergence("squared Hellinger", lambda u: (jnp.sqrt(u) - 1) ** 2,
                            lambda v: -jnp.expm1(-v), lambda t: t / (1 - t), jnp.expm1, lambda v: 2 * v),
    "js": Divergence("Jensen-Shannon (x2)", lambda u: u * jnp.log(u) - (u + 1) * jnp.log((u + 1) / 2),
                     lambda v: LOG2 - jax.nn.softplus(-v), lambda t: -jnp.log(2 - jnp.exp(t)),
                     lambda v: jax.nn.softplus(v) - LOG2, lambda v: v),
    "gan": Divergence("GAN, 2 JS - log 4", lambda u: u * jnp.log(u) - (u + 1) * jnp.log(u + 1),
                      lambda v: -jax.nn.softplus(-v), lambda t: -jnp.log1p(-jnp.exp(t)), jax.nn.softplus, lambda v: v),
}


def f_gan_objective(v_real, v_fake, divergence):
    """F = E_P[g_f(V)] - E_Q[f*(g_f(V))] from the critic's outputs: F <= D_f(P||Q), with equality at T* = f'(p/q)."""
    d = DIVERGENCES[divergence]
    return jnp.mean(d.activation(v_real)) - jnp.mean(d.conjugate_of_activation(v_fake))


def discriminator_loss(critic_params, real, fake, divergence):
    """The critic ascends F: loss = -F, one critic pass over both batches."""
    v = critic_apply(critic_params, jnp.concatenate([real, fake]))
    return -f_gan_objective(v[:len(real)], v[len(real):], divergence)


def generator_loss(generator_params, critic_params, z, divergence, jitter=0.0):
    """The generator descends F through its only term: -E_Q[f*(g_f(V(G(z) + jitter)))] (jitter: instance noise)."""
    fake = generator_apply(generator_params, z) + jitter
    return -jnp.mean(DIVERGENCES[divergence].conjugate_of_activation(critic_apply(critic_params, fake)))


def post_loss(output, y, divergence, eps=1e-10):
    """The post's loss_function, verbatim: output = Sigmoid(V), y = 1 for data and 0 for generated points.  Its
    generator step uses y = 1 too: the generator maximises E_Q[T], which is not the divergence (README.md)."""
    if divergence == "reverse":
        return -jnp.mean(-y * jnp.exp(output) + (1 - y) * (output + eps + 1.), axis=0)[0]
    return -jnp.mean(y * output - (1. - y) * (jnp.exp(output - 1.)), axis=0)[0]


QUADRATURE = np.stack(np.meshgrid(*[np.linspace(-0.25, 1.25, 61)] * 2), axis=-1).reshape(-1, 2)     # 0.025 apart


@functools.partial(jax.jit, static_argnums=0)
def gaussian_divergence(divergence, mean, cov, data):
    """D_f(P||N) = integral of n f(p/n), by quadrature over [-0.25, 1.25]^2, where P has all its mass; where p > n
    as p f(u)/u, u = p/n, so that no term overflows (u clipped to e^(+-40) nats)."""
    log_p = mixture_log_density(QUADRATURE, data.lo, data.hi)
    # log n in closed form: best_gaussian runs several times faster than through multivariate_normal.logpdf
    d = QUADRATURE - mean
    log_n = -0.5 * (jnp.einsum("ni,ij,nj->n", d, jnp.linalg.inv(cov), d) + jnp.log(jnp.linalg.det(2 * math.pi * cov)))
    log_u = jnp.clip(log_p - log_n, -40.0, 40.0)
    f = DIVERGENCES[divergence].f(jnp.exp(log_u))
    return jnp.sum(jnp.where(log_u > 0, jnp.exp(log_p - log_u) * f, jnp.exp(log_n) * f)) * 0.025 ** 2


@functools.partial(jax.jit, static_argnums=0)
def best_gaussian(divergence, data, steps=2000):
    """The single Gaussian nearest to P in D_f(P||N), by Adam from the MLE Gaussian: (mean, covariance)."""
    init, update, get_params = adam(2e-3)

    def covariance(chol):
        return jnp.tril(chol) @ jnp.tril(chol).T
    loss = jax.grad(lambda p: gaussian_divergence(divergence, p[0], covariance(p[1]), data))
    state = init((data.mle_mean, jnp.linalg.cholesky(data.mle_cov)))
    mean, chol = get_params(lax.fori_loop(0, steps, lambda i, state: update(i, loss(get_params(state)), state), state))
    return mean, covariance(chol)


# ---------------------------------------------------------------------------
# 6. Training: one step is a pure function of (state, step index, batch); the loop is a lax.scan, and the
#    seeds are a vmap, sharded over the devices there are.
# ---------------------------------------------------------------------------


class State(NamedTuple):
    generator: tuple        # Adam state (params, m, v) of G
    critic: tuple           # Adam state (params, m, v) of V
    average: list           # G's params averaged over the last steps: the generator that is evaluated


def init_state(key):
    """The post's networks, in fresh Adam states."""
    gen_key, critic_key = random.split(key)
    adam_init = adam(None)[0]
    _, gen_params = generator_init(gen_key, (-1, LATENT_DIM))
    _, critic_params = critic_init(critic_key, (-1, 2))
    return State(adam_init(gen_params), adam_init(critic_params), gen_params)


def sample_batch(data, i, key, batch_size):
    """Step i's batch from fold_in(key, i) alone: data points drawn with replacement (the post's np.random.choice),
    the generator's uniform z, and standard normal draws for the instance noise, (2, n, 2)."""
    data_key, z_key, noise_key = random.split(random.fold_in(key, i), 3)
    real = data[random.randint(data_key, (batch_size,), 0, len(data))]
    return real, random.uniform(z_key, (batch_size, LATENT_DIM)), random.normal(noise_key, (2, batch_size, 2))


# Step sizes and the noise's std at step 0, and the step by which all three have fallen to 0 (the saddle game): traced
# values, not shapes, so that runs differing only in them share one compiled program.
Schedule = NamedTuple("Schedule", [("lr_gen", float), ("lr_disc", float), ("noise", float), ("num_steps", float)])


def make_train_step(divergence, objective):
    """train_step(state, i, batch, schedule) -> (state, F at this batch): one critic step, then one generator step.

    Three plain means help the saddle game converge.  The critic's step size is about 8 times the
    generator's, so that it stays near its optimum T* and G follows the divergence (Heusel et al. 2017); both fall
    linearly to 0.  Instance noise (Sonderby et al. 2017) moves the points the critic sees by N(0, s_i^2 I), s_i =
    noise (1 - i / num_steps), narrower than P's components.  The evaluated generator averages G's params: that
    damps the game's cycles, leaving the game as it is (Yazici et al. 2019).  The post's: flat step sizes."""
    def saddle_step(state, i, batch, schedule):
        anneal = jnp.maximum(0.0, 1.0 - i / schedule.num_steps)
        _, gen_update, gen_params = adam(schedule.lr_gen * anneal)
        _, critic_update, critic_params = adam(schedule.lr_disc * anneal)
        real, z, normal = batch
        jitter = schedule.noise * anneal * normal
        fake = generator_apply(gen_params(state.generator), z)
        loss, grads = jax.value_and_grad(discriminator_loss)(critic_params(state.critic), real + jitter[0],
                                                             fake + jitter[1], divergence)
        critic = critic_update(i, grads, state.critic)
        # then the generator, on the same z and noise, against the updated critic (as in the post)
        grads = jax.grad(generator_loss)(gen_params(state.generator), critic_params(critic), z, divergence, jitter[1])
        generator = gen_update(i, grads, state.generator)
        average = jax.tree.map(lambda a, g: 0.999 * a + 0.001 * g, state.average, generator[0])     # ~1000 steps
        return State(generator, critic, average), -loss

    def post_step(state, i, batch, schedule):
        """The post's step: two critic updates (data, y = 1; generated, y = 0) at the same i, then the generator's."""
        _, gen_update, gen_params = adam(schedule.lr_gen)
        _, critic_update, critic_params = adam(schedule.lr_disc)
        real, z, _ = batch
        ones, zeros = jnp.ones((len(real), 1)), jnp.zeros((len(real), 1))

        def loss(params, x, y):
            return post_loss(jax.nn.sigmoid(critic_apply(params, x)), y, divergence)
        generator = gen_params(state.generator)
        real_loss, grads = jax.value_and_grad(loss)(critic_params(state.critic), real, ones)
        critic = critic_update(i, grads, state.critic)
        fake_loss, grads = jax.value_and_grad(loss)(critic_params(critic), generator_apply(generator, z), zeros)
        critic = critic_update(i, grads, critic)
        grads = jax.grad(lambda g: loss(critic_params(critic), generator_apply(g, z), ones))(generator)
        generator = gen_update(i, grads, state.generator)
        return State(generator, critic, generator[0]), -(real_loss + fake_loss)

    return saddle_step if objective == "saddle" else post_step


BLOCK = 100         # steps per compiled call: their batches are drawn in one vectorised call; a snapshot after each


def train(train_step, state, data, key, first_step, schedule, batch_size):
    """BLOCK steps from first_step in one lax.scan, each on sample_batch(data, i, key): the state and each step's F."""
    i = first_step + jnp.arange(BLOCK)
    batches = jax.vmap(sample_batch, (None, 0, None, None))(data, i, key, batch_size)
    return lax.scan(lambda state, step: train_step(state, step[0], step[1:], schedule), state, (i,) + batches)


@functools.partial(jax.jit, static_argnums=(0, 1, 7))
def train_block(divergence, objective, states, keys, data, first_step, schedule, batch_size):
    """train, for every seed at once (states and keys have the seeds on their leading axis); also seed 0's params."""
    step = make_train_step(divergence, objective)
    states, bounds = jax.vmap(lambda state, key: train(step, state, data, key, first_step, schedule, batch_size))(
        states, keys)
    return states, bounds, jax.tree.map(lambda a: a[0], (states.average, states.critic[0]))


class Training(NamedTuple):
    state: State            # the final states, seeds on the leading axis
    bounds: np.ndarray      # F at every step, (seeds, steps): the critic's estimate of the divergence
    snapshots: tuple        # seed 0's (step, generator params, critic params) at step 0 and after every BLOCK


def train_seeds(divergence, objective, schedule, keys, data, batch_size, log):
    """Train a generator per key, all at once, printing the critic's estimate five times along the way.  With
    several devices the seeds are sharded over them: one compiled program, each device its share."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:math.gcd(len(keys), jax.device_count())]), ("seeds",))
    states, keys = jax.device_put((jax.vmap(init_state)(keys), keys), NamedSharding(mesh, PartitionSpec("seeds")))
    data = jax.device_put(data, NamedSharding(mesh, PartitionSpec()))          # a copy on every device
    schedule = Schedule(*map(np.float32, schedule))
    bounds, snapshots = [], [jax.tree.map(lambda a: a[0], (states.average, states.critic[0]))]
    num_blocks = int(schedule.num_steps) // BLOCK
    for b in range(num_blocks):
        states, block_bounds, params = train_block(divergence, objective, states, keys, data, b * BLOCK, schedule,
                                                   batch_size)
        bounds.append(block_bounds)
        snapshots.append(params)
        if (b + 1) % max(1, num_blocks // 5) == 0 or b + 1 == num_blocks:
            recent = np.mean(np.concatenate(bounds[-max(1, num_blocks // 50):], axis=1), axis=1)
            log(f"  step {(b + 1) * BLOCK:>6}/{num_blocks * BLOCK}  critic's estimate: {np.median(recent):.3f}"
                + f"  (seeds: {recent.min():.3f} to {recent.max():.3f})" * (len(keys) > 1))
    steps = np.arange(0, num_blocks * BLOCK + 1, BLOCK)
    return Training(states, np.concatenate(bounds, axis=1),
                    (steps,) + jax.tree.map(lambda *a: np.stack(a), *snapshots))


# ---------------------------------------------------------------------------
# 7. Evaluation: the share of each model's points in each mode and in P's low-density region, and KL both
#    ways, with P's exact density and Q's from a Gaussian kernel density estimate.
# ---------------------------------------------------------------------------

NUM_SAMPLES = 5000      # points per model: evaluated, plotted (the first 1000, as in the post) and saved
COLUMNS = ("0.75 mode", "0.25 mode", "low-density", "KL(P||Q)", "KL(Q||P)", "D_f")


@jax.jit
def kde_log_density(x, samples):
    """log q(x) for the Gaussian kernel density estimate on samples (n, 2) with Scott's bandwidth n^(-1/6), as
    jax.scipy.stats.gaussian_kde(samples.T).logpdf(x.T), but through logsumexp: stable far from every sample."""
    n, d = samples.shape
    chol = jnp.linalg.cholesky(jnp.cov(samples.T) * n ** (-2 / (d + 4)))
    white_x, white_s = (jax.scipy.linalg.solve_triangular(chol, a.T, lower=True).T for a in (x, samples))
    sq_dist = jnp.sum(white_x ** 2, 1)[:, None] + jnp.sum(white_s ** 2, 1)[None] - 2 * white_x @ white_s.T
    log_norm = jnp.log(n) + jnp.sum(jnp.log(jnp.diag(chol))) + 0.5 * d * jnp.log(2 * jnp.pi)
    return logsumexp(-0.5 * jnp.maximum(sq_dist, 0.0), axis=1) - log_norm


@jax.jit
def evaluate(q_samples, data, key):
    """The first five COLUMNS for one model's samples (n, 2): KL(P||Q) = E_P[log p - log q] at 2000 data points,
    KL(Q||P) = E_Q[log q - log p] at the first 2000 samples, with log q a kernel estimate on the others."""
    real = data.points[random.randint(key, (2000,), 0, len(data.points))]
    comps = component_log_densities(q_samples, data.lo, data.hi)
    small_mode = jnp.mean(jnp.argmax(comps, axis=-1) == SMALL_MODE)
    low_density = jnp.mean(logsumexp(comps, axis=-1) < data.low_density)
    fresh, fit = q_samples[:2000], q_samples[2000:]
    kl_pq = jnp.mean(mixture_log_density(real, data.lo, data.hi) - kde_log_density(real, fit))
    kl_qp = jnp.mean(kde_log_density(fresh, fit) - logsumexp(comps[:2000], axis=-1))
    return jnp.stack([1 - small_mode, small_mode, low_density, kl_pq, kl_qp])


generate_each = jax.jit(jax.vmap(generator_apply, (0, None)))     # params stacked on axis 0, the same z for each


class Result(NamedTuple):
    labels: list            # a row each: the MLE Gaussian, then for each divergence its best Gaussian and its GANs
    rows: np.ndarray        # (rows, COLUMNS)
    samples: dict           # {divergence: (seeds, NUM_SAMPLES, 2)}: the generated points
    mle: np.ndarray         # the MLE Gaussian's points


def evaluation(data, trainings, key):
    """Every model's row.  D_f: the best Gaussian's exact value; a GAN's critic's estimate, its last tenth of steps."""
    z = random.uniform(key, (NUM_SAMPLES, LATENT_DIM))
    gaussian_points = functools.partial(random.multivariate_normal, key, shape=(NUM_SAMPLES,))
    labels, points, d_f, samples = ["MLE Gaussian"], [gaussian_points(data.mle_mean, data.mle_cov)], [np.nan], {}
    for d, t in trainings.items():
        mean, cov = best_gaussian(d, data)
        samples[d] = np.asarray(generate_each(t.state.average, z))
        seeds = range(len(t.bounds))
        labels += [f"{d}: best Gaussian"] + [f"{d}: GAN" + f", seed {s}" * (len(seeds) > 1) for s in seeds]
        points += [gaussian_points(mean, cov), *samples[d]]
        d_f += [gaussian_divergence(d, mean, cov, data), *np.mean(t.bounds[:, -t.bounds.shape[1] // 10:], axis=1)]
    rows = np.column_stack([np.stack([evaluate(p, data, key) for p in points]), d_f])
    return Result(labels, rows, samples, np.asarray(points[0]))


def format_table(labels, rows):
    width = max(map(len, labels))
    return "\n".join([" " * width + "".join(f"{c:>12}" for c in COLUMNS)] + [
        (f"{label:<{width}}" + "".join(f"{v:>12.3f}" if np.isfinite(v) else " " * 12 for v in row)).rstrip()
        for label, row in zip(labels, rows)])


# ---------------------------------------------------------------------------
# 8. Figures: the post's kdeplots, P in Reds and Q in Blues, and the animation (--animate).
# ---------------------------------------------------------------------------


def plot_dataset(ax, points, cmap="Reds", size=1.0):
    """The post's sns.kdeplot(x, y, cmap=cmap) of the first 1000 points, in plain matplotlib: the kernel density
    estimate's contours at the heights above which lie 95%, 85%, ..., 5% and 0% of its mass (seaborn's levels)."""
    ax.set(aspect="equal", xlim=(0, size), ylim=(0, size))
    ax.tick_params(labelsize=10)
    axis = np.linspace(0, size, 100)
    grid = np.stack(np.meshgrid(axis, axis), axis=-1).reshape(-1, 2)
    density = np.exp(np.asarray(kde_log_density(grid, jnp.asarray(points[:1000]))))
    heights = np.sort(density)[::-1]
    levels = heights[np.searchsorted(np.cumsum(heights) / heights.sum(), 1 - np.linspace(0.05, 1, 10))]
    ax.contour(axis, axis, density.reshape(100, 100), levels=np.unique(levels), cmap=cmap)


def figure(data, panels, bounds=None):
    """One kdeplot panel per (title, points), P under each; with bounds ({name: (seeds, steps)}), a last panel
    with the critic's estimate of each divergence over training."""
    import matplotlib.patches as mpatches
    from matplotlib import colormaps
    from matplotlib.figure import Figure
    wide = bounds is not None
    fig = Figure(figsize=(5 * len(panels) + 6 * wide, 5.2), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(panels) + wide))
    for ax, (title, points) in zip(axes, panels):
        plot_dataset(ax, data)
        plot_dataset(ax, points, cmap="Blues")
        ax.set_title(title, fontsize=11)
    axes[0].legend(handles=[mpatches.Patch(color=colormaps[c](0.43), label=label)
                            for c, label in (("Reds", "Ground truth"), ("Blues", "Generated data"))], loc="upper left")
    for (name, history), colour in zip((bounds or {}).items(), colormaps["tab10"].colors):
        window = math.gcd(history.shape[1], max(1, history.shape[1] // 200))     # about 200 points a curve
        smooth = np.mean(history.reshape(len(history), -1, window), axis=-1)
        for s, curve in enumerate(smooth):          # seed 0 bold, the others faint
            axes[-1].plot((np.arange(len(curve)) + 0.5) * window, curve, color=colour, lw=1.6 if s == 0 else 0.6,
                          alpha=1 if s == 0 else 0.35, label=name if s == 0 else None)
    if wide:
        axes[-1].set(xlabel="training step", ylabel="critic's estimate (nats)",
                     title="E_P[T] - E_Q[f*(T)], the f-GAN lower bound")
        axes[-1].legend(loc="best")
    return fig


FRAMES, GRID = 26, 100      # the animation: 26 evenly spaced snapshots; the critic read on a 100 x 100 grid


def write_animation(path, data, trainings):
    """A GIF, one panel per divergence: P's contours, 500 of seed 0's generated points and, shaded, the critic's
    log(p/q), read from T = g_f(V): red where it says Q is missing mass, blue where Q has too much."""
    from matplotlib import colormaps
    from matplotlib.animation import PillowWriter
    from matplotlib.figure import Figure
    axis = np.linspace(0, 1, GRID)
    grid = np.stack(np.meshgrid(axis, axis), axis=-1).reshape(-1, 2)
    log_p = np.asarray(mixture_log_density(grid, data.lo, data.hi)).reshape(GRID, GRID)
    z = random.uniform(random.key(0), (500, LATENT_DIM))        # the same z in every frame
    fig = Figure(figsize=(4.3 * len(trainings) + 0.9, 4.6), layout="constrained")
    panels = []
    for ax, (d, training) in zip(np.atleast_1d(fig.subplots(1, len(trainings))), trainings.items()):
        steps, gen_params, critic_params = jax.tree.map(
            lambda a: a[np.linspace(0, len(a) - 1, FRAMES).round().astype(int)], training.snapshots)
        points = np.asarray(generate_each(gen_params, z))
        v = jax.vmap(critic_apply, (0, None))(critic_params, grid)
        log_ratio = np.asarray(DIVERGENCES[d].log_ratio(v)).reshape(-1, GRID, GRID)
        estimates = [np.mean(training.bounds[0, max(0, s - 100):max(1, s)]) for s in steps]    # F, 100 steps
        image = ax.imshow(log_ratio[0], extent=(0, 1, 0, 1), origin="lower", vmin=-4, vmax=4,
                          cmap=colormaps["RdBu_r"].resampled(16))       # 16 flat colours: a GIF has 256
        ax.contour(axis, axis, log_p, levels=np.quantile(log_p, [0.6, 0.75, 0.9, 0.97]), colors="k", linewidths=0.8)
        dots = ax.scatter(*points[0].T, s=2, c="#222222", linewidths=0)
        ax.set(xlim=(0, 1), ylim=(0, 1), aspect="equal", xticks=[], yticks=[])
        panels.append((ax, DIVERGENCES[d].name, steps, estimates, image, log_ratio, dots, points))
    fig.colorbar(image, ax=fig.axes, shrink=0.8, ticks=range(-4, 5, 2),
                 label="the critic's log(p/q): red, Q is missing mass there")
    writer = PillowWriter(fps=6)
    writer.setup(fig, path, dpi=72)
    for f in range(FRAMES):
        for ax, name, steps, estimates, image, log_ratio, dots, points in panels:
            image.set_data(log_ratio[f])
            dots.set_offsets(points[f])
            ax.set_title(f"{name}\nstep {steps[f]}: critic's estimate {estimates[f]:.2f} nats", fontsize=10)
        if f == 0:
            fig.draw_without_rendering()        # lay out once, with the titles: every frame the same size
            fig.set_layout_engine("none")
        writer.grab_frame()
    writer.finish()


@contextlib.contextmanager
def atomic_outputs():
    """with atomic_outputs() as path: write to path(final); every file is renamed to its final name when the
    block completes, and removed if it does not (an error, Ctrl-C, SIGTERM): no partial output is left."""
    pending = []

    def path(final):
        stem, extension = os.path.splitext(os.path.basename(final))      # writers go by the extension
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(final) or ".", prefix=f".{stem}.", suffix=extension)
        os.close(fd)
        pending.append((tmp, final))
        return tmp
    try:
        yield path
        for tmp, final in pending:
            os.chmod(tmp, 0o644)            # mkstemp's files are 0600
            os.replace(tmp, final)
    finally:
        for tmp, _ in pending:
            if os.path.exists(tmp):
                os.remove(tmp)


# ---------------------------------------------------------------------------
# 9. The run.
# ---------------------------------------------------------------------------


def report(result, trainings, log):
    """The table, and one line per divergence over its seeds; returns the models that diverged."""
    log(f"\nshares of {NUM_SAMPLES} points of each model in each mode and in P's low-density region (below its 2% "
        "quantile);\nKL in nats with P's exact density and a kernel estimate of Q's; D_f in nats:\n"
        + format_table(result.labels, result.rows))
    for d, s in result.samples.items() if len(next(iter(result.samples.values()))) > 1 else ():
        share = result.rows[[label.startswith(f"{d}: GAN") for label in result.labels], 1]
        log(f"{DIVERGENCES[d].name}, {len(s)} seeds: {share.min():.3f} to {share.max():.3f} in the 0.25 mode")
    return [f"{d} seed {i}" for d, s in result.samples.items() for i in range(len(s))
            if not np.isfinite(trainings[d].bounds[i]).all() or s[i].std(axis=0).min() < 1e-5]


def write_outputs(out, data, trainings, result, plot, animate, compare, save_samples, settings):
    """The figures (into out), the animation and the .npz, written whole or not at all: returns their paths."""
    points, samples, figures = np.asarray(data.points), result.samples, {}
    if plot:
        figures["mle_fit.png"] = figure(points, [("MLE Gaussian (forward-KL optimum)", result.mle)])
        panels = [(f"{DIVERGENCES[d].name}: {result.rows[result.labels.index(f'{d}: best Gaussian') + 1, 1]:.2f} "
                   "in the 0.25 mode", s[0]) for d, s in samples.items()]
        if not compare:
            figures[f"generated_{next(iter(samples))}.png"] = figure(points, panels)
        else:
            figures["compare.png"] = figure(points, [("MLE Gaussian", result.mle)] + panels,
                                            {DIVERGENCES[d].name: t.bounds for d, t in trainings.items()})
    written = [os.path.join(out, name) for name in figures] + [os.path.join(out, "training.gif")] * animate
    with atomic_outputs() as path:
        for fig, final in zip(figures.values(), written):
            fig.savefig(path(final), dpi=100)
        if animate:
            write_animation(path(written[-1]), data, trainings)
        if save_samples:
            arrays = {f"{name}_{d}" if compare else name: np.asarray(a) for d, t in trainings.items()
                      for name, a in zip(("samples", "W", "b"), (samples[d], *t.state.average[0]))}  # G = sig(zW+b)
            np.savez(path(save_samples), **arrays, data_min=float(data.lo), data_max=float(data.hi), **settings)
    return written + [save_samples] * bool(save_samples)


def main(argv=None, log=print):
    """The script: train, evaluate, report, and write the figures and files.  Returns the exit status."""
    args, started = parse_args(argv), time.perf_counter()
    data_key, train_key, eval_key = random.split(random.key(args.seed), 3)
    data = make_data(data_key)
    log(f"data: {len(data.points)} points, scaled by min {float(data.lo):.3f} and max {float(data.hi):.3f}")
    trainings = {}
    schedule = Schedule(args.lr_gen, args.lr_disc, args.noise, args.steps)
    seed_keys = jax.vmap(lambda i: random.fold_in(train_key, i))(jnp.arange(args.seeds))    # seed i's, whatever --seeds
    for d in args.divergences:
        log(f"training {args.seeds} generator(s) with {DIVERGENCES[d].name}, {args.objective} objective:")
        trainings[d] = train_seeds(d, args.objective, schedule, seed_keys, data.points, args.batch_size, log)
    result = evaluation(data, trainings, eval_key)
    if failed := report(result, trainings, log):
        log(f"error: training diverged ({', '.join(failed)}): try smaller --lr-gen and --lr-disc. Nothing was "
            "written.", file=sys.stderr)
        return 1
    settings = {k: getattr(args, k) for k in ("objective", "steps", "batch_size", "lr_gen", "lr_disc", "noise", "seed")}
    written = write_outputs(args.out, data, trainings, result, not args.no_plot, args.animate,
                            args.compare is not None, args.save_samples, settings)
    log(f"\nwritten: {', '.join(written) or 'nothing'}\ntime: {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))    # unwinds like Ctrl-C
    # read when JAX starts: one CPU device per core, so that seeds on the CPU are sharded over every core; XLA's LLVM
    # at -O2, which on this repo's CPU compiles the training program in a third of the time, to the same numbers
    os.environ["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={os.cpu_count()} "
                               "--xla_backend_optimization_level=2 " + os.environ.get("XLA_FLAGS", ""))
    # JAX's persistent compilation cache: a second run compiles nothing (JAX_ENABLE_COMPILATION_CACHE=false: off)
    jax.config.update("jax_compilation_cache_dir", os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "kl-forward-reverse"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    sys.exit(main())
