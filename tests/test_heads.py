"""Dense heads: registry, shapes and batch invariance of every head, and exactness against references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from tiny_models import blocky_images, tiny_backbone

from pipeline.models.heads import _registry, create_head, head_options, list_heads, register_head
from pipeline.models.heads._base import gaussian_bias
from pipeline.models.heads.refine import REMOVED, key_smooth, prompt_denoise
from pipeline.models.prompts import build_text_classifier
from pipeline.vocab import Vocabulary

VOCAB = Vocabulary.from_entries(["red circle", "blue square, cube", "green triangle"])


def _text(bb):
    return build_text_classifier(bb, VOCAB, ("a photo of a {}.",))


def test_registry_lists_creates_and_validates():
    assert {"clip", "maskclip", "sclip", "clearclip", "naclip", "clsclip"} <= set(list_heads())
    head = create_head("maskclip", ks_thresh=None, pd_thresh=0.5)  # None = default, dropped
    assert head.pd_thresh == 0.5 and head.ks_thresh == 0.0 and head.residual and head.mlp
    with pytest.raises(ValueError, match="head 'maskclip' has no option 'sigma'; allowed: residual, mlp, ks_thresh"):
        create_head("maskclip", sigma=3)
    with pytest.raises(ValueError, match="unknown head 'segformer'; available: clearclip, clip"):
        create_head("segformer")
    with pytest.raises(ValueError, match="pd_thresh must be a probability"):
        create_head("maskclip", pd_thresh=2.0)
    assert head_options("naclip") == ["sigma", "residual", "mlp"]


def test_registering_a_name_again_warns_and_replaces():
    def clip_variant():
        return "first"

    def clip_variant_2():
        return "second"

    clip_variant_2.__name__ = "clip_variant"
    try:
        register_head(clip_variant)
        with pytest.warns(UserWarning, match="'clip_variant' is registered again"):
            register_head(clip_variant_2)
        assert create_head("clip_variant") == "second"
    finally:
        _registry._BUILDERS.pop("clip_variant", None)


@pytest.mark.parametrize("kind", ["vit", "resnet"])
@pytest.mark.parametrize("name", [h for h in list_heads() if h != "denseclip"])  # a student's: test_finetune.py
def test_head_shapes_finite_and_batch_invariant(name, kind):
    bb = tiny_backbone(kind)
    head, text = create_head(name), _text(bb)
    images = blocky_images(4, 64, seed=1)
    images = F.pad(images, (0, 32))  # 64 x 96: a grid other than the native one
    if name == "clsclip" and kind == "resnet":
        with pytest.raises(ValueError, match="needs a ViT"):
            head(bb, text, images)
        return
    batch = head(bb, text, images)
    grid = (64 // bb.stride, 96 // bb.stride)
    assert batch.shape == (4, len(VOCAB), *grid) and batch.dtype == torch.float32
    assert torch.isfinite(batch).all()
    one_by_one = torch.cat([head(bb, text, images[i : i + 1]) for i in range(4)])
    assert torch.allclose(batch, one_by_one, atol=1e-4)


@pytest.mark.parametrize("kind", ["vit", "resnet"])
def test_clip_head_pooled_feature_is_encode_image(kind):
    bb = tiny_backbone(kind)
    images = blocky_images(2, 64, seed=2)
    pooled = create_head("clip").encode(bb, images).pooled
    assert torch.allclose(pooled, bb.model.encode_image(images), atol=1e-5)


def _layer_norm(x, sd, prefix):
    return F.layer_norm(x, x.shape[-1:], sd[f"{prefix}.weight"], sd[f"{prefix}.bias"])


def _reference_maskclip_vit(bb, images, text_weights, residual: bool, mlp: bool):
    """MaskCLIP straight from the formulas, with torch ops on the state dict (no open_clip forward)."""
    sd = {k: v.float() for k, v in bb.model.state_dict().items()}
    patch = sd["visual.conv1.weight"].shape[-1]
    width = sd["visual.class_embedding"].shape[0]
    n_heads = bb.visual.transformer.resblocks[0].attn.num_heads
    n_blocks = len(bb.visual.transformer.resblocks)
    x = F.conv2d(images, sd["visual.conv1.weight"], stride=patch)
    b, _, gh, gw = x.shape
    x = torch.cat([sd["visual.class_embedding"].expand(b, 1, width), x.flatten(2).transpose(1, 2)], dim=1)
    x = _layer_norm(x + sd["visual.positional_embedding"], sd, "visual.ln_pre")

    def blk(i, name):
        return sd[f"visual.transformer.resblocks.{i}.{name}"]

    def qkv(i, h):
        return (h @ blk(i, "attn.in_proj_weight").T + blk(i, "attn.in_proj_bias")).chunk(3, dim=-1)

    def out_proj(i, o):
        return o @ blk(i, "attn.out_proj.weight").T + blk(i, "attn.out_proj.bias")

    def ffn(i, h):
        h = F.gelu(h @ blk(i, "mlp.c_fc.weight").T + blk(i, "mlp.c_fc.bias"))
        return h @ blk(i, "mlp.c_proj.weight").T + blk(i, "mlp.c_proj.bias")

    for i in range(n_blocks - 1):
        q, k, v = (t.reshape(b, -1, n_heads, width // n_heads).transpose(1, 2) for t in qkv(i, _ln1(x, sd, i)))
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(width // n_heads), dim=-1)
        x = x + out_proj(i, (attn @ v).transpose(1, 2).reshape(b, -1, width))
        x = x + ffn(i, _layer_norm(x, sd, f"visual.transformer.resblocks.{i}.ln_2"))
    last = n_blocks - 1
    y = out_proj(last, qkv(last, _ln1(x, sd, last))[2])  # value embedding, then the output projection
    if residual:
        y = x + y
    if mlp:
        y = y + ffn(last, _layer_norm(y, sd, f"visual.transformer.resblocks.{last}.ln_2"))
    feats = _layer_norm(y[:, 1:], sd, "visual.ln_post") @ sd["visual.proj"]
    cos = F.normalize(feats, dim=-1) @ F.normalize(text_weights, dim=-1).T  # (B, h*w, K)
    return cos.transpose(1, 2).reshape(b, -1, gh, gw)


def _ln1(x, sd, i):
    return _layer_norm(x, sd, f"visual.transformer.resblocks.{i}.ln_1")


@pytest.mark.parametrize("residual", [True, False])
def test_maskclip_vit_matches_a_plain_torch_reference(residual):
    bb = tiny_backbone("vit")
    vocab = Vocabulary.from_entries(["red circle", "blue square", "green triangle"])
    text = build_text_classifier(bb, vocab, ("a photo of a {}.",))
    images = blocky_images(2, 64, seed=3)
    ours = create_head("maskclip", residual=residual, mlp=residual)(bb, text, images)
    reference = _reference_maskclip_vit(bb, images, text.weights, residual, residual)
    assert torch.allclose(ours, reference, atol=1e-4)


def test_maskclip_resnet_is_the_value_path_on_layer4():
    bb = tiny_backbone("resnet")
    text = build_text_classifier(bb, Vocabulary.from_entries(["cat", "dog"]), ("a {}.",))
    images = blocky_images(2, 96, seed=4)
    layer4 = bb.visual.forward_intermediates(images, indices=[4], intermediates_only=True)["image_intermediates"][0]
    sd = bb.model.state_dict()
    x = layer4.flatten(2).transpose(1, 2)
    v = x @ sd["visual.attnpool.v_proj.weight"].T + sd["visual.attnpool.v_proj.bias"]
    feats = v @ sd["visual.attnpool.c_proj.weight"].T + sd["visual.attnpool.c_proj.bias"]
    reference = (F.normalize(feats, dim=-1) @ text.weights.T).transpose(1, 2).reshape(2, 2, 3, 3)
    assert torch.allclose(create_head("maskclip")(bb, text, images), reference, atol=1e-5)


def test_naclip_gaussian_prior():
    bias = gaussian_bias((3, 4), 5.0, 1, "cpu")
    assert bias.shape == (13, 13)
    assert torch.all(bias[0] == 0) and torch.all(bias[:, 0] == 0)
    assert torch.allclose(bias.diagonal()[1:], torch.ones(12))
    # patch (0, 0) is token 1, patch (2, 3) is token 1 + 2 * 4 + 3 = 12: squared distance 4 + 9 = 13
    assert math.isclose(bias[1, 12].item(), math.exp(-13 / 50), rel_tol=1e-6)


def test_prompt_denoising_removes_classes_that_are_nowhere_confident():
    scores = torch.tensor([[0.30, 0.30, 0.30, 0.30], [0.10, 0.10, 0.10, 0.40], [0.05, 0.05, 0.05, 0.05]])
    out = prompt_denoise(scores.view(1, 3, 2, 2).clone(), thresh=0.5)
    assert torch.all(out[0, 2] == REMOVED)  # never confident: removed
    assert torch.equal(out[0, :2], scores.view(3, 2, 2)[:2])  # class 1 wins one pixel: kept
    weak = torch.zeros(1, 3, 2, 2)  # every class at 1/3 everywhere: the best one is kept
    assert (prompt_denoise(weak, thresh=0.9)[0] == REMOVED).flatten(1).all(dim=1).tolist() == [False, True, True]


def test_key_smoothing_votes_among_pixels_with_similar_keys():
    # pixels 0-2 share key e0, pixel 3 has key e1; pixel 2 leans to class 1 although its key group says class 0
    keys = torch.tensor([[1.0, 0], [1, 0], [1, 0], [0, 1]]).view(1, 4, 2)
    scores = torch.tensor([[0.30, 0.30, 0.28, 0.0], [0.0, 0.0, 0.29, 0.3]]).view(1, 2, 2, 2)
    smoothed = key_smooth(scores, keys, thresh=1.0)
    assert smoothed.view(2, 4).argmax(dim=0).tolist() == [0, 0, 0, 1]
    assert smoothed.abs().max() <= 1.0
    untouched = key_smooth(scores, keys, thresh=0.0)  # no pixel is below 0: the probabilities themselves
    assert torch.allclose(untouched, torch.softmax(100 * scores, dim=1))


def test_maskclip_with_refinements_runs_on_both_backbones():
    for kind in ("vit", "resnet"):
        bb = tiny_backbone(kind)
        out = create_head("maskclip", ks_thresh=1.0, pd_thresh=0.3)(bb, _text(bb), blocky_images(2, 64, seed=5))
        assert out.shape == (2, 3, *bb.native_grid) and torch.isfinite(out).all()
