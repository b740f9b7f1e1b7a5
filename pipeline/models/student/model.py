"""DenseCLIP (Rao et al., CVPR'22; official code raoyongming/DenseCLIP) as an open-vocabulary student.

`DenseCLIP(clip, tokenizer, options)` wraps an open_clip CLIP model (shared, not copied):

1. the image encoder (`encoder.ImageEncoder`) gives four FPN feature maps (`fpn_levels`: the coarsest
   three or two, a change from the reference) and the CLIP-space global and dense embeddings;
2. the class names go through the frozen text encoder with learnable context vectors (`text.PromptText`)
   and are refined per image by the context decoder: `t = t + gamma * decoder(t, [global; dense])`;
3. the pixel-text score map `s = <norm(dense), norm(t)>` (B, K, h, w) feeds the auxiliary loss (on s/tau,
   tau = 0.07) and is injected into the FPN input at the patch-stride level (ViT; stride 32 for a ResNet);
4. the semantic FPN (`decoder.SemanticFPN`) decodes per-pixel embeddings at the finest stride, which are
   classified by cosine similarity with the refined text embeddings `t`.

Changes from the reference, for an open vocabulary (the reference is a closed-set, 150-class model):
the score map enters the FPN as its softmax(s/tau)-weighted mix of the text embeddings (E channels),
not as its K raw channels, and the last layer is the text embeddings, not a K-way convolution, so the
same weights label any list of classes; class names may be long (see `text`). Synonyms of a class are
scored separately and the class takes their maximum, as in the training-free heads.

Saved as two files: the CLIP weights (`clip_state`, loadable by `pipeline.models.load_backbone`) and the
student's own parameters (`student_state`: contexts, context decoder, gamma, adapters, FPN, logit scale).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors
from torch import nn

from pipeline.config import StudentCfg, from_dict
from pipeline.io import fs
from pipeline.models.prompts import reduce_names
from pipeline.models.student.decoder import SemanticFPN
from pipeline.models.student.encoder import ImageEncoder, resize_like
from pipeline.models.student.text import ContextDecoder, PromptText

STUDENT_FILE = "student.safetensors"
_SHARED = ("clip.", "image.visual.", "text.clip.")  # the CLIP model, reached under three names


def exported_options(meta: dict[str, Any], name: str) -> StudentCfg:
    """The student options of an exported model folder's meta.json (`name`: the folder, for errors);
    an option an older export lacks has its default.

    Raises:
        ConfigError: an option this version does not know, or a value of the wrong type.
    """
    return from_dict(StudentCfg, meta.get("student") or {}, f"{name}: meta.json student")


class DenseCLIP(nn.Module):
    """See the module docstring. `options` (`StudentCfg`, kept as `self.options` and saved as the model
    folder's meta.json `student`): the context vectors and their start phrase
    (see `text`), the dense embedding path, ViT patch stride and FPN levels (see `encoder`), whether the FPN's
    output is added to the dense embedding and starts at zero (`residual`; the reference replaces it),
    the context decoder's size, gamma's start, the FPN's widths, the dropout of the context decoder and
    FPN head, and tau: the score map's temperature for its auxiliary loss and its mix of text
    embeddings into the FPN, and the initial logit scale (1/tau)."""

    def __init__(self, clip: nn.Module, tokenizer: Any, options: StudentCfg) -> None:
        super().__init__()
        if not hasattr(tokenizer, "sot_token_id"):
            raise ValueError("a DenseCLIP student needs a CLIP BPE tokenizer (open_clip SimpleTokenizer)")
        cfg = self.options = options
        self.clip = clip
        self.image = ImageEncoder(clip.visual, cfg.dense, cfg.patch_stride, cfg.fpn_levels)
        self.text = PromptText(clip, tokenizer, cfg.n_contexts, cfg.context_init)
        dim = int(clip.text_projection.shape[1])
        self.context_decoder = ContextDecoder(
            dim, cfg.decoder_width, cfg.decoder_layers, cfg.decoder_heads, cfg.dropout
        )
        self.gamma = nn.Parameter(torch.full((dim,), float(cfg.gamma_init)))
        self.concat_index = len(self.image.strides) - (2 if self.image.is_vit else 1)  # the patch stride, or 32
        channels = list(self.image.channels)
        channels[self.concat_index] += dim
        self.decoder = SemanticFPN(channels, self.image.strides, dim, cfg.fpn_width, cfg.fpn_head_width, cfg.dropout)
        self.residual = cfg.residual
        if cfg.residual:  # the first step's pixel embeddings are the dense CLIP embeddings themselves
            nn.init.zeros_(self.decoder.classifier.weight)
            nn.init.zeros_(self.decoder.classifier.bias)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / cfg.tau)))  # pixel classifier temperature
        self.tau = cfg.tau
        self.clip.requires_grad_(False)  # the text encoder is frozen (reference: lr_mult 0) ...
        self.clip.visual.requires_grad_(True)  # ... the image encoder is fine-tuned

    @property
    def stride(self) -> float:
        """Input pixels per cell of the output map."""
        return self.image.strides[0]

    def forward(
        self, images: torch.Tensor, tokens: torch.Tensor, class_index: torch.Tensor, n_classes: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Class scores of images (B, 3, H, W) normalised, for class names `tokens` (N, L) (`tokenize`).

        Returns (scores, aux), cosine similarities float32 with one channel per class (the max over its
        names, `class_index` (N,) naming each row's class): scores (B, K, H/stride, W/stride) from the FPN,
        aux (B, K, h, w) the pixel-text score map at the encoder's output stride.
        """
        return self.classify(images, self.text(tokens), class_index, n_classes)

    def classify(
        self, images: torch.Tensor, text: torch.Tensor, class_index: torch.Tensor, n_classes: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward` with the prompt embeddings `text` (N, E) already computed (`self.text(tokens)`)."""
        dtype = self.gamma.dtype
        feats, global_, dense = self.image(images.to(dtype))
        b = images.shape[0]
        visual = torch.cat([global_[:, None], dense.flatten(2).transpose(1, 2)], dim=1).to(dtype)
        t = text.to(dtype)[None].expand(b, -1, -1)
        t = F.normalize((t + self.gamma * self.context_decoder(t, visual)).float(), dim=-1)  # (B, N, E)
        aux = torch.einsum("bchw,bnc->bnhw", F.normalize(dense.float(), dim=1), t)
        mix = torch.einsum("bnhw,bnc->bchw", (aux / self.tau).softmax(dim=1), t)
        level = feats[self.concat_index]
        feats[self.concat_index] = torch.cat([level, resize_like(mix, level.shape[-2:]).to(level.dtype)], dim=1)
        pixels = self.decoder(feats).float()
        if self.residual:
            pixels = pixels + resize_like(dense.float(), pixels.shape[-2:])
        pixels = F.normalize(pixels, dim=1)
        scores = torch.einsum("bchw,bnc->bnhw", pixels, t)
        return reduce_names(scores, class_index, n_classes), reduce_names(aux, class_index, n_classes)


def clip_state(model: DenseCLIP) -> dict[str, torch.Tensor]:
    """The CLIP model's weights (open_clip names), float32."""
    return {k: v.detach().float().contiguous() for k, v in model.clip.state_dict().items()}


def student_state(model: DenseCLIP) -> dict[str, torch.Tensor]:
    """The student's own weights and buffers, float32 (BatchNorm's step counter stays an integer)."""
    return {
        k: (v.detach().float() if v.is_floating_point() else v.detach()).contiguous()
        for k, v in model.state_dict().items()
        if not k.startswith(_SHARED)
    }


def load_student_state(model: DenseCLIP, state: dict[str, torch.Tensor]) -> None:
    """Load `student_state` output into `model` (strict over the student's own keys)."""
    own = {k for k in model.state_dict() if not k.startswith(_SHARED)}
    missing, unexpected = own - state.keys(), state.keys() - own
    if missing or unexpected:
        raise ValueError(
            f"student weights do not fit: missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}"
        )
    model.load_state_dict(state, strict=False)


def read_student_state(folder: str, storage_options: dict | None = None) -> dict[str, torch.Tensor]:
    """The student weights of an exported model folder (`STUDENT_FILE`), as `load_student_state` takes them."""
    return load_safetensors(fs.read_bytes(fs.join(folder, STUDENT_FILE), storage_options))
