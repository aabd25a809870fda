"""ModelConfig (validation, JSON, presets) and HybridLM (every preset: forward/backward,
parameter count, caches == full forward, declared == allocated bytes; save/load)."""

import builtins
import errno
import json
import os

import pytest
import torch

from attnlab import HybridLM, ModelConfig
from attnlab.presets import preset_names

TINY = dict(d_model=32, n_layers=8, vocab_size=64)


def rms_rel(ref: torch.Tensor, out: torch.Tensor) -> float:
    return ((ref - out).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()


def tiny(name: str, **kw) -> HybridLM:
    return HybridLM(ModelConfig.preset(name, **{**TINY, **kw})).eval()


# ----------------------------------------------------------------------------- config


def test_pattern_tiles_or_is_full_length():
    assert ModelConfig(pattern="GGGS", n_layers=8).layer_pattern == "GGGSGGGS"
    assert ModelConfig(pattern="SWSWW", n_layers=5).layer_pattern == "SWSWW"
    assert ModelConfig(pattern="S", n_layers=3).layer_pattern == "SSS"


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(pattern="SX"), r"unknown letter\(s\) 'X'.*valid letters: S \(softmax"),
        (dict(pattern="GGG", n_layers=4), r"pattern: 'GGG' has 3 letters.*n_layers=4"),
        (dict(pattern=""), "pattern: expected a non-empty string"),
        (dict(n_heads=3), r"n_heads: d_model=256 is not divisible by n_heads=3"),
        (dict(n_heads=4, n_kv_heads=3), r"n_kv_heads: n_heads=4 is not a multiple of n_kv_heads=3"),
        (dict(head_dim=7), "head_dim: RoPE needs an even head_dim"),
        (dict(d_model=0), "d_model: expected a positive int"),
        (dict(rope_fraction=1.5), r"rope_fraction: expected a value in \[0, 1\]"),
        (dict(head_dim=10, rope_fraction=0.5), "rope_fraction: head_dim 10 .* = 5 rotated dims"),
        (dict(pattern="G", linear_n_heads=3, linear_n_key_heads=2), "linear_n_heads: 3 value heads"),
        (dict(pattern="M", qk_rope_head_dim=3), "qk_rope_head_dim: RoPE needs an even size"),
        (dict(rope_scaling={"type": "ntk"}), "rope_scaling: only 'yarn'"),
    ],
)
def test_validate_errors_say_what_to_change(kw, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**kw).validate()
    with pytest.raises(ValueError, match=match):
        HybridLM(ModelConfig(**kw))


def test_json_roundtrip_and_unknown_field(tmp_path):
    cfg = ModelConfig.preset("minimax-01", **TINY)
    again = ModelConfig.from_json(cfg.to_json())
    assert again == cfg
    path = tmp_path / "c.json"
    cfg.to_json(str(path))
    assert ModelConfig.from_json(str(path)) == cfg
    d = json.loads(cfg.to_json())
    d["n_experts"] = 4
    with pytest.raises(ValueError, match="unknown field.*n_experts"):
        ModelConfig.from_dict(d)


def test_to_json_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    """A write that fails part-way (disk full) leaves the file that was there, not a truncated one."""
    path = tmp_path / "c.json"
    path.write_text("previous\n")

    class DiskFull:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def failing(real):
        def opener(file, mode="r", *args, **kwargs):
            f = real(file, mode, *args, **kwargs)
            return DiskFull(f) if "w" in mode else f

        return opener

    cfg = ModelConfig.preset("llama", **TINY)
    monkeypatch.setattr(builtins, "open", failing(builtins.open))
    monkeypatch.setattr(os, "fdopen", failing(os.fdopen))
    with pytest.raises(OSError):
        cfg.to_json(str(path))
    monkeypatch.undo()
    assert path.read_text() == "previous\n"
    assert [p.name for p in tmp_path.iterdir()] == ["c.json"]  # no temp file left behind


