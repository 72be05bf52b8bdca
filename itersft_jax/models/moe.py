"""The sparse mixture-of-experts MLP of ``decoder.py`` (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE), dropless.

A sparse layer's MLP is ``SparseMoeBlock``: a router (``gate``: logits ``x @ W`` in the compute dtype, softmax in
fp32, the ``top_k`` experts of each token, their probabilities renormalised to sum to one with ``norm_topk_prob``
— Mixtral always renormalises, which is the same as a softmax over the top-k logits), the experts (SwiGLU MLPs
stored as ``[E, D, F]`` / ``[E, F, D]`` arrays: ``experts.gate_proj``, ``up_proj``, ``down_proj``), and for
Qwen2-MoE a shared expert (a dense MLP) scaled by ``sigmoid(shared_expert_gate(x))``. Which layers are sparse is
``MoESpec.sparse`` (Qwen's ``mlp_only_layers`` and ``decoder_sparse_step``); the others keep the dense MLP.

**Dropless**: every token reaches its ``k`` experts, so the outputs equal transformers' (which loops over the
experts). The ``N * k`` (token, expert) copies are sorted by expert and the experts run as one grouped matmul:
``jax.lax.ragged_dot`` on accelerators; on the CPU, where XLA lowers ``ragged_dot`` to a dense product with every
expert (E times the work, measured in ``benchmarks/moe_step.py``), each expert's rows are padded to blocks of
``block_rows`` and a loop over the blocks runs one expert's SwiGLU per block (``blocked_ffn``, a custom VJP that
skips the empty blocks). Padding tokens (segment id 0) route nowhere: their MLP output is 0 (the shared expert
aside) and they carry no load-balancing weight.

**Expert parallelism**: on a mesh with an ``expert`` axis (``use_mesh``) the block runs under ``shard_map``: each
device routes its own tokens, the tokens of its ``expert`` group are all-gathered, each device runs only its
``E / n`` experts on them and the partial outputs are summed back to their owners (a reduce-scatter) — tokens
travel, expert weights never do (``docs/scaling.md``).

**Load-balancing loss** (``load_balancing_loss``): transformers' ``load_balancing_loss_func`` — ``E * sum_e f_e *
P_e`` with ``f_e`` the fraction of top-k assignments to expert ``e`` and ``P_e`` its mean router probability, both
over the real tokens of every sparse layer. The blocks record what it needs (``RouterStats``) inside
``collect_router_stats``.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from itersft_jax.models.layers import activation

EXPERT_AXIS = "expert"  # the mesh axis experts are split over (shared.mesh_spec)
# The grouped matmul, read when a forward is traced: "auto" (the blocked loop on the CPU, ragged_dot elsewhere),
# "blocked" or "ragged" (benchmarks/moe_step.py compares them).
GROUPED_MATMUL = "auto"
# How a sparse layer runs on a mesh with an ``expert`` axis, read by ``use_mesh``: "tokens" (``shard_map``: tokens
# travel to the experts' devices) or "xla" (the plain program on expert-split weights: XLA's partitioner gathers the
# weights), compared in benchmarks/moe_step.py.
EXPERT_PARALLEL = "tokens"


@dataclasses.dataclass(frozen=True)
class MoESpec:
    """The sparse MLP of a decoder family (hashable: static model data)."""

    num_experts: int
    top_k: int
    intermediate_size: int             # each expert's hidden width
    norm_topk_prob: bool               # renormalise the top-k probabilities to sum to 1
    sparse: tuple[bool, ...]           # per layer: a sparse MoE block (True) or the dense MLP
    shared_expert_size: int = 0        # Qwen2-MoE: a dense MLP of this width on every token, sigmoid-gated
    aux_loss_coef: float | None = None  # router_aux_loss_coef when output_router_logits is on, else None
    names: str = "mlp"                 # checkpoint names: "mlp" (mlp.experts.{e}.gate_proj) or "mixtral"

    def __post_init__(self):
        if not 0 < self.top_k <= self.num_experts:
            raise ValueError(f"num_experts_per_tok={self.top_k} must be in [1, num_experts={self.num_experts}]")
        if self.names not in ("mlp", "mixtral"):
            raise ValueError(f"MoESpec.names must be 'mlp' or 'mixtral', got {self.names!r}")

    @property
    def num_sparse_layers(self) -> int:
        return sum(self.sparse)


def sparse_layers(config, num_experts: int) -> tuple[bool, ...]:
    """Qwen-MoE's rule: layer ``i`` is sparse unless it is in ``mlp_only_layers``, when ``num_experts > 0`` and
    ``(i + 1) % decoder_sparse_step == 0``."""
    step = int(getattr(config, "decoder_sparse_step", 1) or 1)
    dense = set(getattr(config, "mlp_only_layers", None) or ())
    return tuple(i not in dense and num_experts > 0 and (i + 1) % step == 0 for i in range(config.num_hidden_layers))


def aux_loss_coef(config) -> float | None:
    """``router_aux_loss_coef`` when the config turns the load-balancing loss on (``output_router_logits``)."""
    if not getattr(config, "output_router_logits", False):
        return None
    return float(getattr(config, "router_aux_loss_coef", 0.0) or 0.0)


# ----------------------------------------------------------------------------- collecting the router statistics


class RouterStats(nnx.Intermediate):
    """What one sparse layer's router contributes to the load-balancing loss (sown inside ``collect``)."""


