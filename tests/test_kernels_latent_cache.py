"""The one-launch MLA decode latent / query post-processing (attnlab.kernels.latent_cache) against
its oracle.

- CPU: ``latent_write_reference`` equals what MultiHeadLatentAttention's own decode step computes
  (the absorbed query from ``_project_fused`` + ``_absorb_q``, the cache after ``forward``), bit for
  bit: it is the oracle. Bad input -> ValueError.
- Interpreter (``TRITON_INTERPRET=1``, tiny, run in a subprocess by ``test_interpreter_suite``):
  ``latent_write`` against the reference on several layer configs — returned q_abs and the WHOLE
  latent cache (filled with noise first, so a missing or misplaced write fails), outputs poisoned.
- GPU (marked ``gpu``): real shapes in bf16, long positions, CUDA-graph replay and torch.compile.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from _triton_tests import (
    INTERPRETED,
    compile_sm90,
    interp,
    needs_sm90_toolchain,
    needs_triton,
    poison_outputs,
    rel_err,
    run_interpreter_suite,
    sm90_usage,
)
from test_layers_mla import YARN

from attnlab.config import ModelConfig
from attnlab.layers.mla import DeepSeekSparseAttention, MultiHeadLatentAttention

# tiny layer configs (d_model 32): q LoRA or not, interleaved pairs or rotate-half, YaRN, NoPE, and
# sizes that are not powers of two (R 12, dr 6, dn 5)
CONFIGS = {
    "lora_interleaved": dict(q_lora_rank=12, rope_interleave=True),
    "plain_rotate_half": dict(q_lora_rank=None, rope_interleave=False),
    "yarn": dict(q_lora_rank=12, rope_interleave=True, rope_scaling=YARN),
    "nope": dict(q_lora_rank=None, mla_use_rope=False),
    "odd_sizes": dict(q_lora_rank=None, kv_lora_rank=12, qk_rope_head_dim=6, qk_nope_head_dim=5,
                      rope_interleave=True, rope_scaling=YARN),
}
# DSA (pattern "D"): the indexer's heads in the query row, its key and head weights after [c_kv | k_pe];
# index_head_dim wider than the rope dims (passed-through dims), H_I not a power of two
DSA_CONFIGS = {
    "dsa_lora": dict(pattern="D", q_lora_rank=12, rope_interleave=True, index_n_heads=3, index_head_dim=12),
    "dsa_plain_yarn": dict(pattern="D", q_lora_rank=None, rope_interleave=True, rope_scaling=YARN,
                           index_n_heads=2, index_head_dim=4),
    "dsa_odd_sizes": dict(pattern="D", q_lora_rank=None, kv_lora_rank=12, qk_rope_head_dim=6,
                          qk_nope_head_dim=5, rope_interleave=False, index_n_heads=5, index_head_dim=10),
    "dsa_nope": dict(pattern="D", q_lora_rank=12, mla_use_rope=False, index_n_heads=2, index_head_dim=8),
}
CONFIGS.update(DSA_CONFIGS)
MLA_CONFIGS = [name for name in CONFIGS if name not in DSA_CONFIGS]
MAX_LEN = 24
LENGTHS = [3, 0, MAX_LEN - 1]  # per row: a few prefilled tokens, the first token, the last slot
PREFILL = [3, 0, 5]  # tokens each row gets through the layer's own prefill (then the lengths above)


_poison = poison_outputs("latent_cache")

def layer_cfg(d_model=32, **kw) -> ModelConfig:
    base = dict(pattern="M", d_model=d_model, n_layers=1, n_heads=3, q_lora_rank=12, kv_lora_rank=16,
                qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6)
    base.update(kw)
    if base["pattern"] == "D":
        base.setdefault("index_topk", 8)
    return ModelConfig(**base).validate()


def make(name, dtype=torch.float32, cache_dtype=None, lengths=None, max_len=MAX_LEN, device="cpu", seed=0,
         d_model=32, **overrides):
    """A layer of CONFIGS[name] (random weights, norm weights and biases around 1), its cache filled
    with noise at the given lengths, and one decode token x [B, 1, d_model]."""
    gen = torch.Generator().manual_seed(seed)
    cfg = dict(CONFIGS[name], **overrides) if name in CONFIGS else overrides
    cfg = layer_cfg(d_model, **cfg)
    mla = (DeepSeekSparseAttention if cfg.pattern == "D" else MultiHeadLatentAttention)(cfg)
    with torch.no_grad():
        for p in mla.parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
    mla = mla.to(device=device, dtype=dtype).eval()
    lengths = LENGTHS if lengths is None else lengths
    cache = mla.new_cache(len(lengths), max_len, device=device, dtype=cache_dtype or dtype)
    with torch.no_grad():
        cache.latent.copy_(torch.randn(cache.latent.shape, generator=gen))
        if is_dsa(mla):
            cache.index_keys.copy_(torch.randn(cache.index_keys.shape, generator=gen))
        cache.lengths.copy_(torch.tensor(lengths))
    x = torch.randn(len(lengths), 1, d_model, generator=gen).to(device=device, dtype=dtype)
    return mla, cache, x


def is_dsa(mla) -> bool:
    return isinstance(mla, DeepSeekSparseAttention)


def inputs(mla, x):
    """latent_write's inputs from x [B, 1, d_model] as the fused decode step makes them: q and kv
    are slices of the projection rows (row stride > width), q_lat a strided view. DSA: q also holds
    the indexer's query heads, kv its key and head weights."""
    B = x.shape[0]
    H, dn, dr, R = mla.n_heads, mla.nope_dim, mla.rope_dim, mla.kv_lora_rank
    n_q = H * (dn + dr) + (mla.index_n_heads * mla.index_head_dim if is_dsa(mla) else 0)
    row = mla._linear_row(mla.x_proj, x)[:, 0]  # (B, [q | q latent] + N_kv)
    if mla.q_lora_rank is None:
        q, kv = row[:, :n_q], row[:, n_q:]
    else:
        q = mla._linear_row(mla.q_up, mla.q_a_norm(row[:, None, : mla.q_lora_rank]))[:, 0]  # (B, N_q)
        kv = row[:, mla.q_lora_rank :]
    w = mla.kv_b_proj.weight.view(H, dn + mla.v_head_dim, R)
    q_lat = torch.einsum("bhd,hdr->bhr", q[:, : H * (dn + dr)].view(B, H, dn + dr)[..., :dn], w[:, :dn])
    # strided (any strides, last dim contiguous): the same values inside a wider buffer
    wide = torch.zeros(B, H, R + 3, dtype=q_lat.dtype, device=q_lat.device)
    wide[..., 1 : R + 1] = q_lat
    return q, kv, wide[..., 1 : R + 1]