def test_preset_overrides_and_errors():
    cfg = ModelConfig.preset("qwen3-next", d_model=128, n_layers=8, window=7, norm_eps=1e-5)
    assert (cfg.d_model, cfg.n_layers, cfg.window, cfg.norm_eps) == (128, 8, 7, 1e-5)
    assert cfg.n_heads == 2 and cfg.attn_head_dim == 64  # heads follow d_model
    assert cfg.norm_zero_centered and cfg.attn_output_gate and cfg.qk_norm and cfg.rope_dim == 16
    with pytest.raises(ValueError, match="unknown 'gpt5'.*llama"):
        ModelConfig.preset("gpt5")
    with pytest.raises(ValueError, match="unknown field.*heads"):
        ModelConfig.preset("llama", heads=4)
    with pytest.raises(ValueError, match="pattern"):
        ModelConfig.preset("minimax-01", n_layers=4)  # LLLLLLLS does not tile 4 layers


def test_preset_patterns_match_design():
    want = {
        "llama": "S", "swa": "WWWS", "deepseek-v3": "M", "deepseek-v32": "D", "minimax-01": "LLLLLLLS",
        "qwen3-next": "GGGS", "kimi-linear": "KKKM", "lightning": "L", "gdn": "G", "kda": "K",
    }
    assert set(preset_names()) == set(want)
    for name, pattern in want.items():
        assert ModelConfig.preset(name).pattern == pattern
    mm = ModelConfig.preset("minimax-01", n_layers=80)
    assert mm.postnorm and abs(mm.attn_alpha - 3.5565588200778455) < 1e-12  # MiniMax-Text-01's value


# ----------------------------------------------------------------------------- every preset


@pytest.mark.parametrize("name", preset_names())
def test_preset_forward_backward_and_param_count(name):
    model = tiny(name).train()
    assert model.num_params() == sum(p.numel() for p in model.parameters())
    tokens = torch.randint(0, 64, (2, 13))
    logits = model(tokens)
    assert logits.shape == (2, 13, 64) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten()).backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    assert model.embed.weight.grad.abs().sum() > 0 and model.blocks[0].mixer_norm.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", preset_names())
def test_preset_cached_decode_equals_full_forward(name):
    # window 4 so the swa preset's ring buffers wrap within the test
    model = tiny(name, window=4, index_topk=6)
    T, n = 9, 4
    tokens = torch.randint(0, 64, (2, T + n))
    with torch.no_grad():
        ref = model(tokens)
        caches = model.new_caches(2, T + n)
        outs = [model(tokens[:, :T], caches)] + [model(tokens[:, t : t + 1], caches) for t in range(T, T + n)]
        assert rms_rel(ref, torch.cat(outs, 1)) <= 1e-4
        # chunked prefill == one-shot prefill (chunks not aligned to anything)
        chunked = model.new_caches(2, T + n)
        parts = [model(tokens[:, a:b], chunked) for a, b in ((0, 2), (2, 7), (7, T + n))]
        assert rms_rel(ref, torch.cat(parts, 1)) <= 1e-4
    for c in caches:
        assert c.lengths.tolist() == [T + n, T + n]


@pytest.mark.parametrize("name", preset_names())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_preset_cache_bytes_declared_equal_allocated(name, dtype):
    model = tiny(name, window=4)
    batch, max_len = 3, 10
    caches = model.new_caches(batch, max_len, dtype=dtype)
    specs = model.cache_specs(dtype)
    assert len(caches) == len(specs) == model.cfg.n_layers
    for c, s in zip(caches, specs, strict=True):
        assert c.nbytes() == batch * s.allocated_bytes(max_len)
    assert sum(c.nbytes() for c in caches) == model.cache_bytes(max_len, batch, dtype)


