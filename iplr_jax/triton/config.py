"""Kernel configurations of the Triton backend: frozen, hashable values, one rule per kernel.

A config travels as a static argument, so each value compiles its own kernels and a jit cache
never serves one config's kernels to another. Every field left `None` is filled by the rule
from the shapes and dtypes (`chunk_config`, `fused_recurrent_config`); set a field to override
that rule for one call, e.g. `iplr_jax.chunk(..., config=ChunkConfig(fuse_output=False))`.
The measurements behind each rule are in benchmarks/NOTES.md.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax

from iplr_jax.triton.helpers import is_low

# Streaming multiprocessors of the H100 the rules were tuned on; only steers block sizes.
NUM_SMS = 132
# Registers hold about this many float32 state elements per program (the [Kp, BV] slab).
STATE_ELEMENTS = 8192


@dataclasses.dataclass(frozen=True)
class ChunkConfig:
    """Blocks and choices of the chunked path's kernels (`None`: the rule decides). Checked at
    the call: V-blocks are powers of two from 16 to the padded V, warps 1 to 16 (powers of two).

    WY kernel (`wy_fast`): `wy_warps`, `wy_block_v` (V-block of U = P V inside the kernel),
    `wy_precision` of its float32 16 x 16 block products ("highest" or "tf32x3").
    State sweep (`chunk._state_kernel`): `state_block_v`, `state_warps`, `state_stages`;
    `low_precision_state`: its products with the state (W S0, B^T V2) take 16-bit operands for
    16-bit inputs (the state stays float32; no effect on float32 inputs); on by the rule where
    the sweep's programs do not fill the GPU.
    Output: `fuse_output` (computed in the sweep rather than by `_output_kernel`; never with
    the gate `gk`, whatever the field says),
    `output_block_v`, `output_warps`; `low_precision_v2`: the output's incl(Q B^T) V2 in the
    inputs' 16-bit dtype.
    Backward (`chunk_bwd`): `bwd_kernels` (False: the same equations in jnp; with the gate
    `gk`: the VJP of the jnp chunked form), the reverse sweep's
    `bwd_sweep_block_v`, `bwd_sweep_warps`, `bwd_sweep_stages`, the intra-chunk kernel's
    `bwd_intra_block_v`, `bwd_intra_warps`.
    Segments (`segments`): `segment_chunks` cuts every sequence into runs of at most that many
    chunks whose state sweeps (forward and backward) run in parallel, for long sequences at
    small batch; 0 sweeps each sequence whole. The rule: 0 on one device; in a slice of a
    context-parallel call, segments for about NUM_SMS / 2 chains when the sequences and heads
    give fewer (the slice's summary then comes from the segments'). Ignored with the gate `gk`.
    `f32_dots`: the precision of the products whose operands are float32 (all of them for
    float32 inputs; the state products W S0, B^T V2 for 16-bit ones): "tf32" (the GPU's
    default matmul precision) or "highest" (float32 accuracy); the rule follows
    `jax.default_matmul_precision` (docs/numerics.md).
    Gate: `gate_factored` computes the gated kernels' diagonal 16-row blocks as one product of
    decayed operands wherever the block's decay allows it (pairwise elsewhere; docs/gate.md);
    False: always pairwise. `gate_chunk_factored` (default on): each chunk whose decay stays
    within `gate.FACTOR_BOUND` of its middle row takes the WY kernel's whole-chunk mode and the
    output kernel's whole-chunk tiles, the others the blockwise ones (bf16 and float32 inputs);
    for bf16 the backward runs as the IPLR kernels on decayed operands when every chunk
    qualifies (one `lax.cond`; `gate_factors`), else the blockwise gated kernels.
    """

    wy_warps: int | None = None
    wy_block_v: int | None = None
    wy_precision: Literal["highest", "tf32x3"] | None = None
    state_block_v: int | None = None
    state_warps: int | None = None
    state_stages: int | None = None
    low_precision_state: bool | None = None
    fuse_output: bool | None = None
    output_block_v: int | None = None
    output_warps: int | None = None
    low_precision_v2: bool | None = None
    bwd_kernels: bool | None = None
    bwd_sweep_block_v: int | None = None
    bwd_sweep_warps: int | None = None
    bwd_sweep_stages: int | None = None
    bwd_intra_block_v: int | None = None
    bwd_intra_warps: int | None = None
    f32_dots: Literal["tf32", "highest"] | None = None
    segment_chunks: int | None = None
    gate_factored: bool | None = None
    gate_chunk_factored: bool | None = None


@dataclasses.dataclass(frozen=True)
class FusedRecurrentConfig:
    """Blocks of the fused recurrence's kernels (`None`: the rule decides): the forward's and
    the backward's V-block and warps, and how many tokens ahead rows are loaded (`prefetch`)."""

    fwd_block_v: int | None = None
    fwd_warps: int | None = None
    bwd_block_v: int | None = None
    bwd_warps: int | None = None
    prefetch: int | None = None