_COLLECT: contextvars.ContextVar[bool] = contextvars.ContextVar("itersft_moe_collect", default=False)


class Stats(NamedTuple):
    """The load-balancing loss's sums over the real tokens of every sparse layer of one forward.

    ``probs_E``: router probabilities summed (differentiable); ``counts_E``: top-k assignments counted (no gradient);
    ``tokens``: real tokens times sparse layers (transformers' ``total_rows``)."""

    probs_E: jax.Array
    counts_E: jax.Array
    tokens: jax.Array

    def __add__(self, other: Stats) -> Stats:  # type: ignore[override]
        return Stats(*(a + b for a, b in zip(self, other)))


def collect_router_stats(model, fn):
    """``(fn(model), Stats or None)``: ``fn``'s result and the router statistics its forward recorded (``None`` when
    the model has no sparse layer)."""
    if not any(isinstance(m, SparseMoeBlock) for _, m in nnx.iter_modules(model)):
        return fn(model), None
    token = _COLLECT.set(True)
    try:
        out, sown = nnx.capture(fn, RouterStats)(model)
    finally:
        _COLLECT.reset(token)
    leaves = [leaf for leaf in jax.tree.leaves(sown)]
    stats = [Stats(*leaves[i:i + 3]) for i in range(0, len(leaves), 3)]
    return out, functools.reduce(lambda a, b: a + b, stats)


def load_balancing_loss(stats: Stats, counts_E: jax.Array | None = None, tokens: jax.Array | None = None):
    """transformers' ``load_balancing_loss_func``: ``E * sum_e (counts_e / tokens) * (probs_e / tokens)``.

    ``counts_E`` and ``tokens`` default to ``stats``' own; an update split into several micro-batches passes the
    whole update's (``core.train_step``), so the sum of each micro-batch's value is the update's loss."""
    counts_E = stats.counts_E if counts_E is None else counts_E
    tokens = jnp.maximum(stats.tokens if tokens is None else tokens, 1.0)
    return counts_E.shape[-1] * jnp.sum(jax.lax.stop_gradient(counts_E) * stats.probs_E) / (tokens * tokens)


# ----------------------------------------------------------------------------- routing and the grouped matmul


def route(logits_NE: jax.Array, top_k: int, norm_topk_prob: bool):
    """``(probs [N, E] fp32, top-k weights [N, k] fp32, top-k expert ids [N, k])``: softmax in fp32, the ``k``
    largest (ties: the lower id, as ``torch.topk`` on distinct values), renormalised with ``norm_topk_prob``."""
    probs_NE = jax.nn.softmax(logits_NE.astype(jnp.float32), axis=-1)
    weights_NK, ids_NK = jax.lax.top_k(probs_NE, top_k)
    if norm_topk_prob:
        weights_NK = weights_NK / jnp.sum(weights_NK, axis=-1, keepdims=True)
    return probs_NE, weights_NK, ids_NK


