"""`clsclip`: one-way [CLS] navigation after ClsCLIP (Wu et al., arXiv 2304.06212), ViT only.

The paper replaces the visual [CLS] token in the shallow layers of the image encoder by the text
encoder's global ([EOT]) embedding of a candidate class, so the patches attend to what they are
asked about. It publishes no code; the choices made here are:

- mapping: the class's normalised text embedding t (the prompt-ensembled classifier row, in CLIP
  space) is mapped into the visual residual stream with the pseudo-inverse of `visual.proj`
  (u = t proj^+), then rescaled to the norm of the [CLS] token it replaces, per image;
- blocks: [CLS] is replaced before each of the first `shallow` blocks (0 = a quarter of the blocks,
  at least 1); the later blocks run unchanged and [CLS] evolves freely there;
- read-out: class k's map is the cosine between text k and the patch embeddings of navigation k,
  read with MaskCLIP's value path in the last block (`residual`/`mlp` as in `maskclip`);
- batching: one navigated forward per (image, class name) pair; all pairs of a batch run together
  in chunks of `chunk` forwards to bound memory. Synonyms navigate separately; a class scores the
  max over its names. Cost grows with the number of names: this head is for small vocabularies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.models.backbone import Backbone
from pipeline.models.heads import _vit
from pipeline.models.heads._base import DenseHead
from pipeline.models.heads._registry import register_head
from pipeline.models.prompts import TextClassifier


class ClsCLIPHead(DenseHead):
    def __init__(self, shallow: int, chunk: int, residual: bool, mlp: bool) -> None:
        if shallow < 0 or chunk < 1:
            raise ValueError(f"clsclip needs shallow >= 0 and chunk >= 1, got shallow={shallow}, chunk={chunk}")
        self.shallow, self.chunk, self.residual, self.mlp = shallow, chunk, residual, mlp

    def n_shallow(self, n_blocks: int) -> int:
        return min(self.shallow or max(1, n_blocks // 4), n_blocks - 1)

    @torch.inference_mode()
    def __call__(self, backbone: Backbone, text: TextClassifier, images: torch.Tensor) -> torch.Tensor:
        if backbone.kind != "vit":
            raise ValueError(f"head clsclip needs a ViT backbone; {backbone.name} is a {backbone.kind}")
        vis = backbone.visual
        blocks = vis.transformer.resblocks
        shallow = self.n_shallow(len(blocks))
        x0, grid = _vit.embed(backbone, images)
        navigators = (text.weights @ torch.linalg.pinv(vis.proj.float())).to(x0.dtype)  # (N, D)
        n_img, n_names = x0.shape[0], len(text.weights)
        pairs = torch.cartesian_prod(torch.arange(n_img), torch.arange(n_names)).to(x0.device)  # (B*N, 2)
        out = torch.empty(n_img, n_names, *grid, device=x0.device)
        for chunk in pairs.split(self.chunk):
            img, name = chunk[:, 0], chunk[:, 1]
            x = x0[img]
            u = F.normalize(navigators[name].float(), dim=-1)
            for blk in blocks[:shallow]:
                cls = u * x[:, 0].float().norm(dim=-1, keepdim=True)
                x = _vit.run_blocks(vis, torch.cat([cls.to(x.dtype)[:, None], x[:, 1:]], dim=1), [blk])
            x = _vit.run_blocks(vis, x, blocks[shallow:-1])
            y, _ = _vit.modified_block(blocks[-1], x, "identity", self.residual, self.mlp, grid, 5.0)
            dense = F.normalize(_vit.project(vis, y[:, 1:]), dim=-1)  # (M, h*w, E)
            out[img, name] = torch.einsum("mpe,me->mp", dense, text.weights[name]).view(-1, *grid)
        return text.reduce(out)


@register_head
def clsclip(shallow: int = 0, chunk: int = 32, residual: bool = True, mlp: bool = True) -> ClsCLIPHead:
    return ClsCLIPHead(shallow, chunk, residual, mlp)