def default_f32_dots() -> str:
    """"highest" inside `jax.default_matmul_precision("highest" | "float32")`, else "tf32"."""
    p = jax.config.jax_default_matmul_precision
    return "highest" if str(p).lower() in ("highest", "float32", "precision.highest") else "tf32"


def _checked(config, Vp: int, interpret: bool | None = None):
    """`config` after its rules, every field checked: a V-block that does not tile the padded V
    would compute NaN or fail deep inside a kernel, an unknown precision would fall back to tf32
    unasked."""
    name = type(config).__name__
    for f in dataclasses.fields(config):
        x = getattr(config, f.name)

        def bad(want, f=f, x=x):
            return ValueError(f"{name}.{f.name} must be {want}, got {x!r}")

        is_int = isinstance(x, int) and not isinstance(x, bool)
        if f.name.endswith("block_v") and not (is_int and 16 <= x <= Vp and x & (x - 1) == 0):
            raise bad(f"a power of two from 16 to the padded value size {Vp}")
        if f.name.endswith("warps") and x not in (1, 2, 4, 8, 16):
            raise bad("1, 2, 4, 8 or 16")
        if f.name.endswith("stages") and not (is_int and x >= 1):
            raise bad("an int >= 1")
        if f.name in ("segment_chunks", "prefetch") and not (is_int and x >= 0):
            raise bad("an int >= 0")
        if "bool" in str(f.type) and not isinstance(x, bool):
            raise bad("True, False or None")
    if getattr(config, "f32_dots", "tf32") not in ("tf32", "highest"):
        raise ValueError(f"{name}.f32_dots must be 'tf32' or 'highest', got {config.f32_dots!r}")
    wy = getattr(config, "wy_precision", "highest")
    if wy not in ("highest", "tf32x3"):
        raise ValueError(f"{name}.wy_precision must be 'highest' or 'tf32x3', got {wy!r}")
    if interpret and getattr(config, "wy_precision", None) == "tf32x3":
        raise ValueError(f"{name}.wy_precision='tf32x3' needs compiled kernels (no tf32 in the interpreter)")
    return config


def _fill(config, **rules):
    """`config` with each None field replaced by its rule (a zero-argument callable)."""
    values = {}
    for name, rule in rules.items():
        given = getattr(config, name)
        values[name] = rule() if given is None else given
    return dataclasses.replace(config, **values)


