"""Shared fixtures: which implementations run here, float64 oracle, random IPLR inputs.

Every property test is one body parametrised over `CHUNK_IMPLS` / `RECURRENT_IMPLS`: the xla
path and the Pallas kernels through the interpreter everywhere, the compiled kernels where a
GPU is present. GPU-only cases carry the `gpu` marker and show up as skipped (with the
reason) on CPU; heavy cases carry `slow` and run with `--runslow`.

The CPU backend is split into 8 simulated devices before jax is imported, so the multi-device
tests run on any machine; single-device tests use the first device and are unaffected.
Two tiers: the default run skips `slow` cases (and the `HEAVY` list below); `--runslow` runs
everything (CI's second command; the GPU check).
"""

from __future__ import annotations

import os
import re
import zlib

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
# The interpreted kernels make the CPU tests compile-bound; unoptimised CPU code compiles about
# 1.5x faster and computes the same numbers to rounding (GPU code is not affected).
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_enable_x64", True)

from iplr_jax.inputs import has_gpu  # noqa: E402

GPU = has_gpu()
CHUNK_IMPLS = ["xla", "interpret"] + (["pallas"] if GPU else [])
RECURRENT_IMPLS = ["xla", "interpret"] + (["pallas"] if GPU else [])


# The heavy tier: cases that repeat what a faster case of the same test already checks on another
# shape or implementation, and a few slow single cases (a positive gate through the gated
# backward kernels, a traced scale under context parallelism), so the default run stays within
# 5 minutes on 2 CPU cores (README). They run with --runslow (CI's second command, and the GPU
# check); patterns match test ids.
HEAVY = [
    r"test_gate\.py::test_chunk_backward_kernels\[(mixed|chunk_factored_packed|chunk_factored_by_chunk|k32_v200|positive)-",
    r"test_context_parallel\.py::test_cp_kernels_traced_scale_and_config\[interpret\]",
    # both settings: the default rule already gives the interpreted fast-tier cases 16-bit state
    # operands (their sweeps have fewer programs than SMs)
    r"test_chunk\.py::test_low_precision_state_both_ways\[",
    r"test_chunk\.py::test_forward_matches_reference\[(c64_no_h0|c64_K100)-",
    r"test_chunk\.py::test_forward_matches_reference\[(c16_delta-interpret|c32_K60_V20-xla|c64_K200_V130)",
    r"test_chunk\.py::test_packed_sequences_traced\[(16-xla|16-interpret|64-interpret|64-xla)\]",
    r"test_chunk\.py::test_chunk_fwd_residuals\[(bfloat16-False|float32-True)\]",
    r"test_chunk\.py::test_output_variants_public_path\[(float32-20-16-True|bfloat16-20-100-False)\]",
    r"test_chunk\.py::test_wy_kernel\[(True|False)-(16|32)\]",
    r"test_chunk_bwd\.py::test_reference_backward_matches_autodiff\[(False-case[01345]|True-case[1234])\]",
    r"test_chunk_bwd\.py::test_kernels_match_reference_backward\[(float32-case[023]|bfloat16-case[012])\]",
    r"test_chunk_bwd\.py::test_kernels_kp256\[",
    r"test_chunk_bwd\.py::test_chunk_gradients\[case[0134567]-xla\]",
    r"test_chunk_bwd\.py::test_chunk_gradients\[case[13567]-interpret\]",
    r"test_chunk_bwd\.py::test_chunk_gradients_transforms\[",
    r"test_fused_recurrent\.py::test_matches_reference\[(k60_v20|k200_v130|bf16)-xla\]",
    r"test_fused_recurrent\.py::test_matches_reference\[(batch|decode)-interpret\]",
    r"test_fused_recurrent\.py::test_matches_reference\[(bf16|no_state|k200_v130)-interpret\]",
    r"test_fused_recurrent\.py::test_(packed_traced_cu_seqlens\[interpret|checkpoint\[)",
    r"test_fused_recurrent\.py::test_v_blocks\[",
    r"test_layer\.py::test_(training_beats_chance|quick_demo_beats_chance)",
    r"test_layer\.py::test_(gradients_finite|long_large_inputs_stay_bounded)\[",
    r"test_layer\.py::test_prefill_then_decode_matches_full_forward\[(iplr|delta)-4\]",
    r"test_context_parallel\.py::test_cp_initial_state\[",
    r"test_context_parallel\.py::test_cp_packed\[interpret\]",
    r"test_cp_jit\.py::test_jit_sequence_sharded(\[B2-T4\]|_explicit_mesh)",
    r"test_layer_sharding\.py::test_layer_context_parallel\[xla\]",
    r"test_validation\.py::test_cu_seqlens_as_list\[chunk\]",
    r"test_rwkv7\.py::test_bf16_and_errors",
    r"test_layer_sharding\.py::test_demo_model_data_parallel",
    r"test_sharding\.py::test_jit_packed_sequences_shard_heads\[chunk\]",
    r"test_context_parallel\.py::test_cp_(packed_concrete_offsets_no_initial_state|second_mesh_axis\[interpret)",
    r"test_validation\.py::test_malformed_traced_cu_seqlens_poison\[cu[123]-",
    r"test_sharding\.py::test_jit_sharded_inputs\[chunk-interpret-\(8,\)",
    r"test_sharding\.py::test_shard_map\[chunk-xla-",
    r"test_layer_sharding\.py::test_layer_context_parallel\[interpret\]",
    r"test_gate\.py::test_chunk\[((zero|logsigmoid)-|strong-interpret)",
    r"test_gate\.py::test_chunk_(bf16|k60|packed|jit_sharded|shard_map\[|all_strong_finite\[(16-|32-|64-interpret))",
    r"test_gate\.py::test_context_parallel\[",
    r"test_gate\.py::test_chunk_backward_kernels(\[(softplus|logsigmoid|zero|bf16|k200|strong_packed)|_all_strong)",
    r"test_gate\.py::test_gated_backward_(equations\[case[023]|kernels)",
    r"test_gate\.py::test_(wy_kernel_gated\[16-|zero_gate_is_iplr\[chunk-interpret)",
    r"test_gate\.py::test_fused_recurrent\[((zero|logsigmoid)-|\w+-xla)",
    r"test_gate\.py::test_fused_recurrent_(jit_sharded|bf16|all_strong|k60\[xla|packed\[xla|shard_map\[xla)",
    r"test_rwkv7\.py::test_(prefill_then_decode|default_init_is_finite|matches_float64_reference\[2\])",
    r"test_nonfinite\.py::test_causal\[fused_recurrent-xla",
    r"test_nonfinite\.py::test_causal_packed\[(naive|chunk-xla|fused_recurrent-xla|\w+-interpret-\w+-concrete)",
    r"test_nonfinite\.py::test_nan_initial_state\[(naive|chunk-xla|fused_recurrent)",
    r"test_nonfinite\.py::test_context_parallel\[(allgather-linear-False|\w+-rerun|scan-linear-False)",
    r"test_layer\.py::test_prefill_then_decode_matches_full_forward\[linear-3\]",
    r"test_fused_recurrent\.py::test_matches_reference\[(k60_v20-interpret|batch-xla|no_state-xla)\]",
    r"test_fused_recurrent\.py::test_(packed_traced_cu_seqlens\[xla|vmap\[xla)",
    r"test_gate\.py::test_(zero_gate_is_iplr\[chunk-xla|chunk\[softplus-xla)",
    r"test_gate\.py::test_gated_fused_recurrent_lowers_for_cuda\[(100|200)-",
    r"test_nonfinite\.py::test_context_parallel\[allgather-linear-True",
    r"test_sharding\.py::test_jit_sequence_sharded_is_correct",
    r"test_chunk\.py::test_output_variants_public_path\[float32-20-16-False\]",
    r"test_segments\.py::test_segmented_(forward\[(rows_seg_divides|rows_c32_K60_seg1|packed_c16)|gradients\[packed_c16)",
    r"test_segments\.py::test_segmented_bf16_equals_unsegmented\[interpret",
    r"test_context_parallel\.py::test_cp_kernels_(default\[4-|packed\[|nonfinite\[)",
    r"test_segments\.py::test_(segmented_(forward|gradients)\[|segments_jit_traced_offsets)",
    r"test_context_parallel\.py::test_cp_packed\[xla\]",
    r"test_segments\.py::test_sequence_summaries\[packed",
]
_HEAVY = re.compile("|".join(HEAVY))


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="run tests marked slow")
    parser.addoption(
        "--seed", type=int, default=0,
        help="base of the per-test seeds (each test draws from a seed derived from its id and this)",
    )


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "gpu" in item.keywords and not GPU:
            item.add_marker(pytest.mark.skip(reason="needs a GPU"))
        if _HEAVY.search(item.nodeid):
            item.add_marker(pytest.mark.slow)
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(pytest.mark.skip(reason="slow: run with --runslow"))


