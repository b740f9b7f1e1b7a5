"""DenseCLIP's text side: learnable context prompts through the frozen text encoder, and the
post-model context decoder (official DenseCLIP code, `CLIPTextContextEncoder` and `ContextDecoder`).

Prompt of a class name: `[SOT, c_1 .. c_n, name tokens, EOT]`, with n learnable context vectors
(`contexts`) in the token-embedding space and the text positional embedding truncated to the prompt
length. The text encoder's weights are frozen; gradients flow through it to the contexts.

Initialisation: the reference draws the contexts from `trunc_normal_` (std 1), so the student's text
embeddings start far from CLIP's. With `context_init` (e.g. "a photo of a"), they start as that phrase's
token embeddings, as CoOp does (Zhou et al., IJCV'22, `ctx_init`; official code KaiyangZhou/CoOp): the
first step's prompts are CLIP's own "a photo of a {name}", which the pseudo-labels came from.

Open-vocabulary fix: the reference tokenises names to 5 tokens with `truncate=False`, so any class name
longer than 3 BPE tokens raises an error. Here the name budget is the text encoder's context length minus
the contexts (e.g. 77 - 8 = 69 tokens, of which 67 for the name); a longer name is cut to the budget (its
EOT kept) with a warning instead of failing the run.

Context decoder: `t = t + gamma * decoder(t, [global; dense])`, 3 transformer-decoder layers (self-attention
over the classes, cross-attention to the visual tokens, MLP) at width 256 with 4 heads and dropout 0.1;
q/k/v without bias; `gamma` per channel, initialised to 1e-4.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)


class PromptText(nn.Module):
    """`forward(tokens)` -> (K, E) text embeddings (not normalised) of K tokenised names (`tokenize`)."""

    def __init__(self, clip: nn.Module, tokenizer, n_contexts: int = 8, context_init: str = "") -> None:
        super().__init__()
        self.clip = clip  # shared with the image side; only its text tower is used here
        self.length = int(clip.positional_embedding.shape[0])
        self.n_contexts = n_contexts
        if n_contexts < 0 or self.length - n_contexts < 3:
            raise ValueError(f"{n_contexts} context vectors leave no room for a class name in {self.length} tokens")
        self.tokenizer = tokenizer
        width = clip.token_embedding.weight.shape[1]
        if context_init:
            ids = tokenizer.encode(context_init)
            if len(ids) != n_contexts:
                raise ValueError(
                    f"context_init {context_init!r} is {len(ids)} tokens; set n_contexts to {len(ids)} "
                    f"(it is {n_contexts}) or leave context_init empty for random contexts"
                )
            with torch.no_grad():
                start = clip.token_embedding(torch.tensor(ids)).float()[None]
        else:
            start = nn.init.trunc_normal_(torch.empty(1, n_contexts, width))
        self.contexts = nn.Parameter(start)

    @property
    def name_length(self) -> int:
        """Tokens a name may use, SOT and EOT included."""
        return self.length - self.n_contexts

    def tokenize(self, names: list[str]) -> torch.Tensor:
        """(K, name_length) int64: SOT, the name's BPE tokens (cut to fit), EOT, zeros."""
        out = torch.zeros(len(names), self.name_length, dtype=torch.long)
        sot, eot = self.tokenizer.sot_token_id, self.tokenizer.eot_token_id
        for i, name in enumerate(names):
            ids = self.tokenizer.encode(name)
            if len(ids) > self.name_length - 2:
                logger.warning("class name %r has %d tokens; cut to %d", name, len(ids), self.name_length - 2)
                ids = ids[: self.name_length - 2]
            out[i, : len(ids) + 2] = torch.tensor([sot, *ids, eot])
        return out

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        clip, k = self.clip, tokens.shape[0]
        names = clip.token_embedding(tokens)  # (K, L_name, W)
        ctx = self.contexts.to(names.dtype).expand(k, -1, -1)
        x = torch.cat([names[:, :1], ctx, names[:, 1:]], dim=1)
        x = x + clip.positional_embedding[: self.length].to(x.dtype)
        x = clip.transformer(x, attn_mask=clip.attn_mask[: self.length, : self.length])
        x = clip.ln_final(x)
        eot = tokens.argmax(dim=-1) + self.n_contexts  # EOT has the largest token id
        return x[torch.arange(k, device=x.device), eot].float() @ clip.text_projection.float()


class _Attention(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = (nn.Linear(width, width, bias=False) for _ in range(3))
        self.proj = nn.Linear(width, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        q, k, v = (
            f(t).reshape(b, t.shape[1], self.heads, -1).transpose(1, 2)
            for f, t in ((self.q, x), (self.k, memory), (self.v, memory))
        )
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        return self.drop(self.proj(out))


class _DecoderLayer(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.self_attn, self.cross_attn = _Attention(width, heads, dropout), _Attention(width, heads, dropout)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(width), nn.LayerNorm(width), nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * width, width)
        )
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        q = self.norm1(x)
        x = x + self.self_attn(q, q)
        x = x + self.cross_attn(self.norm2(x), memory)
        return x + self.drop(self.mlp(self.norm3(x)))


class ContextDecoder(nn.Module):
    """`forward(text (B, K, E), visual (B, N, E))` -> (B, K, E): the text update before `gamma`."""

    def __init__(self, dim: int, width: int = 256, layers: int = 3, heads: int = 4, dropout: float = 0.1) -> None:
        super().__init__()
        self.memory_proj = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, width), nn.LayerNorm(width))
        self.text_proj = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, width))
        self.layers = nn.ModuleList([_DecoderLayer(width, heads, dropout) for _ in range(layers)])
        self.out_proj = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, dim))

    def forward(self, text: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        memory, x = self.memory_proj(visual), self.text_proj(text)
        for layer in self.layers:
            x = layer(x, memory)
        return self.out_proj(x)
