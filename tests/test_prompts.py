"""Prompt templates and the text classifier (ensembling, synonyms, cache)."""

from __future__ import annotations

import fsspec
import open_clip
import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_backbone

from pipeline.models.prompts import build_text_classifier, list_template_sets, load_templates
from pipeline.vocab import Vocabulary

SCENE = (
    "there is a {} in the scene.",
    "there is the {} in the scene.",
    "this is a {} in the scene.",
    "this is the {} in the scene.",
    "this is one {} in the scene.",
)


def test_named_template_sets():
    openai80 = load_templates("openai80")
    assert len(openai80) == 80 and openai80[0] == open_clip.OPENAI_IMAGENET_TEMPLATES[0]("{}")
    assert load_templates("maskclip85") == openai80 + SCENE
    assert load_templates("single") == ("a photo of a {}.",)
    assert {"openai80", "maskclip85", "single"} <= set(list_template_sets())
    with pytest.raises(ValueError, match="unknown template set 'imagenet'.*openai80"):
        load_templates("imagenet")


def test_user_template_files(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text("# my prompts\nan image of a {}.\n\n  a {} seen from above.  \n")
    assert load_templates(str(path)) == ("an image of a {}.", "a {} seen from above.")
    url = "memory://clipdense-test/templates/mine.txt"
    with fsspec.open(url, "w") as f:
        f.write("a {}\n")
    assert load_templates(url) == ("a {}",)
    path.write_text("a photo of a {}.\na photo without a slot\n")
    with pytest.raises(ValueError, match="line 2: template 'a photo without a slot' has no"):
        load_templates(str(path))
    with pytest.raises(FileNotFoundError):
        load_templates(str(tmp_path / "missing.txt"))


def test_classifier_is_the_normalised_mean_of_normalised_template_embeddings():
    bb = tiny_backbone("vit")
    templates = ("a photo of a {}.", "a sketch of the {}.", "{}")
    vocab = Vocabulary.from_entries(["cat", "tv, monitor"])
    clf = build_text_classifier(bb, vocab, templates)
    assert clf.weights.shape == (3, 32) and clf.n_classes == 2
    assert clf.class_index.tolist() == [0, 1, 1]
    tokens = bb.tokenizer([t.replace("{}", "monitor") for t in templates])
    per_template = F.normalize(bb.model.encode_text(tokens).float(), dim=-1)
    expected = F.normalize(per_template.mean(dim=0), dim=-1)
    assert torch.allclose(clf.weights[2], expected, atol=1e-5)
    assert torch.allclose(clf.weights.norm(dim=-1), torch.ones(3), atol=1e-5)


def test_class_score_is_the_max_over_synonyms():
    clf = build_text_classifier(tiny_backbone("vit"), Vocabulary.from_entries(["cat", "tv, monitor"]), ("a {}.",))
    features = torch.randn(2, 32, 3, 4)
    scores = clf.scores(features)
    cos = torch.einsum("behw,ne->bnhw", F.normalize(features, dim=1), clf.weights)
    assert scores.shape == (2, 2, 3, 4)
    assert torch.allclose(scores[:, 0], cos[:, 0], atol=1e-6)
    assert torch.allclose(scores[:, 1], torch.maximum(cos[:, 1], cos[:, 2]), atol=1e-6)


def test_classifier_is_built_once_per_model_vocabulary_and_templates():
    bb = tiny_backbone("vit")
    vocab = Vocabulary.from_entries(["cat", "dog"])
    first = build_text_classifier(bb, vocab, ("a {}.",))
    assert build_text_classifier(bb, Vocabulary.from_entries(["cat", "dog"]), ("a {}.",)) is first
    assert build_text_classifier(bb, vocab, ("the {}.",)) is not first
    assert build_text_classifier(tiny_backbone("vit", "bf16"), vocab, ("a {}.",)) is not first
