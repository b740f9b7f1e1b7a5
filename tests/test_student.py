"""The DenseCLIP student's options, against what they claim to reproduce (`pipeline.models.student`)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import blocky_images, fresh_backbone

from pipeline.config import ModelCfg, StudentCfg
from pipeline.models.backbone import Backbone, load_backbone
from pipeline.models.heads import create_head
from pipeline.models.student import DenseCLIP
from pipeline.models.student.encoder import ImageEncoder


def _backbone(kind: str) -> Backbone:
    """The shipped ViT (a DenseCLIP ViT needs 4 blocks; the tiny test ViT has 3) or the tiny ResNet."""
    return (
        load_backbone(ModelCfg(name="shapes-clip", precision="fp32", device="cpu"))
        if kind == "vit"
        else fresh_backbone(kind)
    )


@pytest.mark.parametrize("kind", ["vit", "resnet"])
def test_value_path_dense_embedding_is_the_maskclip_heads(kind):
    bb = _backbone(kind)
    images = blocky_images(2, 64, seed=3)
    with torch.no_grad():
        _, global_, dense = ImageEncoder(bb.visual, dense="value")(images)
        _, reference_global, attention_dense = ImageEncoder(bb.visual)(images)
    teacher = create_head("maskclip").encode(bb, images)
    torch.testing.assert_close(dense, teacher.dense, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(global_, reference_global)  # only the dense path changes
    assert not torch.allclose(dense, attention_dense, atol=1e-3)


def test_contexts_from_a_phrase_give_clips_own_prompt_embeddings():
    bb = _backbone("vit")
    names = ["red circle", "a blue square with a long name"]
    student = DenseCLIP(bb.model, bb.tokenizer, StudentCfg(n_contexts=4, context_init="a photo of a"))
    with torch.no_grad():
        prompted = student.text(student.text.tokenize(names))
        clip = bb.model.encode_text(bb.tokenizer([f"a photo of a {n}" for n in names])).float()
        random = DenseCLIP(bb.model, bb.tokenizer, StudentCfg(n_contexts=4)).text(student.text.tokenize(names))
    torch.testing.assert_close(prompted, clip, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(random, clip, atol=1e-2)
    with pytest.raises(ValueError, match=r"'a photo of a' is 4 tokens; set n_contexts to 4 \(it is 8\)"):
        DenseCLIP(bb.model, bb.tokenizer, StudentCfg(n_contexts=8, context_init="a photo of a"))


def test_overlapping_patches_double_the_output_grid():
    bb = _backbone("vit")
    patch = bb.visual.patch_size[0]
    images = blocky_images(2, 64, seed=4)
    with torch.no_grad():
        plain = DenseCLIP(bb.model, bb.tokenizer, StudentCfg(fpn_width=16, fpn_head_width=16)).eval()
        half = DenseCLIP(
            bb.model, bb.tokenizer, StudentCfg(fpn_width=16, fpn_head_width=16, patch_stride=patch // 2)
        ).eval()
        tokens = plain.text.tokenize(["red circle"])
        scores, aux = plain(images, tokens, torch.tensor([0]), 1)
        fine_scores, fine_aux = half(images, tokens, torch.tensor([0]), 1)
    assert aux.shape[-1] == 64 // patch and fine_aux.shape[-1] == 2 * 64 // patch
    assert fine_scores.shape[-1] == 2 * scores.shape[-1] == 2 * 64 * 4 // patch
    assert half.stride == plain.stride / 2
    for bad in (patch + 1, patch - 2):  # wider than a patch; not a divisor of it
        with pytest.raises(ValueError, match=f"patch_stride must divide evenly into the patch size {patch}"):
            ImageEncoder(bb.visual, patch_stride=bad)
    with pytest.raises(ValueError, match="patch_stride applies to a ViT"):
        ImageEncoder(fresh_backbone("resnet").visual, patch_stride=2)


@pytest.mark.parametrize("kind", ["vit", "resnet"])
def test_three_fpn_levels_leave_out_the_finest_and_decode_at_twice_its_stride(kind):
    bb = _backbone(kind)
    images = blocky_images(2, 64, seed=6)
    encoders = {}
    for levels in (4, 3):
        torch.manual_seed(0)  # the kept adapters draw the same initial weights
        encoders[levels] = ImageEncoder(bb.visual, levels=levels).eval()
    with torch.no_grad():
        (all_feats, global4, dense4), (feats, global3, dense3) = (encoders[n](images) for n in (4, 3))
    assert len(feats) == 3 and encoders[3].strides == encoders[4].strides[1:]
    for kept, full in zip(feats, all_feats[1:], strict=True):
        torch.testing.assert_close(kept, full)
    torch.testing.assert_close((global3, dense3), (global4, dense4))
    assert encoders[3].output_stride == encoders[4].output_stride
    options = {"fpn_width": 16, "fpn_head_width": 16}
    four = DenseCLIP(bb.model, bb.tokenizer, StudentCfg(**options)).eval()
    three = DenseCLIP(bb.model, bb.tokenizer, StudentCfg(fpn_levels=3, **options)).eval()
    with torch.no_grad():
        tokens = four.text.tokenize(["red circle", "blue square"])
        scores4, _ = four(images, tokens, torch.tensor([0, 1]), 2)
        scores3, _ = three(images, tokens, torch.tensor([0, 1]), 2)
    assert three.stride == 2 * four.stride and scores3.shape[-1] * 2 == scores4.shape[-1] == 64 / four.stride
    assert sum(p.numel() for p in three.parameters()) < sum(p.numel() for p in four.parameters())
    # The score map's mix of text embeddings joins the FPN at the patch step (stride 32 for a ResNet).
    two = DenseCLIP(bb.model, bb.tokenizer, StudentCfg(fpn_levels=2, **options)).eval()
    for student in (four, three, two):
        joined = student.image.strides[student.concat_index]
        assert joined == (student.image.patch_stride if kind == "vit" else 32)
    with torch.no_grad():
        scores2, _ = two(images, tokens, torch.tensor([0, 1]), 2)
    assert two.stride == 2 * three.stride and scores2.shape[-1] * 2 == scores3.shape[-1]
    for bad in (1, 5):
        with pytest.raises(ValueError, match=f"fpn_levels must be 2, 3 or 4 \\(the reference\\), got {bad}"):
            ImageEncoder(bb.visual, levels=bad)


def test_a_residual_student_starts_as_its_dense_embedding():
    bb = _backbone("vit")
    images = blocky_images(2, 64, seed=5)
    student = DenseCLIP(
        bb.model, bb.tokenizer, StudentCfg(gamma_init=0.0, dense="value", residual=True, fpn_width=16)
    ).eval()
    with torch.no_grad():
        tokens = student.text.tokenize(["red circle", "blue square"])
        scores, _ = student(images, tokens, torch.tensor([0, 1]), 2)
        _, _, dense = student.image(images)
        text = torch.nn.functional.normalize(student.text(tokens), dim=-1)
        dense = torch.nn.functional.interpolate(dense, size=scores.shape[-2:], mode="bilinear", align_corners=False)
        expected = torch.einsum("bchw,nc->bnhw", torch.nn.functional.normalize(dense, dim=1), text)
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-5)
    plain = DenseCLIP(bb.model, bb.tokenizer, StudentCfg(gamma_init=0.0, dense="value", fpn_width=16)).eval()
    with torch.no_grad():
        assert not torch.allclose(plain(images, tokens, torch.tensor([0, 1]), 2)[0], expected, atol=1e-2)