def test_cache_byte_reports():
    model = tiny("swa", window=4, sink_tokens=1)  # WWWS x2: 6 windowed layers, 2 full
    per = 2 * model.cfg.kv_heads * model.cfg.attn_head_dim * 2  # K and V in bf16
    assert model.cache_bytes_per_token() == 2 * per
    assert model.cache_constant_bytes() == 6 * 5 * per
    assert model.cache_bytes(100) == 2 * per * 100 + 6 * per * 5
    assert model.cache_bytes(3) == 8 * per * 3


def test_new_caches_default_to_model_dtype_and_device():
    model = tiny("llama").to(torch.bfloat16)
    caches = model.new_caches(1, 4)
    assert caches[0].k.dtype == torch.bfloat16 and caches[0].k.device == model.embed.weight.device


def test_forward_errors():
    model = tiny("llama")
    with pytest.raises(ValueError, match="tokens"):
        model(torch.randn(2, 3))
    with pytest.raises(ValueError, match="one cache per layer"):
        model(torch.zeros(1, 2, dtype=torch.long), model.new_caches(1, 4)[:3])


def test_tied_embeddings_share_one_tensor():
    untied, tied = tiny("llama"), tiny("llama", tie_embeddings=True)
    assert tied.lm_head.weight is tied.embed.weight
    assert untied.num_params() - tied.num_params() == 64 * 32


def test_minimax_residual_uses_normalized_stream():
    model = tiny("minimax-01")
    block = model.blocks[7]  # the S layer
    h = torch.randn(1, 5, 32)
    with torch.no_grad():
        x = block.mixer_norm(h)
        h1 = block.mixer_alpha * x + block.mixer_beta * block.mixer(x)
        x1 = block.mlp_norm(h1)
        want = block.mlp_alpha * x1 + block.mlp_beta * block.mlp(x1)
        assert rms_rel(want, block(h)) < 1e-6
    assert block.mixer_alpha == (2 * 8) ** 0.25


# ----------------------------------------------------------------------------- save / load


@pytest.mark.parametrize(
    "name,kw",
    [
        ("swa", dict(attn_output_gate=True, qk_norm=True, norm_zero_centered=True)),
        ("deepseek-v3", {}),
        ("llama", dict(tie_embeddings=True)),
    ],
)
def test_save_load_roundtrip(tmp_path, name, kw):
    model = tiny(name, **kw)
    tokens = torch.randint(0, 64, (1, 11))
    out = tmp_path / "ckpt"
    model.save_pretrained(out)
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    assert not [p for p in os.listdir(tmp_path) if p != "ckpt"]  # no staging dir left behind
    again = HybridLM.from_pretrained(out)
    assert again.cfg == model.cfg
    with torch.no_grad():
        assert torch.equal(model(tokens), again(tokens))
    if kw.get("tie_embeddings"):
        assert again.lm_head.weight is again.embed.weight


def test_save_refuses_non_empty_dir_unless_overwrite(tmp_path):
    model = tiny("llama")
    (tmp_path / "x.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        model.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors", "x.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    model.save_pretrained(empty)  # an existing empty directory is fine
    assert HybridLM.from_pretrained(empty).cfg == model.cfg


def test_failed_save_leaves_nothing_half_written(tmp_path, monkeypatch):
    import safetensors.torch

    def boom(*a, **k):
        raise OSError("disk full")

    model = tiny("llama")
    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path / "new")
    assert os.listdir(tmp_path) == []  # neither the target nor a staging dir


def test_interrupted_overwrite_is_refused_on_load(tmp_path, monkeypatch):
    """save_pretrained(overwrite=True) replaces the weights, then config.json: a crash between the
    two leaves new weights beside the old config, which must not load silently (here both configs
    give the same shapes, so only the save id can tell)."""
    tiny("llama").save_pretrained(tmp_path)
    other = tiny("llama", rope_theta=500.0)
    real_replace = os.replace

    def replace(src, dst):
        if str(dst).endswith("config.json"):
            raise OSError("power cut")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="power cut"):
        other.save_pretrained(tmp_path, overwrite=True)
    monkeypatch.setattr(os, "replace", real_replace)
    with pytest.raises(ValueError, match="different save"):
        HybridLM.from_pretrained(tmp_path)
    other.save_pretrained(tmp_path, overwrite=True)  # a complete save loads again
    assert HybridLM.from_pretrained(tmp_path).cfg == other.cfg
    assert ModelConfig.from_json(str(tmp_path / "config.json")) == other.cfg  # the id is not a field