def block_rows(copies: int, experts: int) -> int:
    """Rows per block of the CPU grouped matmul: about half the mean rows per expert, a power of two in [8, 128]
    (padding costs at most ``experts * (block - 1)`` rows; bigger blocks are better GEMMs)."""
    per_expert = max(1, copies // max(1, 2 * experts))
    return int(min(128, max(8, 2 ** int(math.log2(per_expert)))))


def dispatch(ids_NK: jax.Array, keep_NK: jax.Array, num_experts: int, block: int):
    """Where each (token, expert) copy goes in the grouped layout: rows sorted by expert, each expert's group padded
    to a multiple of ``block`` rows. Returns ``(dest [N*k]`` — the row of each copy, ``rows`` for a dropped one —,
    ``source [rows]`` — the token of each row, ``N`` for an empty row —, ``group_sizes [E]``, ``block_expert``
    ``[rows / block]`` — each block's expert, ``E`` for an empty block —, ``rows``)."""
    n, k = ids_NK.shape
    copies = n * k
    flat_C = jnp.where(keep_NK, ids_NK, num_experts).reshape(-1).astype(jnp.int32)
    counts_E = jnp.bincount(flat_C, length=num_experts + 1)[:num_experts].astype(jnp.int32)
    num_blocks = -(-copies // block) + (num_experts if block > 1 else 0)
    rows = num_blocks * block
    padded_E = (counts_E + block - 1) // block * block
    pad_start_E = jnp.cumsum(padded_E) - padded_E
    row_start_E = jnp.cumsum(counts_E) - counts_E
    order_C = jnp.argsort(flat_C, stable=True)
    sorted_C = flat_C[order_C]
    expert_C = jnp.minimum(sorted_C, num_experts - 1)
    rank_C = jnp.arange(copies, dtype=jnp.int32) - row_start_E[expert_C]
    dest_sorted_C = jnp.where(sorted_C < num_experts, pad_start_E[expert_C] + rank_C, rows)
    dest_C = jnp.zeros(copies, jnp.int32).at[order_C].set(dest_sorted_C)
    source_R = jnp.full(rows, n, jnp.int32).at[dest_C].set(jnp.arange(copies, dtype=jnp.int32) // k, mode="drop")
    block_ends_E = jnp.cumsum(padded_E // block)
    block_expert = jnp.searchsorted(block_ends_E, jnp.arange(num_blocks), side="right").astype(jnp.int32)
    return dest_C, source_R, counts_E, block_expert, rows


def expert_mlp(x_ND, ids_NK, weights_NK, keep_NK, gate_EDF, up_EDF, down_EFD, act: str, *,
               blocked: bool | None = None) -> jax.Array:
    """``sum_k weights[n, k] * expert_{ids[n, k]}(x[n])`` over the copies ``keep`` marks (others add nothing),
    dropless; accumulated in fp32, returned in ``x``'s dtype. ``ids`` index the given experts (``[E_local, ...]``).
    ``blocked``: the CPU's blocked loop (default: on the CPU backend) or ``ragged_dot``."""
    from itersft_jax.models.layers import cpu_tuned_matmuls

    n, k = ids_NK.shape
    num_experts = gate_EDF.shape[0]
    if blocked is None:
        blocked = cpu_tuned_matmuls() if GROUPED_MATMUL == "auto" else GROUPED_MATMUL == "blocked"
    block = block_rows(n * k, num_experts) if blocked else 1
    dest_C, source_R, counts_E, block_expert, rows = dispatch(ids_NK, keep_NK, num_experts, block)
    x_RD = jnp.take(x_ND, source_R, axis=0, mode="fill", fill_value=0)
    if blocked:
        y_RD = blocked_ffn(x_RD.reshape(-1, block, x_ND.shape[-1]), block_expert, gate_EDF, up_EDF, down_EFD,
                           act).reshape(rows, -1)
    else:
        y_RD = ragged_ffn(x_RD, counts_E, gate_EDF, up_EDF, down_EFD, act)
    y_NKD = jnp.take(y_RD, dest_C, axis=0, mode="fill", fill_value=0).reshape(n, k, -1)
    w_NK = jnp.where(keep_NK, weights_NK.astype(jnp.float32), 0.0)
    return jnp.einsum("nkd,nk->nd", y_NKD.astype(jnp.float32), w_NK).astype(x_ND.dtype)


def _dot(a, b):
    return jnp.dot(a, b, preferred_element_type=jnp.float32)


def ragged_ffn(x_RD, counts_E, gate_EDF, up_EDF, down_EFD, act: str):
    """The experts' SwiGLU on rows grouped by expert (``counts_E`` rows each, in order) through
    ``jax.lax.ragged_dot`` (accelerators); rows past the groups give zeros."""
    dt = x_RD.dtype

    def gmm(a, w):
        return jax.lax.ragged_dot(a, w.astype(dt), counts_E, preferred_element_type=jnp.float32).astype(dt)

    h_RF = activation(act)(gmm(x_RD, gate_EDF)) * gmm(x_RD, up_EDF)
    y_RD = gmm(h_RF, down_EFD)
    inside_R = jnp.arange(x_RD.shape[0]) < jnp.sum(counts_E)
    return jnp.where(inside_R[:, None], y_RD, 0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def blocked_ffn(x_NBD, block_expert_N, gate_EDF, up_EDF, down_EFD, act: str):
    """``y[b] = down_e(act(x[b] @ gate_e) * (x[b] @ up_e))`` for each block ``b`` of rows with its expert ``e =
    block_expert[b]``; blocks with ``e == E`` are empty (zeros, not computed). A loop over blocks, each a dense GEMM
    of one expert's weights: the CPU's grouped matmul. The backward loop accumulates each expert's weight gradient
    in place (fp32)."""
    return _blocked_fwd(x_NBD, block_expert_N, gate_EDF, up_EDF, down_EFD, act)[0]


def _blocked_fwd(x_NBD, block_expert_N, gate_EDF, up_EDF, down_EFD, act):
    num_experts, dt = gate_EDF.shape[0], x_NBD.dtype
    b, f = x_NBD.shape[1], gate_EDF.shape[-1]

    def run(x_BD, e):
        g_BF = _dot(x_BD, gate_EDF[e].astype(dt)).astype(dt)
        u_BF = _dot(x_BD, up_EDF[e].astype(dt)).astype(dt)
        y_BD = _dot(activation(act)(g_BF) * u_BF, down_EFD[e].astype(dt)).astype(dt)
        return y_BD, g_BF, u_BF

    def skip(x_BD, e):
        zero_BF = _varying_like(jnp.zeros((b, f), dt), x_BD, gate_EDF, up_EDF, down_EFD)
        return _varying_like(jnp.zeros_like(x_BD), x_BD, gate_EDF, up_EDF, down_EFD), zero_BF, zero_BF

    def body(_, inp):
        x_BD, e = inp
        return None, jax.lax.cond(e < num_experts, run, skip, x_BD, e)

    _, (y_NBD, g_NBF, u_NBF) = jax.lax.scan(body, None, (x_NBD, block_expert_N))
    return y_NBD, (x_NBD, block_expert_N, g_NBF, u_NBF, gate_EDF, up_EDF, down_EFD)


def _blocked_bwd(act, residuals, dy_NBD):
    x_NBD, block_expert_N, g_NBF, u_NBF, gate_EDF, up_EDF, down_EFD = residuals
    num_experts, dt = gate_EDF.shape[0], x_NBD.dtype
    act_fn = activation(act)

    def run(carry, x_BD, e, g_BF, u_BF, dy_BD):
        d_gate, d_up, d_down = carry
        a_BF, act_vjp = jax.vjp(act_fn, g_BF)
        h_BF = a_BF * u_BF
        dh_BF = _dot(dy_BD, down_EFD[e].astype(dt).T).astype(dt)
        du_BF = dh_BF * a_BF
        dg_BF = act_vjp(dh_BF * u_BF)[0]
        dx_BD = (_dot(dg_BF, gate_EDF[e].astype(dt).T) + _dot(du_BF, up_EDF[e].astype(dt).T)).astype(dt)
        carry = (d_gate.at[e].add(_dot(x_BD.T, dg_BF)), d_up.at[e].add(_dot(x_BD.T, du_BF)),
                 d_down.at[e].add(_dot(h_BF.T, dy_BD)))
        return carry, dx_BD

    def skip(carry, x_BD, e, g_BF, u_BF, dy_BD):
        return carry, _varying_like(jnp.zeros_like(x_BD), *everything)

    def body(carry, inp):
        e = inp[1]
        return jax.lax.cond(e < num_experts, run, skip, carry, *inp)

    everything = (x_NBD, dy_NBD, g_NBF, gate_EDF, up_EDF, down_EFD)
    zeros = tuple(_varying_like(jnp.zeros(w.shape, jnp.float32), *everything) for w in (gate_EDF, up_EDF, down_EFD))
    (d_gate, d_up, d_down), dx_NBD = jax.lax.scan(body, zeros, (x_NBD, block_expert_N, g_NBF, u_NBF, dy_NBD))
    grads = [_summed_like(d.astype(w.dtype), w) for d, w in ((d_gate, gate_EDF), (d_up, up_EDF), (d_down, down_EFD))]
    return (_summed_like(dx_NBD, x_NBD), None, *grads)


blocked_ffn.defvjp(_blocked_fwd, _blocked_bwd)


def _varying_axes(value) -> set:
    return set(getattr(getattr(jax.typeof(value), "manual_axis_type", None), "varying", None) or ())


def _summed_like(cotangent, primal):
    """A cotangent summed over the manual mesh axes it varies over and its primal does not (inside ``shard_map``: the
    gradient of a value every device of those axes shares is the sum of theirs)."""
    axes = tuple(sorted(_varying_axes(cotangent) - _varying_axes(primal)))
    return jax.lax.psum(cotangent, axes) if axes else cotangent


def _varying_like(value, *refs):
    """``value`` typed as varying over every manual mesh axis any of ``refs`` varies over (inside ``shard_map``; the
    branches of a ``cond`` and a loop's carry must agree), else as it is."""
    axes = set().union(*(_varying_axes(ref) for ref in refs)) - _varying_axes(value)
    return jax.lax.pcast(value, tuple(sorted(axes)), to="varying") if axes else value


# ----------------------------------------------------------------------------- modules


class Router(nnx.Module):
    """The router (HF ``mlp.gate``): ``logits = x @ weight``, ``weight`` ``[D, E]`` (HF's ``[E, D]`` transposed).
    Not an ``nnx.Linear``: LoRA never adapts it (PEFT cannot either: transformers' router is no ``nn.Linear``)."""

    def __init__(self, d: int, num_experts: int, init, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.weight = nnx.Param(init(rngs.params(), (d, num_experts), param_dtype))
        self.dtype = dtype

    def __call__(self, x_ND):
        return _dot(x_ND.astype(self.dtype), self.weight[...].astype(self.dtype)).astype(self.dtype)


class Experts(nnx.Module):
    """The experts' SwiGLU weights, stacked: ``gate_proj``/``up_proj`` ``[E, D, F]``, ``down_proj`` ``[E, F, D]``."""

    def __init__(self, moe: MoESpec, d: int, init, *, param_dtype, rngs: nnx.Rngs):
        e, f = moe.num_experts, moe.intermediate_size
        self.gate_proj = nnx.Param(init(rngs.params(), (e, d, f), param_dtype))
        self.up_proj = nnx.Param(init(rngs.params(), (e, d, f), param_dtype))
        self.down_proj = nnx.Param(init(rngs.params(), (e, f, d), param_dtype))


class SparseMoeBlock(nnx.Module):
    """A sparse layer's MLP: router, dropless experts and (Qwen2-MoE) the gated shared expert. ``shared``: that
    expert's module (``decoder.MLP``), built by the decoder."""

    def __init__(self, moe: MoESpec, d: int, act: str, init, kw: dict, shared=None):
        self.gate = Router(d, moe.num_experts, init, **kw)
        self.experts = Experts(moe, d, init, param_dtype=kw["param_dtype"], rngs=kw["rngs"])
        if shared is not None:
            self.shared_expert = shared
            self.shared_expert_gate = nnx.Linear(d, 1, use_bias=False, kernel_init=init, **kw)
        self.has_shared = shared is not None
        self.top_k, self.norm_topk_prob, self.act = moe.top_k, moe.norm_topk_prob, act
        self.mesh = None  # a jax.sharding.Mesh with an ``expert`` axis: expert parallelism (``use_mesh``)

    def __call__(self, x_BTD, segment_ids_BT):
        from itersft_jax.models.layers import dense

        shape = x_BTD.shape
        x_ND = x_BTD.reshape(-1, shape[-1])
        valid_N = segment_ids_BT.reshape(-1) != 0
        probs_NE, weights_NK, ids_NK = route(self.gate(x_ND), self.top_k, self.norm_topk_prob)
        keep_NK = jnp.broadcast_to(valid_N[:, None], ids_NK.shape)
        experts = self.experts
        weights = (experts.gate_proj[...], experts.up_proj[...], experts.down_proj[...])
        if self.mesh is not None and _parallel_size(self.mesh, x_ND.shape[0]) > 1:
            y_ND = expert_parallel_mlp(self.mesh, x_ND, ids_NK, weights_NK, keep_NK, *weights, self.act)
        else:
            y_ND = expert_mlp(x_ND, ids_NK, weights_NK, keep_NK, *weights, self.act)
        if _COLLECT.get():
            w_N1 = valid_N[:, None].astype(jnp.float32)
            counts_E = jnp.sum(jax.nn.one_hot(ids_NK, probs_NE.shape[-1], dtype=jnp.float32) * w_N1[..., None],
                               axis=(0, 1))
            self.sow(RouterStats, "router_stats", (jnp.sum(probs_NE * w_N1, axis=0),
                                                   jax.lax.stop_gradient(counts_E), jnp.sum(w_N1)))
        if self.has_shared:
            gate_N1 = jax.nn.sigmoid(dense(self.shared_expert_gate, x_ND))
            y_ND = y_ND + gate_N1 * self.shared_expert(x_ND)
        return y_ND.reshape(shape)


def use_mesh(model, mesh) -> None:
    """Run ``model``'s sparse blocks expert-parallel on ``mesh`` (a mesh with an ``expert`` axis of size > 1), or
    plainly (``None``, or a mesh without one). The mesh becomes static model data (part of the graphdef)."""
    n_expert = 1 if mesh is None else dict(mesh.shape).get(EXPERT_AXIS, 1)
    for _, module in nnx.iter_modules(model):
        if isinstance(module, SparseMoeBlock):
            num_experts = module.experts.gate_proj.shape[0]
            if num_experts % n_expert:
                raise ValueError(f"`mesh`: the expert axis ({n_expert} devices) must divide the model's "
                                 f"{num_experts} experts")
            module.mesh = mesh if n_expert > 1 and EXPERT_PARALLEL == "tokens" else None


# ----------------------------------------------------------------------------- expert parallelism


def _token_axes(mesh) -> tuple[str, ...]:
    """The mesh axes a micro-batch's tokens are split over inside the block: every axis but ``tensor``."""
    return tuple(a for a in mesh.axis_names if a != "tensor")


def _parallel_size(mesh, tokens: int) -> int:
    """How many token groups the block splits ``tokens`` into (1: run it plainly — a count the groups do not divide,
    e.g. a decode step's few slots)."""
    groups = math.prod(dict(mesh.shape)[a] for a in _token_axes(mesh))
    return groups if tokens % groups == 0 else 1


def expert_parallel_mlp(mesh, x_ND, ids_NK, weights_NK, keep_NK, gate_EDF, up_EDF, down_EFD, act: str):
    """``expert_mlp`` with the experts split over the mesh's ``expert`` axis (``shard_map``).

    Each device holds the tokens of its row slice (every axis but ``tensor``) and ``E / n_expert`` experts. The
    tokens of its ``expert`` group are all-gathered (with their routing), each device runs its own experts on the
    copies routed to them (the others are dropped locally, computed by their owner) and the partial sums go back to
    the tokens' devices by a reduce-scatter over ``expert``. Weights arrive as the rule table splits them: ``fsdp``
    slices of ``D`` are all-gathered first, a ``tensor`` slice of ``F`` gives a partial sum reduced over ``tensor``.
    """
    from jax.sharding import PartitionSpec as P

    rows = _token_axes(mesh)
    sizes = dict(mesh.shape)
    num_experts = gate_EDF.shape[0]
    n_expert = sizes.get(EXPERT_AXIS, 1)
    if num_experts % n_expert:
        raise ValueError(f"num_experts={num_experts} is not a multiple of the mesh's expert axis ({n_expert})")
    d, f = gate_EDF.shape[1], gate_EDF.shape[2]
    fsdp = "fsdp" if d % sizes.get("fsdp", 1) == 0 and sizes.get("fsdp", 1) > 1 else None
    tensor = "tensor" if f % sizes.get("tensor", 1) == 0 and sizes.get("tensor", 1) > 1 else None
    local_experts = num_experts // n_expert

    def local(x_nD, ids_nK, w_nK, keep_nK, gate_eDF, up_eDF, down_eFD):
        if fsdp is not None:
            gate_eDF = jax.lax.all_gather(gate_eDF, fsdp, axis=1, tiled=True)
            up_eDF = jax.lax.all_gather(up_eDF, fsdp, axis=1, tiled=True)
            down_eFD = jax.lax.all_gather(down_eFD, fsdp, axis=2, tiled=True)
        gathered = [jax.lax.all_gather(a, EXPERT_AXIS, axis=0, tiled=True)
                    for a in (x_nD, ids_nK, w_nK, keep_nK.astype(jnp.int32))]
        x_gD, ids_gK, w_gK, keep_gK = gathered
        keep_gK = keep_gK != 0
        first = jax.lax.axis_index(EXPERT_AXIS) * local_experts
        mine_gK = keep_gK & (ids_gK >= first) & (ids_gK < first + local_experts)
        y_gD = expert_mlp(x_gD, jnp.where(mine_gK, ids_gK - first, 0), w_gK, mine_gK, gate_eDF, up_eDF, down_eFD,
                          act).astype(jnp.float32)
        if tensor is not None:
            y_gD = jax.lax.psum(y_gD, tensor)
        return jax.lax.psum_scatter(y_gD, EXPERT_AXIS, scatter_dimension=0, tiled=True).astype(x_nD.dtype)

    token_spec = P(rows, None)
    weight_in = P(EXPERT_AXIS, fsdp, tensor)
    weight_out = P(EXPERT_AXIS, tensor, fsdp)
    fn = jax.shard_map(local, mesh=mesh, in_specs=(token_spec,) * 4 + (weight_in, weight_in, weight_out),
                       out_specs=token_spec)
    return fn(x_ND, ids_NK, weights_NK, keep_NK, gate_EDF, up_EDF, down_EFD)


# ----------------------------------------------------------------------------- HF names


def expert_rows(moe: MoESpec, prefix: str, path: tuple, d: int):
    """The checkpoint rows of one sparse block's router and experts: ``(rows, fused_rows)`` — the per-expert tensors
    transformers' ``save_pretrained`` writes (Mixtral's ``block_sparse_moe.experts.{e}.w1/w3/w2``, the others'
    ``mlp.experts.{e}.gate_proj/up_proj/down_proj``), and the fused ``[E, 2F, D]`` / ``[E, D, F]`` tensors of a
    transformers 5 model in memory (``mlp.experts.gate_up_proj`` / ``down_proj``), which read into the same
    parameters."""
    from itersft_jax.models import mapping

    e, f = moe.num_experts, moe.intermediate_size
    experts = (*path, "experts")
    block = f"{prefix}block_sparse_moe." if moe.names == "mixtral" else f"{prefix}mlp."
    names = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"} if moe.names == "mixtral" else {}
    rows = [mapping.tensor(f"{block}gate.weight", (*path, "gate", "weight"), (e, d), transpose=True)]
    for j in range(e):
        for proj, shape in (("gate_proj", (f, d)), ("up_proj", (f, d)), ("down_proj", (d, f))):
            rows.append(mapping.HFTensor(f"{block}experts.{j}.{names.get(proj, proj)}.weight", shape,
                                         ((*experts, proj),), transpose=True, expert=j))
    fused = [mapping.tensor(f"{prefix}mlp.gate.weight", (*path, "gate", "weight"), (e, d), transpose=True),
             mapping.HFTensor(f"{prefix}mlp.experts.gate_up_proj", (e, 2 * f, d),
                              ((*experts, "gate_proj"), (*experts, "up_proj")), True, (f, f), split_axis=1),
             mapping.tensor(f"{prefix}mlp.experts.down_proj", (*experts, "down_proj"), (e, d, f), transpose=True)]
    return rows, fused