def _sweep_block_v(N: int, H: int, Kp: int, Vp: int) -> int:
    """V-block of a sequential sweep over chunks: its [Kp, BV] float32 carry plus the [C, Kp]
    tiles must fit in registers (BV <= 8192 / Kp); below that, smaller BV until the
    N * H * Vp / BV programs fill the SMs, since each program is one dependent chain."""
    bv = min(Vp, max(16, STATE_ELEMENTS // Kp))
    while bv > 16 and N * H * (Vp // bv) < NUM_SMS:
        bv //= 2
    return bv


def chunk_config(
    config: ChunkConfig | None, *, N: int, H: int, Kp: int, Vp: int, num_chunks: int, dtype,
    interpret: bool, gated: bool = False, context_parallel: bool = False,
) -> ChunkConfig:
    """The chunked path's config for N sequences of `num_chunks` chunks in all, H heads, padded
    head sizes Kp, Vp and input dtype `dtype` (`gated`: with the DPLR gate; `context_parallel`:
    for one slice of a T-sharded call), with the fields of `config` kept."""
    c = config or ChunkConfig()
    low = is_low(dtype)
    # The substitution's reductions over 16 x 16 tiles want few warps; Kp = 256 tiles more.
    # tf32x3 only where it was measured correct (16-bit inputs, Kp <= 128, compiled): float32
    # inputs at Kp = 128 gave a 15% output error on the H100 (benchmarks/NOTES.md), and the
    # interpreter has no tf32.
    # Segments off unless asked for: on an H100 the sweeps measured throughput-bound, not
    # chain-bound, so the extra summary sweep costs more than the parallelism gains (B1 T32k H8
    # K=V=128: forward 1.93 ms whole, 1.83-2.07 cut; T256k H16: 20.1 whole, 23.6-27.0 cut;
    # benchmarks/NOTES.md, session 8)
    # Under context parallelism the slice's summary is paid anyway, and taking it from segment
    # summaries makes the segmented sweeps free. Cut for about NUM_SMS / 2 chains: 4 segments
    # at N1 H16 (one 128k slice, K=V=128 bf16, H100: forward summary + sweep 8.49 -> 6.88 ms,
    # backward 8.93 -> 5.69; finer cuts slowed the summary sweeps; benchmarks/NOTES.md, session
    # 13). Not with the gate (whole sweeps).
    cuts = NUM_SMS // (2 * max(N, 1) * H) if context_parallel and not gated else 0  # per sequence
    c = _fill(c, segment_chunks=lambda: -(-num_chunks // (max(N, 1) * cuts)) if cuts > 1 else 0)
    if not isinstance(c.segment_chunks, int) or c.segment_chunks < 0:
        raise ValueError(f"ChunkConfig.segment_chunks must be an int >= 0, got {c.segment_chunks!r}")
    # the sweeps' independent chains: sequences, or segments when they are cut
    chains_n = max(N, -(-num_chunks // c.segment_chunks)) if c.segment_chunks and not gated else N
    c = _fill(
        c,
        # gated: the blockwise mode's pairwise diagonal blocks hold several [16, 16, 16] float32
        # tiles (4096 elements each: 64 registers a thread at 2 warps), and the whole-chunk mode
        # keeps its decayed blocks live: 4 warps (S1, H100: 0.626 ms against 0.743 at 2 warps
        # for the whole-chunk mode; benchmarks/NOTES.md, session 11)
        wy_warps=lambda: 2 if Kp <= 128 and not gated else 4,
        wy_block_v=lambda: min(Vp, 64),
        wy_precision=lambda: "tf32x3" if low and Kp <= 128 and not interpret else "highest",
        state_block_v=lambda: _sweep_block_v(chains_n, H, Kp, Vp),
        low_precision_v2=lambda: low,
        f32_dots=default_f32_dots,
        gate_factored=lambda: True,
        gate_chunk_factored=lambda: True,
    )
    programs = N * H * (Vp // c.state_block_v)
    # Fusing the output adds Q K^T, Q B^T and three more dots to every step of the sequential
    # chain; it pays only when the sweep already fills the SMs, each program walks few chunks
    # and the [C, Kp] products are small: Kp <= 64 (measured at S1-S3).
    # With the gate the output's pairwise diagonal blocks would lengthen every step: never fused.
    fuse = programs >= NUM_SMS and num_chunks / max(N, 1) <= 64 and Kp <= 64 and not gated
    # 16-bit state operands shorten the sweep's step where the step is the bound (fewer programs
    # than SMs): S3 forward 1.95 -> 1.49 ms, error 3.7e-3 -> 4.7e-3; with the SMs full they
    # measured no faster (S1 0.435 -> 0.427, S2 0.937 -> 0.997; benchmarks/NOTES.md, session 9)
    c = _fill(c, fuse_output=lambda: fuse, low_precision_state=lambda: programs < NUM_SMS)
    c = _fill(
        c,
        # the fused step holds Q, K, B tiles and two [C, C] products besides S: more warps
        state_warps=lambda: (
            8 if Kp * c.state_block_v >= STATE_ELEMENTS or (c.fuse_output and Kp >= 128) else 4
        ),
        # two stages double-buffer the [C, Kp] tiles: ~200 KB of shared memory at Kp = 256
        state_stages=lambda: 2 if Kp <= 128 else 1,
        # [C, Kp] tiles of Q, K, B, h [Kp, BV] and O [C, BV]: one V-block of 128 at Kp <= 128
        output_block_v=lambda: min(Vp, 128, 16384 // Kp),
        output_warps=lambda: 4 if Kp <= 128 else 8,
        # Kp = 256: the kernels' [C, Kp] dot operands exceed shared memory (K = 200, float32:
        # 384 KB requested, 227 KB available), so the backward runs in jnp there (with the gate:
        # the jnp form's VJP). Gated S1 forward+backward on an H100: kernels 13.4 ms, the jnp
        # form's VJP 25.1 (benchmarks/NOTES.md, session 9). Float32 inputs at f32_dots="highest":
        # the intra kernel's three-tf32 [C, Kp] products asked for 416 KB of shared memory on an
        # H100, so the equations run in jnp at HIGHEST there.
        bwd_kernels=lambda: Kp <= 128 and (low or c.f32_dots != "highest"),
        bwd_sweep_block_v=lambda: _sweep_block_v(chains_n, H, Kp, Vp),
    )
    c = _fill(
        c,
        bwd_sweep_warps=lambda: 8 if Kp * c.bwd_sweep_block_v >= STATE_ELEMENTS else 4,
        bwd_sweep_stages=lambda: 2 if Kp <= 128 else 1,
        # all of V up to 128 (one block, no partial sums) unless [C, Kp] tiles fill registers
        bwd_intra_block_v=lambda: min(Vp, 128 if Kp <= 128 else 64),
        bwd_intra_warps=lambda: 8,
    )
    return _checked(c, Vp, interpret)


def fused_recurrent_config(
    config: FusedRecurrentConfig | None, *, pairs: int, Kp: int, Vp: int
) -> FusedRecurrentConfig:
    """The fused recurrence's config for `pairs` = sequences x heads programs per V-block.

    Forward: V-blocks of 32 columns (splitting further to occupy more SMs measured slower).
    Backward: the widest block that fits (8192 state elements), halved while there are fewer
    than 512 programs, down to 16 at Kp <= 64 and 32 above. Each V-block adds a float32
    [L, H, Kp] partial of dk, db, dq and da, so the halving stops once programs are many.
    Rows are loaded two tokens ahead (`helpers.prefetched_loop`).
    """
    c = config or FusedRecurrentConfig()

    def bwd_block_v():
        bv, smallest = min(Vp, STATE_ELEMENTS // Kp), (16 if Kp <= 64 else 32)
        while bv > smallest and pairs * (Vp // bv) < 512:
            bv //= 2
        return bv

    c = _fill(c, fwd_block_v=lambda: min(Vp, 32), bwd_block_v=bwd_block_v, prefetch=lambda: 2)
    c = _fill(
        c,
        fwd_warps=lambda: max(2, min(8, Kp * c.fwd_block_v // 1024)),
        bwd_warps=lambda: max(1, min(8, Kp * c.bwd_block_v // 2048)),
    )
    return _checked(c, Vp)
