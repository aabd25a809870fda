"""M (multi-head latent attention) and D (DeepSeek sparse attention) layers.

Numeric reference: the transformers 5.23.0 attention modules, called directly with a causal
additive mask; caches: prefill + decode == full forward, chunked == one-shot prefill.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from attnlab import ops
from attnlab.config import ModelConfig
from attnlab.layers.mla import DeepSeekSparseAttention, MultiHeadLatentAttention, build_dsa, build_mla

YARN = {
    "type": "yarn",
    "factor": 4.0,
    "original_max_position_embeddings": 16,
    "mscale": 0.707,
    "mscale_all_dim": 1.0,
    "beta_fast": 32,
    "beta_slow": 1,
}


def rms_rel(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.double(), out.double()
    return float((ref - out).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt())


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(
        pattern="M",
        d_model=32,
        n_layers=1,
        n_heads=3,
        q_lora_rank=12,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=6,
        index_n_heads=2,
        index_head_dim=8,
        index_topk=2048,
    )
    base.update(kw)
    return ModelConfig(**base).validate()


def randomize(module: torch.nn.Module, seed: int = 0) -> None:
    """Random weights everywhere (norm weights around 1, so they matter but stay sane)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g)) if "bias" not in name else p.copy_(
                    0.2 * torch.randn(p.shape, generator=g)
                )
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)


def causal_mask(T: int) -> torch.Tensor:
    m = torch.full((T, T), torch.finfo(torch.float32).min).triu(1)
    return m[None, None]  # (1, 1, T, T)


# ----------------------------------------------------------------------------- HF references
def hf_v3_config(cfg: ModelConfig):
    from transformers import DeepseekV3Config

    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        rope = {k: v for k, v in cfg.rope_scaling.items() if k != "type"}
        rope.update(rope_type="yarn", rope_theta=cfg.rope_theta)
    c = DeepseekV3Config(
        vocab_size=64,
        hidden_size=cfg.d_model,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_heads,
        q_lora_rank=cfg.q_lora_rank,
        kv_lora_rank=cfg.kv_lora_rank,
        qk_nope_head_dim=cfg.qk_nope_head_dim,
        qk_rope_head_dim=cfg.qk_rope_head_dim,
        v_head_dim=cfg.v_head_dim,
        first_k_dense_replace=1,
        rope_interleave=cfg.rope_interleave,
        rope_parameters=rope,
        max_position_embeddings=64,
    )
    c._attn_implementation = "eager"
    return c


def hf_v32_config(cfg: ModelConfig):
    from transformers import DeepseekV32Config

    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        rope = {k: v for k, v in cfg.rope_scaling.items() if k != "type"}
        rope.update(rope_type="yarn", rope_theta=cfg.rope_theta)
    c = DeepseekV32Config(
        vocab_size=64,
        hidden_size=cfg.d_model,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_heads,
        q_lora_rank=cfg.q_lora_rank,
        kv_lora_rank=cfg.kv_lora_rank,
        qk_nope_head_dim=cfg.qk_nope_head_dim,
        qk_rope_head_dim=cfg.qk_rope_head_dim,
        v_head_dim=cfg.v_head_dim,
        first_k_dense_replace=1,
        rope_parameters=rope,
        max_position_embeddings=64,
        index_n_heads=cfg.index_n_heads,
        index_head_dim=cfg.index_head_dim,
        index_topk=cfg.index_topk,
    )
    c._attn_implementation = "eager"
    return c


def run_hf(attn, rotary, x: torch.Tensor, **extra) -> torch.Tensor:
    T = x.shape[1]
    pos = torch.arange(T)[None]
    with torch.no_grad():
        cos_sin = rotary(x, pos)
        return attn(hidden_states=x, position_embeddings=cos_sin, attention_mask=causal_mask(T), **extra)[0]