@pytest.fixture
def rng(request):
    """A generator seeded from the test id: every parametrisation draws its own inputs, and a
    failure reproduces from its id alone (`--seed N` draws a fresh set for the whole run)."""
    base = request.config.getoption("--seed")
    seed = zlib.crc32(f"{base}:{request.node.nodeid}".encode())
    request.node.user_properties.append(("seed", seed))
    return np.random.default_rng(seed)


@pytest.fixture
def on_cpu():
    """Run the test on the CPU device, also on a GPU machine: for checks of the interpreted
    kernels to float32 rounding, which a GPU would compute with tf32 dots (docs/numerics.md);
    the compiled kernels have their own cases."""
    with jax.default_device(jax.devices("cpu")[0]):
        yield


@pytest.fixture
def unguarded(monkeypatch):
    """The ops without `inputs.guarded_unless_finite`'s guarded branch (the same kernels again,
    taken only for non-finite outputs), so a lowered module lists each kernel of the plain path
    once, in call order."""
    import iplr_jax.ops.chunk as chunk_module
    import iplr_jax.ops.fused_recurrent as fused_module

    def plain(run, x, cu_seqlens, dims, *extra):
        return run(x, cu_seqlens, *extra)

    for module in (chunk_module, fused_module):
        monkeypatch.setattr(module, "guarded_unless_finite", plain)
