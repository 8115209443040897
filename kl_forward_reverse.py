"""Forward and reverse KL divergence with a tiny f-GAN, in pure JAX.

A 2-D mixture of two Gaussians P (weights 0.75 and 0.25) is fitted by a generator Q = G(z), z ~ U[0,1]^10,
trained as an f-GAN (Nowozin et al. 2016, arXiv:1606.00709): a critic V gives T = g_f(V), and the two play

    F(theta, omega) = E_P[g_f(V(x))] - E_Q[f*(g_f(V(G(z))))]  <=  D_f(P||Q),

the critic up, the generator down.  With f(u) = u log u, D_f is forward KL, KL(P||Q), and Q spreads over both
modes (mode-covering); with f(u) = -log u it is reverse KL, KL(Q||P), and Q sits on one mode (mode-seeking).
Sections follow the blog post it reimplements: 0 settings, 1 data, 2 the MLE Gaussian, 3 layers, 4 Adam,
5 divergences, 6 training, 7 evaluation, 8 figures, 9 the run.

    python kl_forward_reverse.py --reverse      # reverse KL: one mode;  --compare: forward and reverse, side by side
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
# 0. Settings: every flag, its defaults (the f-GAN game's, and the post's own) and what it accepts.
# ---------------------------------------------------------------------------


def checked(cast, accepts, what):
    """An argparse type: cast(text) if accepts(value), else an error that names what the flag accepts."""
    def parse(text):
        with contextlib.suppress(ValueError):
            if accepts(value := cast(text)):
                return value
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return parse


DEFAULTS = {"saddle": dict(steps=15000, batch_size=128, lr_gen=6e-4, lr_disc=2.5e-3, noise=0.03, start_width=0.3),
            "post": dict(steps=7000, batch_size=64, lr_gen=1e-4, lr_disc=5e-4, noise=0.0, start_width=0.0)}


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
    p.add_argument("--start-width", type=checked(float, lambda v: 0 <= v <= 1, "a number in [0, 1]"),
                   help=f"G starts as the MLE Gaussian narrowed to this width; 0: stax's start ({both['start_width']})")
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
    if not is_dir and os.path.isdir(path):
        return f"{path} is a folder; expected a file name such as samples.npz"
    folder = path if is_dir else (os.path.dirname(path) or ".")
    try:
        os.makedirs(folder, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()        # the one test that is right for root too
    except OSError as e:
        return f"cannot write to {folder}: {e.strerror or e}"


# ---------------------------------------------------------------------------
# 1. Data: the post's mixture, in its 64-point blocks, scaled to [0, 1].
# ---------------------------------------------------------------------------

#            weight   mean        covariance
MIXTURE = ((0.75, (0.5, 2.0), ((4.0, 0.0), (0.0, 1.5))),
           (0.25, (9.0, 9.0), ((1.0, 0.0), (0.0, 3.0))))
BLOCK_SIZE, NUM_BLOCKS = 64, 10000      # the post drew 48 points of the 0.75 mode, then 16 of the 0.25, 10000 times


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
critic_init, critic_apply = serial(Dense(32), LeakyRelu, Dense(32), LeakyRelu, Dense(1))   # V(x); T = g_f(V), section 5


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


Divergence = NamedTuple("Divergence", [("name", str), ("f", callable), ("activation", callable), (
    "conjugate", callable), ("conjugate_of_activation", callable), ("log_ratio", callable)])
DIVERGENCES = {   # name: f(u), g_f(v), f*(t), f*(g_f(v)) stable, log(p/q) where g_f(v) = f'(p/q)
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
                     lambda v: math.log(2) - jax.nn.softplus(-v), lambda t: -jnp.log(2 - jnp.exp(t)),
                     lambda v: jax.nn.softplus(v) - math.log(2), lambda v: v),
    "gan": Divergence("GAN, 2 JS - log 4", lambda u: u * jnp.log(u) - (u + 1) * jnp.log(u + 1),
                      lambda v: -jax.nn.softplus(-v), lambda t: -jnp.log1p(-jnp.exp(t)), jax.nn.softplus, lambda v: v),
}


def index_of(divergence):
    """A divergence's row in DIVERGENCES, from its name; an index stays as it is (under vmap, each run's, traced)."""
    return list(DIVERGENCES).index(divergence) if isinstance(divergence, str) else divergence


def apply(field, divergence, x):
    """DIVERGENCES[divergence].field(x) by lax.switch on its index: one compiled program serves every divergence."""
    return lax.switch(index_of(divergence), [getattr(d, field) for d in DIVERGENCES.values()], x)


def f_gan_objective(v_real, v_fake, divergence):
    """F = E_P[g_f(V)] - E_Q[f*(g_f(V))] from the critic's outputs: F <= D_f(P||Q), with equality at T* = f'(p/q)."""
    real, fake = apply("activation", divergence, v_real), apply("conjugate_of_activation", divergence, v_fake)
    return jnp.mean(real) - jnp.mean(fake)


def discriminator_loss(critic_params, real, fake, divergence):
    """The critic ascends F: loss = -F, one critic pass over both batches."""
    v = critic_apply(critic_params, jnp.concatenate([real, fake]))
    return -f_gan_objective(v[:len(real)], v[len(real):], divergence)


def generator_loss(generator_params, critic_params, z, divergence, jitter=0.0):
    """The generator descends F through its only term: -E_Q[f*(g_f(V(G(z) + jitter)))] (jitter: instance noise)."""
    fake = generator_apply(generator_params, z) + jitter
    return -jnp.mean(apply("conjugate_of_activation", divergence, critic_apply(critic_params, fake)))


def post_loss(output, y, divergence, eps=1e-10):
    """The post's loss_function, verbatim: output = Sigmoid(V), y = 1 for data and 0 for generated points.  Its
    generator step uses y = 1 too: the generator maximises E_Q[T], which is not the divergence (README.md)."""
    reverse = -jnp.mean(-y * jnp.exp(output) + (1 - y) * (output + eps + 1.), axis=0)[0]
    forward = -jnp.mean(y * output - (1. - y) * (jnp.exp(output - 1.)), axis=0)[0]
    return jnp.where(index_of(divergence) == index_of("reverse"), reverse, forward)


QUADRATURE = np.stack(np.meshgrid(*[np.linspace(-0.25, 1.25, 61)] * 2), axis=-1).reshape(-1, 2)     # 0.025 apart


@jax.jit
def gaussian_divergence(divergence, mean, cov, data):
    """D_f(P||N) = integral of n f(p/n), by quadrature over [-0.25, 1.25]^2, where P has all its mass; where p > n
    as p f(u)/u, u = p/n, so that no term overflows (u clipped to e^(+-40) nats)."""
    log_p = mixture_log_density(QUADRATURE, data.lo, data.hi)
    d = QUADRATURE - mean       # log n in closed form: best_gaussian runs faster than through multivariate_normal
    log_n = -0.5 * (jnp.einsum("ni,ij,nj->n", d, jnp.linalg.inv(cov), d) + jnp.log(jnp.linalg.det(2 * math.pi * cov)))
    log_u = jnp.clip(log_p - log_n, -40.0, 40.0)
    f = apply("f", divergence, jnp.exp(log_u))
    return jnp.sum(jnp.where(log_u > 0, jnp.exp(log_p - log_u) * f, jnp.exp(log_n) * f)) * 0.025 ** 2


@functools.partial(jax.jit, static_argnums=2)
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
#    runs (every divergence and seed) are one vmap, sharded over the devices there are.
# ---------------------------------------------------------------------------


class State(NamedTuple):
    generator: tuple        # Adam state (params, m, v) of G
    critic: tuple           # Adam state (params, m, v) of V
    average: list           # G's params averaged over the last steps: the generator that is evaluated


def init_state(key, mean, cov, start_width):
    """The post's networks, in fresh Adam states.  G starts as the Gaussian (mean, cov) narrowed to start_width of
    its width, the same start for every divergence (0: stax's start, the post's).  In logit space: zW + b, z ~
    U[0,1]^10, has mean b + W^T 1/2 and covariance W^T W / 12, so W = sqrt(12) R C^T with R a random 10 x 2
    orthonormal frame and C C^T = J cov J start_width^2, J = diag(1 / (mean (1 - mean))) the logit's Jacobian."""
    (gen_key, critic_key), adam_init = random.split(key), adam(None)[0]
    gen_params, critic_params = generator_init(gen_key, (-1, LATENT_DIM))[1], critic_init(critic_key, (-1, 2))[1]
    if start_width > 0:
        frame = jnp.linalg.qr(random.normal(gen_key, (LATENT_DIM, 2)))[0]
        jacobian = 1 / (mean * (1 - mean))
        W = math.sqrt(12) * start_width * frame @ jnp.linalg.cholesky(jacobian[:, None] * cov * jacobian).T
        gen_params = [(W, jnp.log(mean / (1 - mean)) - W.sum(0) / 2), ()]
    return State(adam_init(gen_params), adam_init(critic_params), gen_params)


