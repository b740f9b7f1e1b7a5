"""`denseclip`: the forward of a fine-tuned DenseCLIP student (`pipeline.models.student`).

Unlike the training-free heads it has weights of its own: the model folder (`model.name=FOLDER_OR_URL`,
as `clipdense finetune` exports it) holds the CLIP weights in `weights.safetensors`, the student's in
`student.safetensors`, and in `meta.json` `"head": "denseclip"` with the student's options. The engine
uses a model's own head whenever the config leaves `head.name` unset (null, the default), so such a
folder labels with this head without naming it, and refuses any other head named for it. Class names are prompted with the learned contexts (the prompt
templates are not used); the scores are cosine similarities at the student's output stride
(`DenseCLIP.stride` input pixels per cell: with a ViT, its step over 4, 2 or 1 for four, three or two
FPN levels), which the engine upsamples like any head's.
"""

from __future__ import annotations

import weakref

import torch

from pipeline.models.backbone import Backbone
from pipeline.models.heads._base import DenseHead
from pipeline.models.heads._registry import register_head
from pipeline.models.prompts import TextClassifier

HEAD_NAME = "denseclip"


class DenseCLIPHead(DenseHead):
    def __init__(self) -> None:
        self._students: weakref.WeakKeyDictionary[Backbone, tuple[torch.nn.Module, dict]] = weakref.WeakKeyDictionary()

    @torch.inference_mode()
    def __call__(self, backbone: Backbone, text: TextClassifier, images: torch.Tensor) -> torch.Tensor:
        model, prompts = self._student(backbone)
        if not text.names:
            raise ValueError("the denseclip head needs the class names of its text classifier")
        if text.names not in prompts:
            tokens = model.text.tokenize(list(text.names)).to(backbone.device)
            prompts[text.names] = model.text(tokens)
        scores, _ = model.classify(images, prompts[text.names], text.class_index, text.n_classes)
        return scores

    def _student(self, backbone: Backbone) -> tuple[torch.nn.Module, dict]:
        # Imported here: the student's encoder builds on the heads' ViT internals (this package).
        from pipeline.models.student import DenseCLIP, exported_options, load_student_state, read_student_state

        if backbone not in self._students:
            meta = backbone.meta
            if meta.get("head") != HEAD_NAME or not backbone.folder:
                raise ValueError(
                    f"model {backbone.name!r} is not a DenseCLIP student (its meta.json names no denseclip head); "
                    "use a folder exported by clipdense finetune, or another head"
                )
            model = DenseCLIP(backbone.model, backbone.tokenizer, exported_options(meta, backbone.folder))
            load_student_state(model, read_student_state(backbone.folder, backbone.storage_options))
            model = model.to(device=backbone.device, dtype=backbone.dtype).eval().requires_grad_(False)
            self._students[backbone] = (model, {})
        return self._students[backbone]

    def __repr__(self) -> str:
        return "DenseCLIPHead()"


@register_head
def denseclip() -> DenseCLIPHead:
    return DenseCLIPHead()
