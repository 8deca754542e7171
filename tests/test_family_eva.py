"""EVA specifics beyond the shared family checks (tests/test_families.py, which runs the packed-GLU EVA02-Ti layout):
the SwiGLU ``scale_mlp`` / ``scale_attn_inner`` / unfused-qkv layout of EVA02-S/B/L and the CLIP models, post-norm
blocks, what the q/k points see (rotated queries and keys), the merged qkv Linear and the refused configurations."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import random_timm_model, rel_diff, seeded_randn
from torch import nn

import vitq
from vitq import QuantConfig
from vitq.errors import VitqError
from vitq.nn.attention import QuantEvaAttention

NAME = "eva02_tiny_patch14_224"
#: two blocks of width 64, 4×4 patches: small enough for every check to take well under a second
SMALL = {"depth": 2, "embed_dim": 64, "num_heads": 2, "img_size": 56}
#: the EVA02-S/B/L layout (SwiGLU with its hidden LayerNorm, unfused q/k/v) plus the CLIP models' inner attention
#: norm, LayerScale, register tokens and a classifier
SWIGLU = {"scale_mlp": True, "scale_attn_inner": True, "qkv_fused": False, "init_values": 0.1, "num_reg_tokens": 2,
          "num_classes": 10}
POST_NORM = {"use_post_norm": True, "scale_mlp": True, "num_classes": 10}


def build(**kwargs) -> nn.Module:
    """A small random EVA02 (seed 0, parameters nudged), timm's attention on its non-fused path (the reference the
    wrapped model must reproduce)."""
    return random_timm_model(NAME, **{**SMALL, **kwargs})


def images(n: int = 2) -> torch.Tensor:
    return seeded_randn(n, 3, SMALL["img_size"], SMALL["img_size"], seed=1)


def _input_roles(qmodel, prefix: str) -> dict[str, str]:
    """The activation role of each point under ``prefix`` (LayerNorm inputs left out)."""
    return {name.removeprefix(prefix): role for name, point in qmodel.points().items() if name.startswith(prefix)
            for role in point.slot_roles.values() if role not in ("weight", "pre_ln")}


@torch.no_grad()
@pytest.mark.parametrize("kwargs", [SWIGLU, POST_NORM, {"rope_rotate_half": True, "qk_norm": True}],
                         ids=["swiglu", "post_norm", "rotate_half"])
def test_variants_keep_the_float_function_and_compose(kwargs):
    model, x = build(**kwargs), images()
    qmodel = vitq.prepare(model, QuantConfig(method="float"), model_name=NAME)
    out = qmodel(x)
    assert rel_diff(out, model(x)) <= 1e-5
    staged = x
    for stage in qmodel.stages():
        staged = stage.run(staged)
    assert torch.equal(staged, out)


def test_swiglu_points_roles_and_pairs():
    """The ViT point names with SwiGLU's two first Linears; every Linear after a LayerNorm reads ``post_ln``, and the
    fold pairs are the LayerNorms with a single Linear reader (``norm2`` feeds both ``fc1_g`` and ``fc1_x``)."""
    qmodel = vitq.prepare(build(**SWIGLU), QuantConfig(method="float"), model_name=NAME)
    assert _input_roles(qmodel, "blocks.0.") == {
        "attn.qkv": "post_ln", "attn.q": "attn_q", "attn.k": "attn_k", "attn.v": "attn_v", "attn.softmax": "softmax",
        "attn.proj": "post_ln", "mlp.fc1_g": "post_ln", "mlp.fc1_x": "post_ln", "mlp.fc2": "post_ln"}
    assert qmodel.points()["head"].slot_roles["input_quantizer"] == "act"
    assert qmodel.norm_linear_pairs() == [
        (f"blocks.{i}.{norm}", f"blocks.{i}.{linear}") for i in range(2)
        for norm, linear in (("norm1", "attn.qkv"), ("mlp.norm", "mlp.fc2"), ("attn.norm", "attn.proj"))]


@torch.no_grad()
def test_pairs_feed_their_linear():
    """Each listed LayerNorm's output is exactly its Linear's input (the condition of the RepQ-style fold)."""
    qmodel = vitq.prepare(build(**SWIGLU), QuantConfig(method="float"), model_name=NAME)
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for norm, linear in qmodel.norm_linear_pairs():
        handles.append(qmodel.model.get_submodule(norm).register_forward_hook(
            lambda m, a, out, key=norm: seen.__setitem__(key, out)))
        handles.append(qmodel.model.get_submodule(linear).register_forward_pre_hook(
            lambda m, a, key=linear: seen.__setitem__(key, a[0])))
    try:
        qmodel(images())
    finally:
        for handle in handles:
            handle.remove()
    for norm, linear in qmodel.norm_linear_pairs():
        assert torch.equal(seen[norm], seen[linear]), (norm, linear)


def test_post_norm_blocks_read_the_residual_stream():
    """``x + norm1(attn(x))``: ``qkv`` and the first MLP Linears read the stream (``act``); ``norm1`` / ``norm2`` are
    no fold pairs, the MLP's inner norm still is."""
    qmodel = vitq.prepare(build(**POST_NORM), QuantConfig(method="float"), model_name=NAME)
    roles = _input_roles(qmodel, "blocks.1.")
    assert (roles["attn.qkv"], roles["mlp.fc1_g"], roles["mlp.fc1_x"], roles["mlp.fc2"]) == ("act", "act", "act",
                                                                                             "post_ln")
    assert qmodel.norm_linear_pairs() == [("blocks.0.mlp.norm", "blocks.0.mlp.fc2"),
                                          ("blocks.1.mlp.norm", "blocks.1.mlp.fc2")]


