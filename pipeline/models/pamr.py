"""Pixel-adaptive mask refinement (PAMR; Araslanov & Roth, CVPR'20), NACLIP's default post-processing.

Each iteration replaces every pixel's class scores by a weighted average of its neighbours' scores
at a few dilations (8 neighbours per dilation), the weights being a softmax over neighbours of how
similar their colour is, measured in units of the local colour spread. Scores thus diffuse inside
regions of similar colour and stop at colour edges. The neighbour weights are computed once.

Only the classes that can win somewhere are refined. One step is one linear operator `A` applied
to every class channel alike, and `A` averages (positive weights summing to 1), so for any classes
`A max_k s_k >= max_k A s_k`. The classes that win somewhere in the raw map are refined, together
with the envelope (pointwise maximum) of all the others: where the refined envelope stays below the
best refined class, none of the others can win. Where it reaches it, the others that make the
envelope there are refined in a next round, until the envelope stays below everywhere. The labels
are therefore exactly those of refining every class, at the map's resolution. The classes left out
keep their raw distance below the best score, capped by the refined envelope (`min(best - (m - s_k),
A e)` with `m` the raw best), which keeps them below the winner and a softmax over the map close: on
held-out ShapeWorld its largest probability differs by 0.009 on average, and labels upsampled to the
image size (where interpolation mixes neighbours) agree on 99.99% of pixels (`bench/pamr_speed.py`). The images of a batch are refined together, each with its own classes,
packed into a few tensors (images with as many classes together), so a batch of small maps costs a
few large operations instead of many small ones. Reference: the refinement itself is `PAMR` of github.com/visinf/1-stage-wseg (`models/mods/pamr.py`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_SPREAD_SCALE = 0.1  # colour differences are measured in tenths of the local standard deviation
_CALL_PIXELS = 4 * 64 * 64  # fixed cost of one refinement call (its ~160 small ops), in channel-pixels
_BOUND_SLACK = 1e-5  # float rounding of the bound's two refinements: a class this close is refined too


def _offsets(dilations: tuple[int, ...]) -> list[tuple[int, int]]:
    return [(dy * d, dx * d) for d in dilations for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]


def _shift(padded: torch.Tensor, dy: int, dx: int, pad: int, size: tuple[int, int]) -> torch.Tensor:
    """The value at (y + dy, x + dx) for every pixel (y, x) of a border-replicated tensor."""
    return padded[..., pad + dy : pad + dy + size[0], pad + dx : pad + dx + size[1]]


def neighbour_weights(image: torch.Tensor, dilations: tuple[int, ...] = (8, 16)) -> torch.Tensor:
    """Weights (B, 8 * len(dilations), H, W) summing to 1 over neighbours, from an image (B, 3, H, W)."""
    image = image.float()
    size, pad = image.shape[-2:], max(dilations)
    padded = F.pad(image, (pad,) * 4, mode="replicate")
    logits = []
    for d in dilations:
        ring = [_shift(padded, dy * d, dx * d, pad, size) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
        # Unbiased standard deviation of the 3x3 ring, two-pass: `torch.stack(ring).std(0)` reduces
        # over the outer dimension and is ten times slower.
        mean = torch.stack(ring).sum(dim=0) / 9
        var = sum((r - mean).square() for r in ring) / 8
        inv = (_SPREAD_SCALE * var.sqrt() + 1e-8).reciprocal_().div_(-3)  # (B, 3, H, W); -1/3: mean of 3 colours
        for r, (dy, dx) in zip(ring, [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)], strict=True):
            if dy or dx:
                logits.append(torch.sum((image - r).abs_().mul_(inv), dim=1))
    return torch.stack(logits, dim=1).softmax(dim=1)


def _refine(scores: torch.Tensor, weights: torch.Tensor, steps: int, dilations: tuple[int, ...]) -> torch.Tensor:
    """`steps` iterations of the neighbour average on (B, C, H, W) float32 scores, all C channels.

    Two border-replicated buffers take turns: each step writes its average into the other's interior
    and copies its edges outwards, cheaper than padding anew (`F.pad(mode="replicate")` is slow). The
    views a step reads and writes are made once: on small maps, making them cost as much as the sums.
    """
    offsets, pad = _offsets(dilations), max(dilations)
    h, w = scores.shape[-2:]
    buffers = (
        F.pad(scores, (pad,) * 4, mode="replicate"),
        scores.new_empty(scores.shape[:2] + (h + 2 * pad, w + 2 * pad)),
    )
    neighbours = [[_shift(b, dy, dx, pad, (h, w)) for dy, dx in offsets] for b in buffers]
    interiors = [b[..., pad : pad + h, pad : pad + w] for b in buffers]
    edges = [
        [
            (b[..., :pad, pad : pad + w], b[..., pad : pad + 1, pad : pad + w]),
            (b[..., pad + h :, pad : pad + w], b[..., pad + h - 1 : pad + h, pad : pad + w]),
            (b[..., :pad], b[..., pad : pad + 1]),
            (b[..., pad + w :], b[..., pad + w - 1 : pad + w]),
        ]
        for b in buffers
    ]
    weight = [weights[:, j : j + 1] for j in range(len(offsets))]
    for step in range(steps):
        src, dst = step % 2, 1 - step % 2
        acc = interiors[dst]
        torch.mul(neighbours[src][0], weight[0], out=acc)
        for view, wt in zip(neighbours[src][1:], weight[1:], strict=True):
            acc.addcmul_(wt, view)
        for target, edge in edges[dst]:  # rows first, then whole columns: the corners follow
            target.copy_(edge)
    return interiors[steps % 2]


def pamr(
    scores: torch.Tensor,
    image: torch.Tensor,
    steps: int = 10,
    dilations: tuple[int, ...] = (8, 16),
    every_class: bool = False,
) -> torch.Tensor:
    """Refine class scores (B, K, H, W) with the colours of `image` (B, 3, H, W, any range).

    Returns float32 (B, K, H, W) whose per-pixel argmax equals that of refining all K channels: only
    the classes that can win somewhere are refined (see the module docstring), unless `every_class` (the full computation, which tests and
    `bench/pamr_speed.py` compare with). The images of a batch are refined together.
    """
    scores = scores.float()
    if steps <= 0:
        return scores.clone()
    weights = neighbour_weights(image, dilations)
    if every_class:
        return _refine(scores, weights, steps, dilations).contiguous()
    return _refine_winners(scores, weights, steps, dilations)


def _groups(packs: dict[int, torch.Tensor], pixels: int) -> list[list[int]]:
    """The images of `packs` (image -> channels to refine) in groups refined together, each padded to
    its longest pack: sorted by length and cut where padding would cost more than one more call
    (`_CALL_PIXELS`), by dynamic programming over the cut points."""
    order = sorted(packs, key=lambda b: len(packs[b]))
    sizes = [len(packs[b]) for b in order]
    best = [0.0] + [float("inf")] * len(order)  # best[j]: cost of the first j images
    cut = [0] * (len(order) + 1)
    for j in range(1, len(order) + 1):
        for i in range(j):
            cost = best[i] + _CALL_PIXELS + (j - i) * sizes[j - 1] * pixels
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], len(order)
    while j:
        groups.append(order[cut[j] : j])
        j = cut[j]
    return groups


def _refine_winners(
    scores: torch.Tensor, weights: torch.Tensor, steps: int, dilations: tuple[int, ...]
) -> torch.Tensor:
    """Rounds of refinement on (B, K, H, W) scores: each image's classes to refine, plus the envelope of
    the others (their pointwise maximum), packed into one (B', C, H, W) tensor; see the module docstring."""
    # `amax` and comparisons: `max(dim)` with indices is ten times slower on a CPU.
    top = scores.amax(dim=1)  # (B, H, W)
    wins = (scores == top[:, None]).flatten(2).any(dim=2)  # (B, K): best somewhere (ties included)
    wins[~wins.any(dim=1)] = True  # no class is best anywhere (NaN in every pixel): refine them all
    out = torch.empty_like(scores)
    best = torch.full_like(top, -torch.inf)
    pending = torch.ones(scores.shape[:2], dtype=torch.bool, device=scores.device)  # (B, K) not refined yet
    todo = {b: wins[b].nonzero()[:, 0] for b in range(len(scores))}  # image -> classes to refine this round
    while todo:
        packs = {}
        for b, classes in todo.items():
            pending[b, classes] = False
            parts = [scores[b, classes]]
            if pending[b].any():
                parts.append(scores[b, pending[b]].amax(dim=0, keepdim=True))  # the envelope of the others
            packs[b] = torch.cat(parts)
        refined = {}
        for group in _groups(packs, scores.shape[2] * scores.shape[3]):
            packed = scores.new_zeros(len(group), len(packs[group[-1]]), *scores.shape[2:])
            for row, b in zip(packed, group, strict=True):
                row[: len(packs[b])] = packs[b]
            refined |= dict(zip(group, _refine(packed, weights[group], steps, dilations), strict=True))
        nxt = {}
        for b, classes in todo.items():
            row = refined[b]
            out[b, classes] = row[: len(classes)]
            best[b] = torch.maximum(best[b], row[: len(classes)].amax(dim=0))
            if not pending[b].any():
                continue
            rest = pending[b].nonzero()[:, 0]
            bound = row[len(classes)]  # >= every other class once refined: A max(s) >= max(A s)
            reach = bound + _BOUND_SLACK >= best[b]
            if reach.any():  # refine next the classes closest to the envelope where it reaches the best
                there = scores[b, rest][:, reach]
                envelope = there.amax(dim=0)
                makers = (there == envelope).any(dim=1)  # those that make it somewhere there
                gap = (there - envelope).nan_to_num(nan=-torch.inf).amax(dim=1).masked_fill(makers, 0.0)
                # and half as many as were refined so far: a round costs more than a few channels, and
                # without it a tail of rounds of one class each follows on maps with many close classes;
                # at least one, where no class makes it (NaN scores)
                more = max(1, int(makers.sum()), (len(scores[b]) - len(rest)) // 2)
                nxt[b] = rest[gap.topk(min(more, len(rest))).indices]
            else:  # left out: their raw distance below the best, capped by the envelope (below the best)
                out[b, rest] = torch.minimum(best[b] - (top[b] - scores[b, rest]), bound)
        todo = nxt
    return out