def clone(cache):
    tensors = {k: v.clone() for k, v in vars(cache).items() if isinstance(v, torch.Tensor)}
    return dataclasses.replace(cache, **tensors)


def tables(mla, cache, use):
    return mla.rotation(cache.lengths[:, None]) if use and mla.rotary is not None else None


def check_against_reference(mla, cache, q, kv, q_lat, rotation, rtol, atol, cache_tol=None,
                            count_token=False):
    """latent_write on ``cache`` vs latent_write_reference on a copy: q_abs (DSA: and q_idx, w) and
    the whole latent cache (DSA: and the whole indexer-key cache); ``cache_tol``: (rtol, atol) for the
    caches if not those of q_abs. ``count_token``: both count the token (lengths + 1 exactly once)."""
    from attnlab.kernels import latent_cache
    from attnlab.kernels.latent_cache import latent_write, latent_write_reference

    before = clone(cache)
    ref = clone(cache)
    q_ref = latent_write_reference(mla, q, kv, q_lat, ref, rotation, count_token=count_token)
    out = latent_write(mla, q, kv, q_lat, cache, rotation, count_token=count_token)
    B, H, R, dr = q.shape[0], mla.n_heads, mla.kv_lora_rank, mla.rope_dim
    if is_dsa(mla):
        (out, q_idx, w), (q_ref, q_idx_ref, w_ref) = out, q_ref
        assert q_idx.shape == (B, mla.index_n_heads, mla.index_head_dim) and q_idx.dtype == q.dtype
        assert q_idx.is_contiguous() and w.shape == (B, mla.index_n_heads) and w.dtype == torch.float32
        torch.testing.assert_close(q_idx, q_idx_ref, rtol=rtol, atol=atol)
        torch.testing.assert_close(w, w_ref, rtol=1e-6, atol=0)  # float32(x) * scale: exact
    assert out.shape == (B, H, R + dr) and out.dtype == q.dtype and out.is_contiguous()
    if q_lat is not None:
        assert torch.equal(out[..., :R], q_lat)  # a copy
    torch.testing.assert_close(out, q_ref, rtol=rtol, atol=atol)
    rtol, atol = cache_tol or (rtol, atol)
    torch.testing.assert_close(cache.latent, ref.latent, rtol=rtol, atol=atol)  # the whole cache
    if count_token:  # once per row, after every program used the old value (the slots checked below)
        assert torch.equal(cache.lengths, before.lengths + 1) and torch.equal(ref.lengths, cache.lengths)
        assert not any(t.any() for t in latent_cache._TICKETS.values())  # zeros again for the next launch
    else:
        assert torch.equal(cache.lengths, before.lengths)  # the layer counts the token, not latent_write
    want = torch.zeros(cache.latent.shape[:2], dtype=torch.bool)
    want[torch.arange(B), before.lengths.cpu()] = True
    changed = (cache.latent != before.latent).any(-1)[:, :, 0]  # (B, S_max) slots written
    assert torch.equal(changed.cpu(), want)  # exactly slot lengths[b] of each row
    if is_dsa(mla):
        # the key's LayerNorm rounds to the projection's dtype before its RoPE (as nn.LayerNorm then
        # _rotate do): in bf16 a flip of that rounding (float32 sums in another order) moves a rotated
        # value by an ulp of the LayerNorm output, at any magnitude of the result
        flip = 1e-6 if min(q.dtype.itemsize, cache.index_keys.dtype.itemsize) == 4 else 2.0**-5
        torch.testing.assert_close(cache.index_keys, ref.index_keys, rtol=rtol, atol=max(atol, flip))
        assert rel_err(cache.index_keys, ref.index_keys) <= (1e-6 if flip < 1e-3 else 4e-3)
        changed = (cache.index_keys != before.index_keys).any(-1)  # (B, S_max)
        assert torch.equal(changed.cpu(), want)