@pytest.mark.parametrize(
    "q_lora_rank,rope_scaling,interleave",
    [(12, None, True), (None, None, True), (12, YARN, True), (None, YARN, False)],
)
def test_mla_matches_hf_deepseek_v3(q_lora_rank, rope_scaling, interleave):
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
        DeepseekV3Attention,
        DeepseekV3RotaryEmbedding,
    )

    cfg = tiny_cfg(q_lora_rank=q_lora_rank, rope_scaling=rope_scaling, rope_interleave=interleave)
    hc = hf_v3_config(cfg)
    hf = DeepseekV3Attention(hc, 0).eval()
    randomize(hf)
    ours = build_mla(cfg, 0)
    ours.load_from_hf(hf)
    x = torch.randn(2, 37, cfg.d_model, generator=torch.Generator().manual_seed(1))
    ref = run_hf(hf, DeepseekV3RotaryEmbedding(hc), x)
    with torch.no_grad():
        out = ours(x)
    assert rms_rel(ref, out) <= 1e-5
    if rope_scaling is not None:  # the YaRN mscale^2 really is in the scale
        assert ours.scale != (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5


def test_mla_nope_matches_hf_kimi():
    from transformers import KimiLinearConfig
    from transformers.models.kimi_linear.modeling_kimi_linear import KimiLinearAttention

    cfg = tiny_cfg(q_lora_rank=None, mla_use_rope=False)
    hc = KimiLinearConfig(
        vocab_size=64,
        hidden_size=cfg.d_model,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_heads,
        q_lora_rank=None,
        kv_lora_rank=cfg.kv_lora_rank,
        qk_nope_head_dim=cfg.qk_nope_head_dim,
        qk_rope_head_dim=cfg.qk_rope_head_dim,
        v_head_dim=cfg.v_head_dim,
    )
    hc._attn_implementation = "eager"
    hf = KimiLinearAttention(hc, 0).eval()
    randomize(hf)
    ours = build_mla(cfg, 0)
    ours.load_from_hf(hf)
    x = torch.randn(2, 29, cfg.d_model, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf(hidden_states=x, attention_mask=causal_mask(29))[0]
        out = ours(x)
    assert rms_rel(ref, out) <= 1e-5


@pytest.mark.parametrize("topk,rope_scaling", [(7, None), (64, None), (11, YARN)])
def test_dsa_matches_hf_deepseek_v32(topk, rope_scaling):
    from transformers.models.deepseek_v32.modeling_deepseek_v32 import (
        DeepseekV32Attention,
        DeepseekV32RotaryEmbedding,
    )

    # 8 index heads: a score is exactly 0 (ReLU of every head) rarely, so top-k has no ties that
    # HF (torch.topk order) and dsa_topk (earlier position wins) would break differently.
    cfg = tiny_cfg(pattern="D", index_topk=topk, rope_scaling=rope_scaling, index_n_heads=8)
    hc = hf_v32_config(cfg)
    hf = DeepseekV32Attention(hc, 0).eval()
    randomize(hf, seed=3)
    ours = build_dsa(cfg, 0)
    ours.load_from_hf(hf)
    x = torch.randn(2, 37, cfg.d_model, generator=torch.Generator().manual_seed(4))
    ref = run_hf(hf, DeepseekV32RotaryEmbedding(hc), x, position_ids=torch.arange(37)[None])
    with torch.no_grad():
        out = ours(x)
    assert rms_rel(ref, out) <= 1e-5


def test_dsa_sparse_selection_changes_the_output():
    """With topk < T the sparse layer must differ from dense MLA (the selection is real)."""
    cfg = tiny_cfg(pattern="D", index_topk=5)
    dsa = build_dsa(cfg, 0)
    randomize(dsa, seed=5)
    mla = build_mla(cfg, 0)
    mla.load_state_dict(dsa.state_dict(), strict=False)
    x = torch.randn(1, 24, cfg.d_model, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        a, b = dsa(x), mla(x)
    assert rms_rel(b[:, :5], a[:, :5]) <= 1e-5  # the first topk queries see everything
    assert rms_rel(b[:, 5:], a[:, 5:]) > 1e-2


@pytest.mark.parametrize("q_lora_rank", [12, None])
def test_dsa_with_topk_ge_T_equals_mla(q_lora_rank):
    cfg = tiny_cfg(pattern="D", q_lora_rank=q_lora_rank, index_topk=40)
    dsa = build_dsa(cfg, 0)
    randomize(dsa, seed=7)
    mla = build_mla(cfg, 0)
    missing, unexpected = mla.load_state_dict(dsa.state_dict(), strict=False)
    assert not missing and all(
        k.split(".")[0] in {"wq_b", "wk", "k_norm", "weights_proj"} for k in unexpected
    )
    x = torch.randn(2, 33, cfg.d_model, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        assert rms_rel(mla(x), dsa(x)) <= 1e-5
        # and with caches: prefill 20 + 13 decode steps (T + n = 33 <= topk)
        cm, cd = mla.new_cache(2, 40), dsa.new_cache(2, 40)
        ym, yd = [mla(x[:, :20], cm)], [dsa(x[:, :20], cd)]
        for t in range(20, 33):
            ym.append(mla(x[:, t : t + 1], cm))
            yd.append(dsa(x[:, t : t + 1], cd))
    assert rms_rel(torch.cat(ym, 1), torch.cat(yd, 1)) <= 1e-5


# ----------------------------------------------------------------------------- caches
LAYERS = {
    "M": lambda: build_mla(tiny_cfg(), 0),
    "M-nolora-yarn": lambda: build_mla(tiny_cfg(q_lora_rank=None, rope_scaling=YARN), 0),
    "M-nope": lambda: build_mla(tiny_cfg(mla_use_rope=False), 0),
    "D-sparse": lambda: build_dsa(tiny_cfg(pattern="D", index_topk=6), 0),
    "D-nolora": lambda: build_dsa(tiny_cfg(pattern="D", q_lora_rank=None, index_topk=9), 0),
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_prefill_then_decode_equals_full_forward(name):
    layer = LAYERS[name]()
    randomize(layer, seed=11)
    T, n = 17, 6
    x = torch.randn(2, T + n, layer.d_model, generator=torch.Generator().manual_seed(12))
    cache = layer.new_cache(2, 32)
    with torch.no_grad():
        full = layer(x)
        outs = [layer(x[:, :T], cache)]
        for t in range(T, T + n):
            outs.append(layer(x[:, t : t + 1], cache))
    assert cache.lengths.tolist() == [T + n, T + n]
    assert rms_rel(full, torch.cat(outs, 1)) <= 1e-4
    # the decode steps themselves (absorbed form) against the non-absorbed full forward
    assert rms_rel(full[:, T:], torch.cat(outs[1:], 1)) <= 1e-4


@pytest.mark.parametrize("name", ["M", "D-sparse"])
def test_chunked_prefill_equals_one_shot(name):
    layer = LAYERS[name]()
    randomize(layer, seed=13)
    x = torch.randn(2, 23, layer.d_model, generator=torch.Generator().manual_seed(14))
    one, chunked = layer.new_cache(2, 30), layer.new_cache(2, 30)
    with torch.no_grad():
        y1 = layer(x, one)
        y2 = torch.cat([layer(x[:, a:b], chunked) for a, b in [(0, 7), (7, 8), (8, 19), (19, 23)]], 1)
    assert rms_rel(y1, y2) <= 1e-4
    for k, v in one.state_tensors().items():
        assert rms_rel(v, chunked.state_tensors()[k]) <= 1e-5, k


@pytest.mark.parametrize("name", ["M", "D-sparse"])
def test_absorbed_decode_matches_non_absorbed(name):
    """One decode step in absorbed form equals decompressing the cached latents into per-head K/V."""
    layer = LAYERS[name]()
    randomize(layer, seed=15)
    x = torch.randn(1, 12, layer.d_model, generator=torch.Generator().manual_seed(16))
    cache = layer.new_cache(1, 16)
    with torch.no_grad():
        layer(x[:, :11], cache)
        y = layer(x[:, 11:], cache)
        # non-absorbed for the last query over the cached latents, restricted to what D selects
        q_nope, q_pe, _, _, _ = layer._project(x[:, 11:], torch.tensor([[11]]))
        latent = cache.latent[:, :12, 0]
        if isinstance(layer, DeepSeekSparseAttention):
            _, q_latent = layer._project_q(x[:, 11:])
            q_i, _, w = layer._index_qkw(x[:, 11:], q_latent, layer.rotary(torch.tensor([[11]])))
            scores = torch.einsum("bthd,bsd->btsh", q_i, cache.index_keys[:, :12]).relu()
            scores = (scores * w[:, :, None]).sum(-1)  # (1, 1, 12)
            keep = scores.topk(layer.index_topk, dim=-1).indices[0, 0]
            latent = latent[:, keep.sort().values]
        c_kv, k_pe = latent.split([layer.kv_lora_rank, layer.rope_dim], dim=-1)
        kv = layer.kv_b_proj(c_kv).view(1, -1, layer.n_heads, layer.nope_dim + layer.v_head_dim)
        k_nope, v = kv.split([layer.nope_dim, layer.v_head_dim], dim=-1)
        logits = torch.einsum("bhd,bshd->bhs", q_nope[:, 0], k_nope) + torch.einsum(
            "bhd,bsd->bhs", q_pe[:, 0], k_pe
        )
        p = (logits * layer.scale).softmax(-1)
        ref = layer.o_proj(torch.einsum("bhs,bshv->bhv", p, v).reshape(1, 1, -1))
    assert rms_rel(ref, y) <= 1e-5


@pytest.mark.parametrize("name", ["M", "D-sparse"])
def test_mixed_length_rows_decode_like_single_rows(name):
    layer = LAYERS[name]()
    randomize(layer, seed=17)
    x = torch.randn(2, 16, layer.d_model, generator=torch.Generator().manual_seed(18))
    lens = [9, 14]
    batched = layer.new_cache(2, 20)
    with torch.no_grad():
        for b, L in enumerate(lens):
            layer(x[b : b + 1, :L], batched.rows(b, b + 1))
        step = torch.stack([x[0, 9], x[1, 14]])[:, None]  # (2, 1, d)
        y = layer(step, batched)
        for b, L in enumerate(lens):
            alone = layer(x[b : b + 1, : L + 1])[:, -1:]
            assert rms_rel(alone, y[b : b + 1]) <= 1e-4
    assert batched.lengths.tolist() == [10, 15]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["M", "D-sparse"])
def test_cache_bytes_equal_declaration(name, dtype):
    layer = LAYERS[name]()
    spec = layer.cache_spec(dtype)
    per_token = layer.kv_lora_rank + layer.rope_dim + (layer.index_head_dim if name.startswith("D") else 0)
    assert spec.bytes_per_token == per_token * dtype.itemsize
    assert spec.constant_bytes == 0
    cache = layer.new_cache(3, 25, dtype=dtype)
    assert cache.nbytes() == 3 * spec.allocated_bytes(25)


def test_bf16_cache_decodes_close_to_float32():
    layer = LAYERS["D-sparse"]()
    randomize(layer, seed=19)
    x = torch.randn(1, 14, layer.d_model, generator=torch.Generator().manual_seed(20))
    with torch.no_grad():
        full = layer(x)
        cache = layer.new_cache(1, 16, dtype=torch.bfloat16)
        ys = [layer(x[:, :10], cache)] + [layer(x[:, t : t + 1], cache) for t in range(10, 14)]
    assert cache.latent.dtype == torch.bfloat16
    assert rms_rel(full, torch.cat(ys, 1)) <= 3e-2


def test_backward_reaches_mla_weights():
    layer = LAYERS["M"]()
    x = torch.randn(2, 9, layer.d_model, requires_grad=True)
    layer(x).square().sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in layer.parameters())


def test_bad_inputs_raise_value_errors():
    layer = LAYERS["M"]()
    with pytest.raises(ValueError, match="x: expected 3 dims"):
        layer(torch.randn(2, 5))
    with pytest.raises(ValueError, match="x: expected shape"):
        layer(torch.randn(2, 5, layer.d_model + 1))
    cache = layer.new_cache(2, 8)
    with torch.no_grad():
        with pytest.raises(ValueError, match="max_len"):
            layer(torch.randn(2, 9, layer.d_model), cache)
        layer(torch.randn(1, 3, layer.d_model), cache.rows(0, 1))
        with pytest.raises(ValueError, match="equal row lengths"):
            layer(torch.randn(2, 2, layer.d_model), cache)
    with pytest.raises(ValueError, match="index_head_dim"):
        build_dsa(tiny_cfg(pattern="D", index_head_dim=2), 0)


def test_load_from_hf_rejects_mismatch():
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention

    cfg = tiny_cfg()
    hf = DeepseekV3Attention(hf_v3_config(dataclasses.replace(cfg, kv_lora_rank=8)), 0)
    with pytest.raises(ValueError, match="kv_a_proj_with_mqa.weight: expected shape"):
        build_mla(cfg, 0).load_from_hf(hf)
    with pytest.raises(ValueError, match="indexer"):
        build_dsa(dataclasses.replace(cfg, pattern="D"), 0).load_from_hf(hf)
    assert isinstance(build_mla(cfg, 0), MultiHeadLatentAttention)


# ----------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("name", ["M", "D-sparse"])
def test_gpu_decode_matches_cpu_and_survives_cuda_graph_and_compile(name):
    layer = LAYERS[name]()
    randomize(layer, seed=21)
    x = torch.randn(2, 20, layer.d_model, generator=torch.Generator().manual_seed(22))
    with torch.no_grad():
        ref = layer(x)
        gpu = layer.cuda()
        xc = x.cuda()
        assert rms_rel(ref, gpu(xc).cpu()) <= 1e-4  # TF32-free float32 path on the GPU

        # decode steps 12..19 replayed from one captured CUDA graph (no host syncs inside)
        cache = gpu.new_cache(2, 24, device="cuda")
        gpu(xc[:, :12], cache)
        step_in = xc[:, 12:13].clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graphs documents
            gpu(step_in, cache)
        torch.cuda.current_stream().wait_stream(side)
        cache.lengths -= 1  # undo the warm-up step; capture records but does not run
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step_out = gpu(step_in, cache)
        outs = []
        for t in range(12, 20):
            step_in.copy_(xc[:, t : t + 1])
            graph.replay()
            outs.append(step_out.clone())
        assert cache.lengths.tolist() == [20, 20]
        assert rms_rel(ref[:, 12:20], torch.cat(outs, 1).cpu()) <= 1e-4

        # the same step under torch.compile(fullgraph=True)
        cache2 = gpu.new_cache(2, 24, device="cuda")
        gpu(xc[:, :12], cache2)
        step = torch.compile(lambda inp: gpu(inp, cache2), fullgraph=True)
        outs = [step(xc[:, t : t + 1]).clone() for t in range(12, 20)]
        assert rms_rel(ref[:, 12:20], torch.cat(outs, 1).cpu()) <= 1e-4


# ----------------------------------------------------------------------------- indexer training
INDEXER = ("wq_b", "wk", "k_norm", "weights_proj")


def _grads(layer, x, weight):
    layer.index_loss_weight = weight
    layer.zero_grad()
    xx = x.clone().requires_grad_(True)
    out = layer(xx)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return xx.grad, {n: (None if p.grad is None else p.grad.clone()) for n, p in layer.named_parameters()}


def test_indexer_loss_trains_only_the_indexer():
    layer = build_dsa(tiny_cfg(pattern="D", index_topk=5), 0).train()
    randomize(layer, seed=23)
    x = torch.randn(2, 19, layer.d_model, generator=torch.Generator().manual_seed(24))
    gx0, g0 = _grads(layer, x, 0.0)
    gx1, g1 = _grads(layer, x, 1.0)
    assert layer.last_indexer_loss is not None and float(layer.last_indexer_loss) > 0
    torch.testing.assert_close(gx1, gx0, rtol=1e-6, atol=1e-7)  # the input gets nothing from it
    for name, grad in g1.items():
        if name.split(".")[0] in INDEXER:
            assert g0[name] is None and grad is not None and grad.abs().sum() > 0, name
        else:
            torch.testing.assert_close(grad, g0[name], rtol=1e-6, atol=1e-7)


def test_indexer_loss_is_kl_to_head_summed_attention():
    """topk >= T: KL(mean-over-heads causal attention || softmax(I)) over each query's prefix."""
    layer = build_dsa(tiny_cfg(pattern="D", index_topk=64), 0).train()
    randomize(layer, seed=25)
    B, T = 2, 13
    x = torch.randn(B, T, layer.d_model, generator=torch.Generator().manual_seed(26))
    layer(x)
    with torch.no_grad():
        pos = torch.arange(T)[None].expand(B, T)
        q_nope, q_pe, latent, q_latent, cos_sin = layer._project(x, pos)
        c_kv, k_pe = latent.split([layer.kv_lora_rank, layer.rope_dim], dim=-1)
        k_nope = layer.kv_b_proj(c_kv).view(B, T, layer.n_heads, -1)[..., : layer.nope_dim]
        logits = torch.einsum("bthd,bshd->bhts", q_nope, k_nope) + torch.einsum("bthd,bsd->bhts", q_pe, k_pe)
        future = torch.ones(T, T, dtype=torch.bool).triu(1)
        p = (
            (logits * layer.scale).masked_fill(future, float("-inf")).softmax(-1).mean(1).double()
        )  # (B, T, S)
        q_i, k_i, w = layer._index_qkw(x, q_latent, cos_sin)
        index = (torch.einsum("bthd,bsd->btsh", q_i, k_i).relu() * w[:, :, None]).sum(-1)
        log_q = index.masked_fill(future, float("-inf")).log_softmax(-1).double()
        kl = torch.where(future, 0.0, p * (p.clamp_min(1e-30).log() - log_q)).sum(-1).mean()
    assert abs(float(layer.last_indexer_loss) - float(kl)) <= 1e-5 * float(kl)


def test_indexer_learns_to_follow_attention():
    layer = build_dsa(tiny_cfg(pattern="D", index_topk=6), 0).train()
    randomize(layer, seed=27)
    x = torch.randn(2, 24, layer.d_model, generator=torch.Generator().manual_seed(28))
    params = [p for n, p in layer.named_parameters() if n.split(".")[0] in INDEXER]
    opt = torch.optim.Adam(params, lr=3e-2)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        layer(x).sum().backward()
        losses.append(float(layer.last_indexer_loss))
        opt.step()
    assert losses[-1] < 0.6 * losses[0]


def test_topk_indices_are_the_ones_forward_attends_to():
    """Zeroing the latents of every position topk_indices does NOT pick leaves the output unchanged."""
    layer = LAYERS["D-sparse"]()
    randomize(layer, seed=29)
    x = torch.randn(1, 15, layer.d_model, generator=torch.Generator().manual_seed(30))
    with torch.no_grad():
        idx = layer.topk_indices(x)  # (1, 15, 6)
        assert idx.shape == (1, 15, 6) and bool((idx[0, 5:] >= 0).all())
        q_nope, q_pe, latent, q_latent, cos_sin = layer._project(x, layer._positions(x, None))
        scores = ops.dsa_index_scores(*layer._index_qkw(x, q_latent, cos_sin))
        y = layer._sparse_latent_attention(q_nope, q_pe, scores, latent)
        t = 14  # the last query: perturb every latent it did not select
        keep = torch.zeros(15, dtype=torch.bool)
        keep[idx[0, t]] = True
        noisy = torch.where(keep[None, :, None], latent, latent + 5.0)
        y2 = layer._sparse_latent_attention(q_nope, q_pe, scores, noisy)
    assert torch.allclose(y[0, t], y2[0, t], atol=1e-6)
    assert not torch.allclose(y[0, 3], y2[0, 3], atol=1e-3)  # early queries see perturbed positions
