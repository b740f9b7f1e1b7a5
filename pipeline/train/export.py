"""Export a trained DenseCLIP student as a model folder the engine loads like the shipped model.

`FOLDER/config.json` (the open_clip model config), `weights.safetensors` (the fine-tuned CLIP, float32),
`student.safetensors` (contexts, context decoder, FPN, ...), `meta.json`: `head: denseclip` (so
`clipdense label/segment/eval model.name=FOLDER` label with the student's forward), the student's
options, the vocabulary it was trained on, `infer` (one pass: the student decodes at its own output
stride, `DenseCLIP.stride`, and shifted passes did not improve its labels (README); the PAMR steps
its teacher's model recommends, which snap its map to colour edges as they do the teacher's), its
learned `logit_scale`, no background offset, the image size and normalisation. Files are written atomically, `meta.json` last.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from safetensors.torch import save as save_safetensors

from pipeline.io import fs
from pipeline.models.backbone import Backbone
from pipeline.models.heads.denseclip import HEAD_NAME
from pipeline.models.student import STUDENT_FILE, DenseCLIP, clip_state, student_state
from pipeline.vocab import Vocabulary


def export(
    model: DenseCLIP,
    folder: str,
    model_config: dict[str, Any],
    backbone: Backbone,
    vocab: Vocabulary,
    extra: dict[str, Any] | None = None,
    storage_options: dict | None = None,
) -> str:
    """Write the model folder (see module docstring); `extra` goes into meta.json (e.g. `trained`)."""
    fs.put_atomic(fs.join(folder, "weights.safetensors"), save_safetensors(clip_state(model)), storage_options)
    fs.put_atomic(fs.join(folder, STUDENT_FILE), save_safetensors(student_state(model)), storage_options)
    fs.put_json(fs.join(folder, "config.json"), model_config, storage_options)
    meta = {
        "head": HEAD_NAME,
        "student": dataclasses.asdict(model.options),
        "vocabulary": vocab.to_json(),
        "infer": {"shifts": 1, "pamr_steps": int((backbone.meta.get("infer") or {}).get("pamr_steps") or 0)},
        "logit_scale": round(float(model.logit_scale.detach().float().exp().clamp(max=100)), 4),
        "background_offset": 0.0,
        "templates": ["{}"],  # the student prompts class names with its learned contexts, not templates
        "image_size": int(backbone.image_size[0]),
        "mean": list(backbone.mean),
        "std": list(backbone.std),
        **(extra or {}),
    }
    fs.put_json(fs.join(folder, "meta.json"), meta, storage_options)
    return folder