init_states = jax.jit(jax.vmap(init_state, (0, None, None, None)), static_argnums=3)     # a state per key: one program


def sample_batch(data, i, key, batch_size):
    """Step i's batch from fold_in(key, i) alone: data points with replacement (the post's np.random.choice), z, and
    standard normal draws for the instance noise, (2, n, 2)."""
    data_key, z_key, noise_key = random.split(random.fold_in(key, i), 3)
    real = data[random.randint(data_key, (batch_size,), 0, len(data))]
    return real, random.uniform(z_key, (batch_size, LATENT_DIM)), random.normal(noise_key, (2, batch_size, 2))


# Step sizes, noise at step 0, and the step where all three reach 0: traced, so runs differing in them share a program
Schedule = NamedTuple("Schedule", [("lr_gen", float), ("lr_disc", float), ("noise", float), ("num_steps", float)])


def make_train_step(divergence, objective):
    """train_step(state, i, batch, schedule) -> (state, F at this batch): one critic step, then one generator step.
    With init_state's start, three plain means help the saddle game converge: two time-scales, the critic's step
    size 4 times the generator's, so that it stays near T* and G follows the divergence (Heusel et al. 2017), both
    falling linearly to 0; instance noise, N(0, s_i^2 I) on the points the critic sees, s_i = noise (1 - i /
    num_steps), narrower than P's components (Sonderby et al. 2017); G's params averaged for the evaluation, which
    damps the game's cycles and leaves the game as it is (Yazici et al. 2019).  The post's: flat step sizes."""
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


