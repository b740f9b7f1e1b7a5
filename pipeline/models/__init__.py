"""Models of the dense engine: backbones (open_clip), prompts and text classifiers, dense heads, PAMR.

Public surface: `load_backbone`, `Backbone`, `load_templates`, `build_text_classifier`,
`TextClassifier`, and the head registry in `pipeline.models.heads` (`create_head`, `list_heads`,
`register_head`).
"""

from pipeline.models.backbone import Backbone, load_backbone
from pipeline.models.prompts import TextClassifier, build_text_classifier, list_template_sets, load_templates

__all__ = [
    "Backbone",
    "TextClassifier",
    "build_text_classifier",
    "list_template_sets",
    "load_backbone",
    "load_templates",
]