@torch.no_grad()
def test_q_and_k_points_see_the_rotated_queries_and_keys():
    """The q point sees ``scale·RoPE(q)`` and the k point ``RoPE(k)`` (prefix tokens unrotated), computed here with
    timm's own rotation from the qkv output."""
    from timm.layers import apply_rot_embed_cat

    model = build(**SWIGLU)
    qmodel = vitq.prepare(model, QuantConfig(method="float"), model_name=NAME)
    attn = qmodel.model.get_submodule("blocks.1.attn")
    assert isinstance(attn, QuantEvaAttention)
    seen: dict[str, torch.Tensor] = {}
    handles = [attn.get_submodule(p).register_forward_pre_hook(lambda m, a, key=p: seen.__setitem__(key, a[0]))
               for p in ("qkv", "q", "k")]
    try:
        qmodel(images())
    finally:
        for handle in handles:
            handle.remove()
    x = seen["qkv"]
    q, k, _ = attn.qkv(x).reshape(*x.shape[:2], 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    rope, npt = model.rope.get_embed(), model.num_prefix_tokens
    assert npt == 3

    def rotated(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([t[:, :, :npt], apply_rot_embed_cat(t[:, :, npt:], rope)], dim=2)

    assert torch.equal(seen["q"], rotated(q) * attn.scale)
    assert torch.equal(seen["k"], rotated(k))
    assert not torch.allclose(seen["k"], k)


def test_unfused_qkv_is_one_linear_with_merged_bias():
    """``q_proj`` / ``k_proj`` / ``v_proj`` become one ``qkv`` Linear: stacked weights, bias ``cat(q, 0, v)``."""
    model = build(**SWIGLU)
    timm_attn = model.blocks[0].attn
    qmodel = vitq.prepare(model, QuantConfig(method="float"), model_name=NAME)
    qkv = qmodel.model.get_submodule("blocks.0.attn.qkv")
    projs = (timm_attn.q_proj, timm_attn.k_proj, timm_attn.v_proj)
    assert torch.equal(qkv.weight, torch.cat([p.weight for p in projs]))
    assert torch.equal(qkv.bias, torch.cat([timm_attn.q_proj.bias, torch.zeros(64), timm_attn.v_proj.bias]))
    keys = qmodel.model.state_dict()
    assert "blocks.0.attn.qkv.bias" in keys and not any("q_proj" in key or "q_bias" in key for key in keys)


@torch.no_grad()
def test_save_load_of_the_merged_layout_is_bit_identical(tmp_path, monkeypatch):
    """The file holds the merged ``qkv``; loading wraps a fresh timm model (unfused) the same way, on meta first."""
    import vitq.export.checkpoint as checkpoint

    model, x = build(**SWIGLU), images()
    qmodel = vitq.quantize(model, QuantConfig(method="percentile", w_bits=8, a_bits=8, calib_size=2), x,
                           model_name=NAME, progress=False)
    small = copy.deepcopy(build(**SWIGLU))
    monkeypatch.setattr(checkpoint, "create_architecture",
                        lambda model_name, device=None: copy.deepcopy(small).to(device or "cpu"))
    path = vitq.save(qmodel, tmp_path / "q.safetensors")
    assert torch.equal(vitq.load(path)(x), qmodel(x))


@pytest.mark.parametrize("kwargs, words", [
    ({"attn_type": "rope"}, "EvaAttention only"),
    ({"dynamic_img_size": True}, "dynamic_img_size"),
])
def test_unsupported_configurations_are_refused_in_one_line(kwargs, words):
    model = build(**kwargs)
    with pytest.raises(VitqError, match=words) as err:
        vitq.prepare(model, QuantConfig(method="float"), model_name=NAME)
    assert "\n" not in str(err.value)