# ---------------------------------------------------------------------------------------------
# CPU: the subprocess runner, the oracle against the layer, bad input


@needs_triton
def test_interpreter_suite():
    run_interpreter_suite(__file__)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("dtype,cache_dtype", [(torch.float32, None), (torch.bfloat16, None),
                                               (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("shared_rotation", [False, True])
def test_reference_is_the_layers_decode_step(name, dtype, cache_dtype, shared_rotation):
    """After a prefill through the layer (rows of different lengths), one decode step of
    ``mla.forward``: its cache equals the reference's, and its absorbed query (``_project_fused``
    then ``_absorb_q``) equals the reference's q_abs, bit for bit; for DSA also the indexer-key cache
    and the indexer's query and head weights (``_project_fused``'s)."""
    from attnlab.kernels.latent_cache import latent_write_reference

    mla, cache, x = make(name, dtype, cache_dtype, lengths=[0, 0, 0])
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for b, n in enumerate(PREFILL):
            if n:
                mla(torch.randn(1, n, mla.d_model, generator=gen).to(dtype), cache.rows(b, b + 1))
        assert cache.lengths.tolist() == PREFILL
        rotation = tables(mla, cache, shared_rotation)
        q, kv, _ = inputs(mla, x)
        q_nope, q_pe, _, index_qkw = mla._project_fused(x, cache.lengths[:, None], rotation)
        q_abs = mla._absorb_q(q_nope, q_pe)[:, 0]  # (B, H, R + dr): the layer's absorbed query
        ref = clone(cache)
        out = latent_write_reference(mla, q, kv, q_abs[..., : mla.kv_lora_rank], ref, rotation)
        mla(x, cache, rotation=rotation)  # the decode branch: writes the latent, then lengths += 1
    if is_dsa(mla):
        out, q_idx, w = out
        assert torch.equal(q_idx, index_qkw[0][:, 0])  # (B, H_I, D_I)
        assert torch.equal(w, index_qkw[2][:, 0])  # (B, H_I) float32
        assert torch.equal(ref.index_keys, cache.index_keys)
    assert torch.equal(out, q_abs)
    assert torch.equal(ref.latent, cache.latent)
    assert torch.equal(ref.lengths + 1, cache.lengths)


def test_reference_refuses_a_full_cache():
    from attnlab.kernels.latent_cache import latent_write_reference

    mla, cache, x = make("lora_interleaved", lengths=[2, MAX_LEN])
    with torch.no_grad(), pytest.raises(ValueError, match="cache"):
        latent_write_reference(mla, *inputs(mla, x), cache)


def test_bad_input_raises_value_error_naming_the_argument():
    from attnlab.kernels.latent_cache import latent_write, latent_write_reference

    mla, cache, x = make("lora_interleaved")
    nope, nope_cache, nope_x = make("nope")
    with torch.no_grad():
        q, kv, q_lat = inputs(mla, x)
        nope_inputs = inputs(nope, nope_x)
    dsa, dsa_cache, dsa_x = make("dsa_lora")
    with torch.no_grad():
        dsa_q, dsa_kv, dsa_q_lat = inputs(dsa, dsa_x)
    for fn in (latent_write, latent_write_reference):
        # a DSA layer takes the indexer's query heads in q, its key and head weights in kv, a DSACache
        with pytest.raises(ValueError, match="q:"):
            fn(dsa, q, kv, q_lat, cache)
        with pytest.raises(ValueError, match="kv"):
            fn(dsa, dsa_q, dsa_kv[:, :-1], dsa_q_lat, dsa_cache)
        with pytest.raises(ValueError, match="DSACache"):
            fn(dsa, dsa_q, dsa_kv, dsa_q_lat, cache)
        with pytest.raises(ValueError, match="cache.index_keys"):
            fn(dsa, dsa_q, dsa_kv, dsa_q_lat,
               dataclasses.replace(dsa_cache, index_keys=dsa_cache.index_keys[..., :-1]))
        with pytest.raises(ValueError, match="rotation"):  # MLA's tables: without the indexer's columns
            fn(dsa, dsa_q, dsa_kv, dsa_q_lat, dsa_cache, mla.rotation(cache.lengths[:, None]))
        with pytest.raises(ValueError, match="mla"):
            fn(torch.nn.Linear(2, 2), q, kv, q_lat, cache)
        with pytest.raises(ValueError, match="q:"):
            fn(mla, q[:, :-1], kv, q_lat, cache)
        with pytest.raises(ValueError, match="q:"):
            fn(mla, q[:, None], kv, q_lat, cache)
        with pytest.raises(ValueError, match="kv"):
            fn(mla, q, kv[:, :-1], q_lat, cache)
        with pytest.raises(ValueError, match="kv"):
            fn(mla, q, kv[:2], q_lat, cache)
        with pytest.raises(ValueError, match="q_lat"):
            fn(mla, q, kv, q_lat[..., :-1], cache)
        with pytest.raises(ValueError, match="q_lat"):
            fn(mla, q, kv, q_lat.double(), cache)
        with pytest.raises(ValueError, match="cache"):
            fn(mla, q, kv, q_lat, cache.latent)
        with pytest.raises(ValueError, match="cache.latent"):
            fn(mla, q, kv, q_lat, dataclasses.replace(cache, latent=cache.latent[..., :-1]))
        with pytest.raises(ValueError, match="cache.lengths"):
            fn(mla, q, kv, q_lat, dataclasses.replace(cache, lengths=cache.lengths.float()))
        cos, sin = mla.rotation(cache.lengths[:, None])
        with pytest.raises(ValueError, match="rotation"):
            fn(mla, q, kv, q_lat, cache, (cos[..., :-1], sin[..., :-1]))
        with pytest.raises(ValueError, match="rotation"):
            fn(mla, q, kv, q_lat, cache, cos)
        with pytest.raises(ValueError, match="rotation"):
            fn(mla, q, kv, q_lat, cache, (cos.double(), sin.double()))
        with pytest.raises(ValueError, match="rotation"):  # tables for a NoPE layer
            fn(nope, *nope_inputs, nope_cache, (cos, sin))


@needs_triton
@pytest.mark.skipif(INTERPRETED, reason="the interpreter runs CPU tensors")
def test_cpu_tensors_without_interpreter_are_refused():
    from attnlab.kernels.latent_cache import latent_write

    mla, cache, x = make("lora_interleaved")
    with torch.no_grad(), pytest.raises(ValueError, match="latent_write_reference"):
        latent_write(mla, *inputs(mla, x), cache)


@needs_sm90_toolchain
@pytest.mark.parametrize("rope, tables, index, count, fold", [
    (True, False, False, True, True), (True, True, False, False, False), (False, False, False, True, True),
    (True, False, True, True, True), (True, True, True, False, False), (True, False, True, True, False),
])
def test_compiles_for_sm90_at_real_shapes(rope, tables, index, count, fold):
    """What the interpreter cannot check: the kernel compiles for an H100 (sm_90, Triton's bundled
    ptxas, no GPU needed) at H = 16, dn 128, dr 64, R 512 (DSA: indexer 64 x 128), bf16, with the
    warps latent_write launches; no local memory (spills); in-kernel cos / sin are libdevice's (full
    range reduction, not the MUFU approximation, whose error grows with the angle at long positions)."""
    from attnlab.kernels.latent_cache import _latent_write_kernel as fn
    from attnlab.kernels.latent_cache import num_warps

    HI, DI = (64, 128) if index else (0, 0)
    const = dict(H=16, DN=128, DR=64, R=512, BR=512, BDR=64, NQ=16 * 192 + HI * DI, INDEX=index, HI=HI, DI=DI,
                 BHI=max(HI, 1), BDI=max(DI, 1), ROPE=rope, TABLES=tables, ZERO_CENTERED=False, PDL=True,
                 COUNT=count, NPROG=16 + 1 + (1 + HI if index else 0), FOLD=fold, BD=128, BLOCK_R=64,
                 INTERP=False, EARLY_PARTNERS=True)
    ptr = dict(Q="*bf16", KV="*bf16", Q_LAT="*bf16", LENGTHS="*i64", COS="*fp32", SIN="*fp32", FREQ="*fp32",
               PARTNER_Q="*i64", PARTNER_K="*i64", NORM_W="*bf16", OUT="*bf16", LATENT="*bf16", QI="*bf16",
               W_OUT="*fp32", INDEX_KEYS="*bf16", K_NORM_W="*bf16", K_NORM_B="*bf16", TICKETS="*i32",
               W_UK="*bf16")
    kernel = compile_sm90(fn, const, ptr, floats=("eps", "factor", "k_eps", "w_scale"),
                          ints=dict(stride_cache_b="i64", stride_cache_s="i64", stride_ik_b="i64",
                                    stride_ik_s="i64"), num_warps=num_warps(512))
    regs, stack, res = sm90_usage(kernel)
    assert "LOCAL:0 " in res, res
    # DSA with in-kernel angles (four sin/cos sites): 8 bytes of stack at 32 registers, the PTX local
    # array of libdevice's large-angle (Payne-Hanek) range reduction, not spills; other variants none
    assert stack == 0 or (index and rope and not tables and stack <= 16 and regs <= 64), res
    ptx = kernel.asm["ptx"]
    assert ("atom" in ptx) == count  # the ticket (count_token) and nothing atomic without it
    assert ptx.count("griddepcontrol.wait") == (2 if fold else 1)  # FOLD: the absorb programs' own wait
    if rope and not tables:
        assert "__nv_sinf" in ptx and "__nv_cosf" in ptx and "sin.approx" not in ptx
    else:
        assert "__nv_sinf" not in ptx and "sin.approx" not in ptx  # no angles computed


# ---------------------------------------------------------------------------------------------
# interpreter (TRITON_INTERPRET=1): the kernel against the reference

TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1e-2, 1e-5)}  # rtol, atol (bf16: a rounding flip)


@interp
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shared_rotation", [False, True])
def test_interp_matches_reference(name, dtype, shared_rotation):
    mla, cache, x = make(name, dtype)
    with torch.no_grad():
        check_against_reference(mla, cache, *inputs(mla, x), tables(mla, cache, shared_rotation), *TOL[dtype])


@interp
@pytest.mark.parametrize("name", ["lora_interleaved", "nope", "odd_sizes", "dsa_lora", "dsa_plain_yarn"])
@pytest.mark.parametrize("shared_rotation", [False, True])
def test_interp_count_token(name, shared_rotation):
    """count_token: the token is counted (lengths += 1) exactly once per row, after every program of
    the row read the old length (the q heads' and the indexer's in-kernel angles, both cache slots);
    the tickets are zero again, so a second step counts again and writes the next slot."""
    mla, cache, x = make(name, lengths=[3, 0, MAX_LEN - 2])
    with torch.no_grad():
        for _ in range(2):
            check_against_reference(mla, cache, *inputs(mla, x), tables(mla, cache, shared_rotation),
                                    *TOL[torch.float32], count_token=True)
    assert cache.lengths.tolist() == [5, 2, MAX_LEN]


@interp
@pytest.mark.parametrize("name", ["lora_interleaved", "nope", "odd_sizes", "dsa_lora", "dsa_odd_sizes"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_interp_q_lat_computed_in_the_launch(name, dtype):
    """q_lat=None: the launch computes W_UK^T q_nope itself (extra programs, as absorb_q) with the
    token counted too, as the fused step calls it; against the reference's einsum."""
    mla, cache, x = make(name, dtype)
    q, kv, _ = inputs(mla, x)
    with torch.no_grad():
        check_against_reference(mla, cache, q, kv, None, None, *TOL[dtype], count_token=True)


@interp
@pytest.mark.parametrize("name", ["yarn", "odd_sizes", "dsa_plain_yarn", "dsa_odd_sizes"])
def test_interp_float32_projection_into_bf16_cache(name):
    """The latent (and DSA's indexer key) rounds to the projection's dtype, then to the cache's, as
    the layer's _write casts it."""
    mla, cache, x = make(name, torch.float32, cache_dtype=torch.bfloat16)
    with torch.no_grad():
        check_against_reference(mla, cache, *inputs(mla, x), None, *TOL[torch.float32],
                                cache_tol=TOL[torch.bfloat16])


@interp
@pytest.mark.parametrize("name", ["lora_interleaved", "plain_rotate_half", "dsa_lora"])
def test_interp_bf16_projection_into_float32_cache(name):
    """A bf16 layer over a float32 cache: the written latent (and DSA's indexer key) holds bf16 values
    (kv_a_norm / k_norm and _rotate round to the projection's dtype before _write's cast)."""
    mla, cache, x = make(name, torch.bfloat16, cache_dtype=torch.float32)
    lengths = cache.lengths.clone()
    with torch.no_grad():
        check_against_reference(mla, cache, *inputs(mla, x), None, *TOL[torch.bfloat16])
    new = cache.latent[torch.arange(3), lengths]  # (B, 1, R + dr) the rows just written
    assert torch.equal(new, new.bfloat16().float())
    if is_dsa(mla):
        new = cache.index_keys[torch.arange(3), lengths]  # (B, D_I)
        assert torch.equal(new, new.bfloat16().float())


@interp
@pytest.mark.parametrize("names", [("lora_interleaved", "yarn"), ("dsa_lora", "dsa_plain_yarn")])
def test_interp_broadcast_tables_and_large_positions(names):
    """One row of tables for B = 2 rows at one position (shape [1, 1, N], as a shared step's
    would be); and far positions with in-kernel angles vs torch's tables."""
    mla, cache, x = make(names[0], lengths=[9, 9], seed=2)
    cos, sin = mla.rotation(cache.lengths[:1, None])  # (1, 1, N) each
    with torch.no_grad():
        check_against_reference(mla, cache, *inputs(mla, x), (cos, sin), *TOL[torch.float32])
    mla, cache, x = make(names[1], lengths=[1234, 5000], max_len=5001, seed=3)
    with torch.no_grad():
        check_against_reference(mla, cache, *inputs(mla, x), None, rtol=1e-5, atol=2e-5)


@interp
@pytest.mark.parametrize("name", ["lora_interleaved", "dsa_lora"])
def test_interp_row_without_room_is_not_written(name):
    """A row whose slot is past the cache (the layer would refuse it on the host) writes nothing;
    the other rows are written as usual, and every row's q_abs (DSA: q_idx, w) is."""
    from attnlab.kernels.latent_cache import latent_write, latent_write_reference

    mla, cache, x = make(name, lengths=[3, MAX_LEN])
    before = clone(cache)
    ref = clone(cache.rows(0, 1))
    with torch.no_grad():
        q, kv, q_lat = inputs(mla, x)
        outs = latent_write(mla, q, kv, q_lat, cache)
        outs_ref = latent_write_reference(mla, q[:1], kv[:1], q_lat[:1], ref)
    if not is_dsa(mla):
        outs, outs_ref = (outs,), (outs_ref,)
    else:
        assert torch.equal(cache.index_keys[1], before.index_keys[1])
        torch.testing.assert_close(cache.index_keys[:1], ref.index_keys, rtol=1e-5, atol=1e-5)
    assert torch.equal(cache.latent[1], before.latent[1])
    torch.testing.assert_close(cache.latent[:1], ref.latent, rtol=1e-5, atol=1e-5)
    for out, out_ref in zip(outs, outs_ref, strict=True):
        torch.testing.assert_close(out[:1], out_ref, rtol=1e-5, atol=1e-5)
        assert not out.isnan().any()


@interp
@pytest.mark.parametrize("fold", [False, True])
def test_interp_zero_the_topk_scratch(fold):
    """A DSA layer's latent_write(..., zero=buf) also sets buf (garbage before, more elements than its
    programs' blocks) to zero, everything else bit-identical to the call without it; so does the
    reference (the same arguments); a buffer of the wrong dtype or layout, or an MLA layer asked to,
    is refused by name."""
    from attnlab.kernels.latent_cache import latent_write, latent_write_reference

    mla, cache, x = make("dsa_lora")
    buf = torch.full((5000,), 9, dtype=torch.int32)
    with torch.no_grad():
        q, kv, q_lat = inputs(mla, x)
        q_lat = None if fold else q_lat
        with_zero, cache_zero = clone(cache), clone(cache)
        plain = latent_write(mla, q, kv, q_lat, cache, count_token=True)
        zeroed = latent_write(mla, q, kv, q_lat, cache_zero, count_token=True, zero=buf)
        assert not buf.any()
        for a, b in zip(plain, zeroed, strict=True):
            assert torch.equal(a, b)
        for name in ("latent", "index_keys", "lengths"):
            assert torch.equal(getattr(cache, name), getattr(cache_zero, name))
        buf.fill_(9)
        latent_write_reference(mla, q, kv, q_lat, clone(with_zero), zero=buf)
        assert not buf.any()
        with pytest.raises(ValueError, match="zero: expected a contiguous 1-D int32"):
            latent_write(mla, q, kv, q_lat, with_zero, zero=buf.long())
        with pytest.raises(ValueError, match="zero: expected a contiguous 1-D int32"):
            latent_write(mla, q, kv, q_lat, with_zero, zero=buf.view(50, 100))
        m_mla, m_cache, m_x = make("lora_interleaved")
        with pytest.raises(ValueError, match="zero: only a DSA layer"):
            latent_write(m_mla, *inputs(m_mla, m_x), m_cache, zero=buf)
        with pytest.raises(ValueError, match="zero: only a DSA layer"):
            latent_write_reference(m_mla, *inputs(m_mla, m_x), m_cache, zero=buf)


@interp
@pytest.mark.parametrize("name", ["lora_interleaved", "dsa_lora"])
@pytest.mark.parametrize("count_token, fold", [(False, False), (True, False), (True, True)])
def test_interp_custom_op_schema_and_fake(name, count_token, fold):
    """The custom ops torch.compile keeps opaque (attnlab::latent_write, attnlab::dsa_latent_write):
    their declared mutations (the caches) and fake implementations' outputs match what the kernel does."""
    from attnlab.kernels import latent_cache

    mla, cache, x = make(name)
    op_name = "_dsa_latent_write_op" if is_dsa(mla) else "_latent_write_op"
    op = getattr(latent_cache, op_name)
    calls = []

    def spy(*args):
        calls.append(args)
        return op(*args)

    with torch.no_grad():
        q, kv, q_lat = inputs(mla, x)
        setattr(latent_cache, op_name, spy)
        try:
            zero = torch.ones(300, dtype=torch.int32) if is_dsa(mla) and fold else None  # the top-k's scratch
            latent_cache.latent_write(mla, q, kv, None if fold else q_lat, cache, count_token=count_token,
                                      zero=zero)
        finally:
            setattr(latent_cache, op_name, op)
    assert len(calls) == 1
    result = torch.library.opcheck(op, calls[0], test_utils=("test_schema", "test_faketensor"))
    assert result == {"test_schema": "SUCCESS", "test_faketensor": "SUCCESS"}


# ---------------------------------------------------------------------------------------------
# GPU: real shapes (bf16, 4096-slot caches), long positions, CUDA graph, torch.compile

GPU_CONFIGS = {
    # DeepSeek-V3 shapes with 16 heads: q LoRA, interleaved pairs, YaRN
    "deepseek_16h": dict(n_heads=16, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
                         qk_rope_head_dim=64, v_head_dim=128, rope_interleave=True,
                         rope_scaling=dict(YARN, factor=40.0, original_max_position_embeddings=4096)),
    # 32 heads, no q LoRA, rotate-half
    "plain_32h": dict(n_heads=32, q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128,
                      qk_rope_head_dim=64, v_head_dim=128, rope_interleave=False),
    # ModelConfig.preset("kimi-linear", d_model=2048, ...)'s M layer: 32 heads, dn 32, dr 16, NoPE
    "kimi_1b": dict(n_heads=32, q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=32,
                    qk_rope_head_dim=16, v_head_dim=32, mla_use_rope=False),
    # the ~1B DeepSeek-V3.2 D layer: 16 heads, q LoRA 1024, indexer 64 heads x 128, YaRN
    "dsa_16h": dict(pattern="D", n_heads=16, q_lora_rank=1024, kv_lora_rank=512, qk_nope_head_dim=128,
                    qk_rope_head_dim=64, v_head_dim=128, rope_interleave=True, index_n_heads=64,
                    index_head_dim=128, index_topk=2048,
                    rope_scaling=dict(YARN, factor=40.0, original_max_position_embeddings=4096)),
}


def make_gpu(name, lengths, max_len=4096, seed=0):
    return make(None, torch.bfloat16, lengths=lengths, max_len=max_len, device="cuda", seed=seed, d_model=512,
                **GPU_CONFIGS[name])


@interp
@pytest.mark.parametrize("name", list(GPU_CONFIGS))
@pytest.mark.parametrize("shared_rotation", [False, True])
def test_interp_real_shapes_short_cache(name, shared_rotation):
    """The GPU configs' layer shapes (H 16 / 32, R 512, dn 128 / 32, dr 64 / 16; DSA's indexer 64 x
    128), bf16, on a 64-slot CPU cache: the kernel's real-size blocks under the interpreter."""
    mla, cache, x = make(None, torch.bfloat16, lengths=[0, 10, 63], max_len=64, d_model=512,
                         **GPU_CONFIGS[name])
    with torch.no_grad():
        check_against_reference(mla, cache, *inputs(mla, x), tables(mla, cache, shared_rotation),
                                *TOL[torch.bfloat16])


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(GPU_CONFIGS))
@pytest.mark.parametrize("lengths", [[4095], [0, 1000, 4095]])
@pytest.mark.parametrize("shared_rotation", [False, True])
def test_gpu_matches_reference(name, lengths, shared_rotation):
    mla, cache, x = make_gpu(name, lengths)
    with torch.no_grad():
        check_against_reference(mla, cache, *inputs(mla, x), tables(mla, cache, shared_rotation),
                                *TOL[torch.bfloat16])


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["deepseek_16h", "kimi_1b", "dsa_16h"])
def test_gpu_q_lat_computed_in_the_launch(name):
    """q_lat=None and count_token, as the fused step calls it: W_UK^T q_nope from the launch's own
    programs, the token counted once per row."""
    mla, cache, x = make_gpu(name, [0, 1000, 4094])
    q, kv, _ = inputs(mla, x)
    with torch.no_grad():
        check_against_reference(mla, cache, q, kv, None, None, *TOL[torch.bfloat16], count_token=True)


@pytest.mark.gpu
def test_gpu_long_positions_in_kernel_tables():
    """Positions up to ~131K: the kernel's own cos/sin against torch's tables."""
    mla, cache, x = make_gpu("deepseek_16h", [131_071, 5], max_len=131_072)
    with torch.no_grad():
        check_against_reference(mla, cache, *inputs(mla, x), None, *TOL[torch.bfloat16])


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["deepseek_16h", "kimi_1b", "dsa_16h"])
@pytest.mark.parametrize("count_token", [False, True])
def test_gpu_cuda_graph_replay_reads_lengths_on_device(name, count_token):
    """Captured once, replayed 3 times with lengths += 1 in the graph (count_token: inside the launch):
    each replay writes the next slot, as the reference stepped 3 times on a copy."""
    from attnlab.kernels.latent_cache import latent_write, latent_write_reference

    mla, cache, x = make_gpu(name, [1020, 7, 3000])
    ref = clone(cache)

    def tup(outs):
        return outs if isinstance(outs, tuple) else (outs,)  # DSA: (q_abs, q_idx, w)

    with torch.no_grad():
        q, kv, q_lat = inputs(mla, x)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up (compiles the kernel) outside the capture
            outs = latent_write(mla, q, kv, q_lat, clone(cache), count_token=count_token)
            static = [t.clone() for t in tup(outs)]
        torch.cuda.current_stream().wait_stream(side)

        def step():
            for dst, src in zip(static, tup(latent_write(mla, q, kv, q_lat, cache, count_token=count_token)),
                                strict=True):
                dst.copy_(src)
            if not count_token:
                cache.lengths += 1

        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        assert torch.equal(cache.lengths, ref.lengths)  # capture ran nothing
        for _ in range(3):
            graph.replay()
            outs_ref = tup(latent_write_reference(mla, q, kv, q_lat, ref))
            ref.lengths += 1
            torch.cuda.synchronize()
            for out, out_ref in zip(static, outs_ref, strict=True):
                torch.testing.assert_close(out, out_ref, rtol=1e-2, atol=1e-5)
    if is_dsa(mla):
        torch.testing.assert_close(cache.index_keys, ref.index_keys, rtol=1e-2, atol=2.0**-5)
    torch.testing.assert_close(cache.latent, ref.latent, rtol=1e-2, atol=1e-5)
    assert torch.equal(cache.lengths, ref.lengths)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["deepseek_16h", "dsa_16h"])
def test_gpu_torch_compile_keeps_the_kernel(name):
    from attnlab.kernels.latent_cache import latent_write, latent_write_reference

    mla, cache, x = make_gpu(name, [0, 1000, 4095])
    ref = clone(cache)
    with torch.no_grad():
        q, kv, q_lat = inputs(mla, x)
        out = torch.compile(latent_write, fullgraph=True)(mla, q, kv, q_lat, cache)
        out_ref = latent_write_reference(mla, q, kv, q_lat, ref)
    if is_dsa(mla):
        (out, q_idx, w), (out_ref, q_idx_ref, w_ref) = out, out_ref
        torch.testing.assert_close(q_idx, q_idx_ref, rtol=1e-2, atol=1e-5)
        torch.testing.assert_close(w, w_ref, rtol=1e-6, atol=0)
        torch.testing.assert_close(cache.index_keys, ref.index_keys, rtol=1e-2, atol=2.0**-5)
    torch.testing.assert_close(out, out_ref, rtol=1e-2, atol=1e-5)
    torch.testing.assert_close(cache.latent, ref.latent, rtol=1e-2, atol=1e-5)