@functools.partial(jax.jit, static_argnums=(0, 7, 8))
def train_block(objective, states, divergences, keys, data, first_step, schedule, batch_size, seeds):
    """BLOCK steps of every run (states, divergence indices, keys: seeds runs per divergence, on the leading axis), each
    a lax.scan, step i on sample_batch(data, i, key): the states, each step's F, each divergence's seed 0's params."""
    def train(state, divergence, key):
        step, i = make_train_step(divergence, objective), first_step + jnp.arange(BLOCK)
        batches = jax.vmap(sample_batch, (None, 0, None, None))(data, i, key, batch_size)
        return lax.scan(lambda state, batch: step(state, batch[0], batch[1:], schedule), state, (i,) + batches)
    states, bounds = jax.vmap(train)(states, divergences, keys)
    return states, bounds, jax.tree.map(lambda a: a[::seeds], (states.average, states.critic[0]))


class Training(NamedTuple):
    state: State            # the final states, seeds on the leading axis
    bounds: np.ndarray      # F at every step, (seeds, steps): the critic's estimate of the divergence
    snapshots: tuple        # seed 0's (step, generator params, critic params) at step 0 and after every BLOCK


def train_runs(divergences, objective, schedule, keys, data, batch_size, start_width, log):
    """Train a generator per divergence and key, all at once in one program, printing the critic's estimates five
    times along the way; {divergence: Training}.  With several devices the runs are sharded over them."""
    seeds = len(keys)
    indices, keys = np.repeat([index_of(d) for d in divergences], seeds), jnp.concatenate([keys] * len(divergences))
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:math.gcd(len(keys), jax.device_count())]), ("runs",))
    states = init_states(keys, data.mle_mean, data.mle_cov, start_width)
    states, indices, keys = jax.device_put((states, indices, keys), NamedSharding(mesh, PartitionSpec("runs")))
    points = jax.device_put(data.points, NamedSharding(mesh, PartitionSpec()))      # a copy on every device
    schedule = Schedule(*map(np.float32, schedule))
    bounds, snapshots = [], [jax.tree.map(lambda a: a[::seeds], (states.average, states.critic[0]))]
    num_blocks = int(schedule.num_steps) // BLOCK
    for b in range(num_blocks):
        states, block_bounds, params = train_block(objective, states, indices, keys, points, b * BLOCK, schedule,
                                                   batch_size, seeds)
        bounds.append(block_bounds)
        snapshots.append(params)
        if (b + 1) % max(1, num_blocks // 5) == 0 or b + 1 == num_blocks:
            recent = np.mean(np.concatenate(bounds[-max(1, num_blocks // 50):], axis=1), axis=1).reshape(-1, seeds)
            log(f"  step {(b + 1) * BLOCK:>6}/{num_blocks * BLOCK}  critic's estimate: " + ", ".join(
                f"{d} {np.median(r):.3f}" + f" ({r.min():.3f} to {r.max():.3f})" * (seeds > 1)
                for d, r in zip(divergences, recent)))
    steps, bounds = np.arange(0, num_blocks * BLOCK + 1, BLOCK), np.concatenate(bounds, axis=1)
    return {d: Training(*jax.tree.map(lambda a: a[n * seeds:(n + 1) * seeds], (states, bounds)),
                        (steps,) + jax.tree.map(lambda *a: np.stack(a)[:, n], *snapshots))
            for n, d in enumerate(divergences)}


# ---------------------------------------------------------------------------
# 7. Evaluation: the share of each model's points in each mode and in P's low-density region, and KL both
#    ways, with P's exact density and Q's from a Gaussian kernel density estimate.
# ---------------------------------------------------------------------------

NUM_SAMPLES = 5000      # points per model: evaluated, plotted (the first 1000, as in the post) and saved
COLUMNS = ("0.75 mode", "0.25 mode", "low-density", "KL(P||Q)", "KL(Q||P)", "true D_f", "critic's F")


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
    """For one model's samples (n, 2): the first five COLUMNS and every divergence's D_f(P||Q).  u = p/q, q a kernel
    estimate on all but the first 2000 samples: KL(P||Q) = E_P[log u] at 2000 data points, KL(Q||P) = E_Q[-log u] at
    those 2000, D_f = E_Q[f(u); u <= 1] + E_P[f(u)/u; u > 1].  inf where an estimate's standard error is over 5%, or
    where capping u at the number of points q rests on moves it by over 5% (q is a kernel's tail there)."""
    real = data.points[random.randint(key, (2000,), 0, len(data.points))]
    comps = component_log_densities(q_samples, data.lo, data.hi)
    small_mode = jnp.mean(jnp.argmax(comps, axis=-1) == 1)           # component 1: the 0.25 mode
    low_density = jnp.mean(logsumexp(comps, axis=-1) < data.low_density)
    fresh, fit = q_samples[:2000], q_samples[2000:]
    log_u_p = mixture_log_density(real, data.lo, data.hi) - kde_log_density(real, fit)
    log_u_q = logsumexp(comps[:2000], axis=-1) - kde_log_density(fresh, fit)

    def estimates(log_u_p):      # KL(P||Q), each D_f and its standard error: each term where its points are dense
        u_p, u_q = (jnp.exp(jnp.clip(log_u, -40, 40)) for log_u in (log_u_p, log_u_q))     # no overflow in f(u)
        terms = [(jnp.where(log_u_q <= 0, d.f(u_q), 0.0), jnp.where(log_u_p > 0, d.f(u_p) / u_p, 0.0))
                 for d in DIVERGENCES.values()]
        return (jnp.mean(log_u_p), jnp.stack([jnp.mean(q) + jnp.mean(p) for q, p in terms]),
                jnp.stack([jnp.sqrt((jnp.var(q) + jnp.var(p)) / 2000) for q, p in terms]))

    def trusted(value, capped, error=0.0):
        return jnp.where(jnp.maximum(jnp.abs(value - capped), error) <= 0.05 * jnp.abs(value), value, jnp.inf)
    (kl_pq, d_f, error), (kl_capped, d_f_capped, _) = estimates(log_u_p), estimates(
        jnp.minimum(log_u_p, math.log(len(fit))))
    return (jnp.stack([1 - small_mode, small_mode, low_density, trusted(kl_pq, kl_capped), -jnp.mean(log_u_q)]),
            trusted(d_f, d_f_capped, error))


generate_each = jax.jit(jax.vmap(generator_apply, (0, None)))     # params stacked on axis 0, the same z for each


class Result(NamedTuple):
    labels: list            # a row each: the MLE Gaussian, then for each divergence its best Gaussian and its GANs
    rows: np.ndarray        # (rows, COLUMNS)
    samples: dict           # {divergence: (seeds, NUM_SAMPLES, 2)}: the generated points
    mle: np.ndarray         # the MLE Gaussian's points


def evaluation(data, trainings, key):
    """Every model's row.  True D_f: a Gaussian's exact value (the MLE's: forward KL, which it minimises); a GAN's
    estimate from evaluate.  The critic's F: the mean of the critic's estimate over the last tenth of steps."""
    z = random.uniform(key, (NUM_SAMPLES, LATENT_DIM))
    gaussian_points = functools.partial(random.multivariate_normal, key, shape=(NUM_SAMPLES,))

    def row(points, divergence, exact=None, critic=np.nan):
        columns, d_f = evaluate(points, data, key)
        return [*columns, d_f[index_of(divergence)] if exact is None else exact, critic]
    mle = gaussian_points(data.mle_mean, data.mle_cov)
    labels, samples = ["MLE Gaussian"], {}
    rows = [row(mle, "forward", gaussian_divergence(index_of("forward"), data.mle_mean, data.mle_cov, data))]
    for d, t in trainings.items():
        mean, cov = best_gaussian(index_of(d), data)
        samples[d] = np.asarray(generate_each(t.state.average, z))
        critic = np.mean(t.bounds[:, -t.bounds.shape[1] // 10:], axis=1)      # each seed's
        labels += [f"{d}: best Gaussian"] + [f"{d}: GAN" + f", seed {i}" * (len(critic) > 1)
                                             for i in range(len(critic))]
        rows += [row(gaussian_points(mean, cov), d, gaussian_divergence(index_of(d), mean, cov, data))]
        rows += [row(points, d, critic=c) for points, c in zip(samples[d], critic)]
    return Result(labels, np.array(rows, dtype=float), samples, np.asarray(mle))


def format_table(labels, rows):
    """The table: a blank where a row has no value (NaN), "unreliable" where an estimate is not to be trusted (inf)."""
    width = max(map(len, labels))
    return "\n".join([" " * width + "".join(f"{c:>12}" for c in COLUMNS)] + [
        (f"{label:<{width}}" + "".join(f"{v:>12.3f}" if np.isfinite(v) else " " * 12 if np.isnan(v)
                                       else f"{'unreliable':>12}" for v in row)).rstrip()
        for label, row in zip(labels, rows)])


# ---------------------------------------------------------------------------
# 8. Figures: the post's kdeplots, P in Reds and Q in Blues, and the animation (--animate).
# ---------------------------------------------------------------------------


def plot_dataset(ax, points, cmap="Reds", size=1.0):
    """The post's plot_dataset: seaborn's kdeplot of the first 1000 points; its grid 100 x 100, not 200 x 200."""
    import seaborn as sns
    ax.set(aspect="equal", xlim=(0, size), ylim=(0, size))
    ax.tick_params(labelsize=10)
    sns.kdeplot(x=points[:1000, 0], y=points[:1000, 1], cmap=cmap, ax=ax, gridsize=100)


def figure(data, panels, bounds=None):
    """One kdeplot panel per (title, points), P under each; with bounds ({name: (history (seeds, steps), the best
    Gaussian's D_f, seed 0's true D_f)}), a last panel: the critic's estimate over training, and where it should end."""
    import matplotlib.patches as mpatches
    import seaborn as sns
    from matplotlib.figure import Figure
    wide = bounds is not None
    fig = Figure(figsize=(5 * len(panels) + 6 * wide, 5.2), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(panels) + wide))
    for ax, (title, points) in zip(axes, panels):
        plot_dataset(ax, data)
        plot_dataset(ax, points, cmap="Blues")
        ax.set_title(title, fontsize=11)
    axes[0].legend(handles=[mpatches.Patch(color=sns.color_palette(c)[2], label=label)
                            for c, label in (("Reds", "Ground truth"), ("Blues", "Generated data"))], loc="upper left")
    for (name, (history, best, true)), colour in zip((bounds or {}).items(), sns.color_palette("tab10")):
        window = math.gcd(history.shape[1], max(1, history.shape[1] // 200))     # about 200 points a curve
        smooth = np.mean(history.reshape(len(history), -1, window), axis=-1)
        for s, curve in enumerate(smooth):          # seed 0 bold, the others faint
            axes[-1].plot((np.arange(len(curve)) + 0.5) * window, curve, color=colour, lw=1.6 if s == 0 else 0.6,
                          alpha=1 if s == 0 else 0.35, label=name if s == 0 else None)
        axes[-1].axhline(best, color=colour, ls="--", lw=1)
        if np.isfinite(true):       # not where it is 'unreliable'
            axes[-1].axhline(true, color=colour, ls=":", lw=1.4)
    if wide:        # the y range from where the estimates converge, not from the first steps' spikes
        top = 1.5 * max(b[1] for b in bounds.values())
        axes[-1].set(xlabel="training step", ylabel="nats", ylim=(-0.1 * top, top))
        axes[-1].set_title("the critic's estimate E_P[T] - E_Q[f*(T)], seed 0 bold\n"
                           "dashed: the best Gaussian's D_f; dotted: seed 0's true D_f", fontsize=10)
        axes[-1].legend(loc="upper right")
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
        image = ax.imshow(log_ratio[0], extent=(0, 1, 0, 1), origin="lower", vmin=-4, vmax=4, interpolation="nearest",
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
    """The table; returns the models that diverged."""
    log(f"\nshares of {NUM_SAMPLES} points per model in each mode and in P's low-density region (below its 2% "
        "quantile); KL and true D_f(P||Q) in\nnats, P's density exact, Q's a kernel estimate (a Gaussian's D_f exact, "
        "the MLE's KL(P||Q)); the critic's F: its bound:\n" + format_table(result.labels, result.rows))
    return [f"{d} seed {i}" for d, s in result.samples.items() for i in range(len(s))
            if not np.isfinite(trainings[d].bounds[i]).all() or s[i].std(axis=0).min() < 1e-5]


def write_outputs(out, data, trainings, result, plot, animate, compare, save_samples, settings):
    """The figures (into out), the animation and the .npz, written whole or not at all: returns their paths."""
    points, samples, figures = np.asarray(data.points), result.samples, {}
    best = {d: result.labels.index(f"{d}: best Gaussian") for d in samples}     # its row; seed 0's is the next
    if plot:
        figures["mle_fit.png"] = figure(points, [("MLE Gaussian (forward-KL optimum)", result.mle)])
        panels = [(f"{DIVERGENCES[d].name}: {result.rows[best[d] + 1, 1]:.2f} in the 0.25 mode", s[0])
                  for d, s in samples.items()]
        if not compare:
            figures[f"generated_{next(iter(samples))}.png"] = figure(points, panels)
        else:
            d_f = result.rows[:, COLUMNS.index("true D_f")]
            figures["compare.png"] = figure(points, [("MLE Gaussian", result.mle)] + panels, {
                DIVERGENCES[d].name: (t.bounds, d_f[best[d]], d_f[best[d] + 1]) for d, t in trainings.items()})
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
    schedule = Schedule(args.lr_gen, args.lr_disc, args.noise, args.steps)
    seed_keys = jax.vmap(lambda i: random.fold_in(train_key, i))(jnp.arange(args.seeds))    # seed i's, whatever --seeds
    log(f"training {args.seeds} generator(s) for each of {', '.join(args.divergences)}, {args.objective} objective:")
    trainings = train_runs(args.divergences, args.objective, schedule, seed_keys, data, args.batch_size,
                           args.start_width, log)
    result = evaluation(data, trainings, eval_key)
    if failed := report(result, trainings, log):
        log(f"error: training diverged ({', '.join(failed)}): try smaller --lr-gen and --lr-disc. Nothing was "
            "written.", file=sys.stderr)
        return 1
    settings = {k: getattr(args, k) for k in ("objective", *DEFAULTS["saddle"], "seed")}
    written = write_outputs(args.out, data, trainings, result, not args.no_plot, args.animate,
                            args.compare is not None, args.save_samples, settings)
    log(f"\nwritten: {', '.join(written) or 'nothing'}\ntime: {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))    # unwinds like Ctrl-C
    # read when JAX starts: one CPU device per core, so that runs are sharded over every core; LLVM at -O2 (README)
    os.environ["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={os.cpu_count()} "
                               "--xla_backend_optimization_level=2 " + os.environ.get("XLA_FLAGS", ""))
    # JAX's persistent compilation cache: a second run compiles nothing (JAX_ENABLE_COMPILATION_CACHE=false: off)
    jax.config.update("jax_compilation_cache_dir", os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "kl-forward-reverse"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    sys.exit(main())
