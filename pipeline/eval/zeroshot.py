"""Image-level zero-shot accuracy on single-object ShapeWorld scenes: does the model *recognise* at all?

Each scene holds one object; the model's pooled image embedding is compared with the text embeddings
of the 36 object classes (same prompt templates as the dense run), as CLIP classifies images. Scenes
cycle through the classes so every class is tested equally often, and use their own seed namespace
(`ZERO_SHOT_SEED`), apart from the seeds of the shards and of training, so they are held out.
Colour and shape accuracy are read from the same predictions: a model may know colours long before
it knows shapes.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.data.shapeworld import CLASSES, SHAPES, render_single
from pipeline.models.backbone import Backbone
from pipeline.models.prompts import build_text_classifier
from pipeline.vocab import Vocabulary

ZERO_SHOT_SEED = 9_000_001  # first element of every zero-shot scene's seed tuple


@torch.inference_mode()
def zero_shot_accuracy(
    backbone: Backbone, templates: tuple[str, ...], n: int, seed: int = ZERO_SHOT_SEED, batch_size: int = 32
) -> dict:
    """Accuracy over `n` scenes rendered at the model's input size; returns class/colour/shape accuracy."""
    if n < 1:
        raise ValueError(f"zero-shot needs at least one scene, got {n}")
    objects = Vocabulary.from_entries(list(CLASSES[1:]))  # object classes only: id = ShapeWorld id - 1
    classifier = build_text_classifier(backbone, objects, templates)
    size = backbone.image_size[0]
    mean = torch.tensor(backbone.mean, device=backbone.device).view(1, 3, 1, 1)
    std = torch.tensor(backbone.std, device=backbone.device).view(1, 3, 1, 1)
    truth, pred = [], []
    for start in range(0, n, batch_size):
        ids = [1 + i % len(objects) for i in range(start, min(n, start + batch_size))]
        images = np.stack([render_single((seed, start + j), size, cls).image for j, cls in enumerate(ids)])
        x = torch.from_numpy(images).to(backbone.device).permute(0, 3, 1, 2).float() / 255.0
        x = ((x - mean) / std).to(backbone.dtype)
        emb = F.normalize(backbone.model.encode_image(x).float(), dim=-1)  # (B, E)
        scores = classifier.reduce(emb @ classifier.weights.T)  # (B, 36)
        truth += [cls - 1 for cls in ids]
        pred += scores.argmax(dim=1).cpu().tolist()
    t, p = np.asarray(truth), np.asarray(pred)
    n_shapes = len(SHAPES)
    return {
        "n": n,
        "seed": seed,
        "accuracy": float(np.mean(t == p)),
        "colour_accuracy": float(np.mean(t // n_shapes == p // n_shapes)),
        "shape_accuracy": float(np.mean(t % n_shapes == p % n_shapes)),
        "chance": 1.0 / len(objects),
    }