def test_from_pretrained_validates(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        HybridLM.from_pretrained(tmp_path)
    model = tiny("llama")
    model.save_pretrained(tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    cfg["d_ff"] = 64  # the default for d_model 32 is 96
    (tmp_path / "a" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="shape"):
        HybridLM.from_pretrained(tmp_path / "a")
    cfg["d_ff"] = None
    cfg["pattern"] = "SW"
    (tmp_path / "a" / "config.json").write_text(json.dumps(cfg))
    HybridLM.from_pretrained(tmp_path / "a")  # S and W have the same weights: loads
    cfg["pattern"] = "M"
    (tmp_path / "a" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="missing"):
        HybridLM.from_pretrained(tmp_path / "a")
    cfg["pattern"] = "Q"
    (tmp_path / "a" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unknown letter"):
        HybridLM.from_pretrained(tmp_path / "a")


def test_from_pretrained_dtype_and_bf16_save(tmp_path):
    model = tiny("llama").to(torch.bfloat16)
    model.save_pretrained(tmp_path / "b")
    again = HybridLM.from_pretrained(tmp_path / "b")
    assert again.embed.weight.dtype == torch.bfloat16
    assert HybridLM.from_pretrained(tmp_path / "b", dtype=torch.float32).embed.weight.dtype == torch.float32


def test_out_of_vocabulary_tokens_raise_value_error():
    model = tiny("llama")
    with pytest.raises(ValueError, match=r"tokens: id 64 is outside the vocabulary \[0, 64\)"):
        model(torch.tensor([[1, 64]]))
    with pytest.raises(ValueError, match="id -1"):
        model(torch.tensor([[-1, 3]]))
    assert model(torch.tensor([[0, 63]])).shape == (1, 2, 64)


# ----------------------------------------------------------------------------- GPU (device machine)


@pytest.mark.gpu
@pytest.mark.parametrize(("name", "gate"), [("minimax-01", 0), ("qwen3-next", 1), ("kimi-linear", 2)])
def test_gpu_preset_trains_through_the_triton_kernels(name, gate, monkeypatch):
    """A training step of a tiny preset on CUDA (float32, 2 x 150 tokens: three chunks) runs its
    linear layers through the Triton kernels with their autograd (linear._ChunkFunction, seen with
    inputs that need gradients), and its loss and every parameter's gradient equal the CPU step's
    (the chunked PyTorch path)."""
    from attnlab.kernels import linear

    seen = []
    apply = linear._ChunkFunction.apply

    def spy(*args):
        seen.append((args[0], args[1].requires_grad))
        return apply(*args)

    monkeypatch.setattr(linear._ChunkFunction, "apply", staticmethod(spy))
    torch.manual_seed(0)
    model = tiny(name).train()
    tokens = torch.randint(0, 64, (2, 150))
    results = []
    for device in ("cpu", "cuda"):
        model.zero_grad(set_to_none=True)
        model.to(device)
        logits = model(tokens.to(device))
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.to(device).flatten())
        loss.backward()
        results.append((loss.item(), {n: p.grad.detach().cpu() for n, p in model.named_parameters()}))
        if device == "cpu":
            assert not seen  # the CPU step takes the chunked PyTorch path
    assert (gate, True) in seen
    (loss_cpu, grads_cpu), (loss_gpu, grads_gpu) = results
    assert abs(loss_gpu - loss_cpu) <= 1e-4 * abs(loss_cpu)
    for n, g in grads_cpu.items():
        assert torch.isfinite(grads_gpu[n]).all(), n
        assert rms_rel(g, grads_gpu[n]) <= 2e-3, (n, rms_rel(g, grads_gpu[n]))
