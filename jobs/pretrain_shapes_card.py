"""The model card (`card.md`) that `clipdense pretrain-shapes` writes beside the weights."""

from __future__ import annotations

import os
from pathlib import Path

import torch

_CURVE_KEYS = ("zero_shot_accuracy", "shape_accuracy", "dense_miou", "dense_miou_single_pass", "dense_miou_value_only")


def write_card(
    model_cfg: dict, meta: dict, metrics: dict, cfg: dict, command: str, history: list, evals: list, n_params: int
) -> str:
    """The model card: architecture, data, schedule, time, metrics and the command that reproduces them."""
    vis, txt = model_cfg["vision_cfg"], model_cfg["text_cfg"]
    grid = vis["image_size"] // vis["patch_size"]
    rates = sorted(h["img_s"] for h in history)
    median_rate = rates[len(rates) // 2] if rates else 0
    rows = "\n".join(f"| `{k}` | {v} |" for k, v in metrics.items())
    losses = " ".join(f"{h['step']}: {h['loss']}" for h in history[:: max(1, len(history) // 10)])
    curve = "\n".join(
        f"| {e['step']} | " + " | ".join(str(e.get(k, "-")) for k in _CURVE_KEYS) + " |"
        for e in [*evals, metrics | {"step": "end"}]
    )
    n_single = min(cfg["batch_size"] // 7, 36)
    n_background = max(1, cfg["batch_size"] // 128)
    return f"""# shapes-clip

A small CLIP trained from scratch on ShapeWorld (`pipeline/data/shapeworld.py`) by `clipdense pretrain-shapes`.
It is the project's default model: small enough for CPU tests and demos, trained on a world whose exact class
maps make the quality of dense labels measurable. It knows 6 colours, 6 shapes and "background", nothing else.

## Architecture (`config.json`, open_clip `CLIP`)
- vision: ViT, {vis["image_size"]} px input, patch {vis["patch_size"]} ({grid}x{grid} grid), width {vis["width"]}, \
{vis["layers"]} layers, head width {vis.get("head_width", 64)}, pooling `{vis.get("pool_type", "tok")}`
- text: width {txt["width"]}, {txt["layers"]} layers, {txt["heads"]} heads, context {txt["context_length"]} tokens \
(open_clip's BPE tokenizer)
- embedding dimension {model_cfg["embed_dim"]}; {n_params / 1e6:.1f} M parameters (most in the 49408-token \
embedding), stored as fp16 in `weights.safetensors`

## Inference (`meta.json`)
- prompt template `{meta["templates"][0]}` with the bare class name ("a photo of a orange star." : article "a" \
everywhere, exactly as in training); the background class is prompted as "a photo of a background.".
- `infer` {_settings(meta["infer"])}: the inference settings the engine uses with this model where a run leaves
  them unset (`infer.shifts`: the map is averaged over sub-patch shifted passes; `infer.pamr_steps`: PAMR on the
  scores). Set `infer.shifts=1 infer.pamr_steps=0` for a single plain pass (`dense_miou_single_pass` below).
- `background_offset` {meta["background_offset"]}: added to the background class's cosine score before the argmax or
  softmax; calibrated for the engine's default head (`maskclip`, residual and MLP kept) under those settings, on its
  own seed streams.
- `logit_scale` {meta["logit_scale"]} (the learned temperature), `image_size` {meta["image_size"]}, CLIP mean/std.

## Training
- data: ShapeWorld rendered from seed {cfg["seed"]}, seed streams 10-13; the dense evaluation uses streams 21-22,
  the background calibration streams 30-31 and zero-shot its own seed namespace (`pipeline.eval.zeroshot`), so no
  evaluation image is ever trained on. Pools of {cfg["pool_scenes"]} scenes
  (1-3 objects; a quarter with objects under 3% of the image), {cfg["pool_singles"]} single objects (balanced over the
  36 classes) and {cfg["pool_backgrounds"]} empty backgrounds; every draw gets a random flip or quarter turn.
- batches of {cfg["batch_size"]}: {n_single} single objects of distinct classes, {n_background} empty background(s),
  the rest scenes in groups of 8 with the same colours (hard negatives: only shapes tell their captions apart).
  Captions: "a photo of a red circle and a orange star." (objects in random order), "a photo of a red circle.",
  "a photo of a background.".
- loss: open_clip's symmetric contrastive `ClipLoss`, learned temperature (capped at 100).
- schedule: {cfg["steps"]} steps, AdamW (betas 0.9/0.98, eps 1e-6, weight decay {cfg["weight_decay"]} on matrices),
  peak lr {cfg["lr"]}, {cfg["warmup"]} warm-up steps then cosine decay to 0, gradient norm clipped at 1; weights
  initialised from `torch.manual_seed({cfg["seed"]})`.
- precision `{cfg["precision"]}`: bf16 forward and backward with an fp32 master copy on CPUs with native bf16
  (fp32 otherwise); {cfg["threads"]} threads.
- time: {metrics["train_minutes"]} minutes including rendering the pools (evaluations excluded), median
  {median_rate} img/s, on {_machine(cfg["threads"])}, shared with other work.

Reproduce (the same batches and initial weights on any machine; results match up to floating-point summation order):

    {command}

Mean training loss by step: {losses}

## Evaluation (held-out seeds, printed by the command above)
- zero-shot: {max(cfg["eval_n"], 360)} single objects cycling through the 36 classes, 36-way over the class prompts;
  colour and shape accuracies come from the same predictions (`pipeline.eval.zeroshot`, as `clipdense eval --zero-shot`).
- dense: the engine's labeler with the `maskclip` head (MaskCLIP's value path of the last block), 37-class argmax
  with a calibrated background offset, mIoU over {cfg["eval_n"]} scenes (`_small_objects`: scenes with objects under
  3% of the image). `dense_miou`: as shipped (residual and MLP of the last block kept, as in MaskCLIP's released
  code and the engine's default; the recommended `infer` settings); `dense_miou_single_pass`: one plain pass;
  `dense_miou_value_only`: one pass with residual and MLP dropped (head option `residual: false, mlp: false`). Each
  has its own offset (`background_offset_single_pass`, ...), calibrated on {cfg.get("calibration_n", 200)} scenes. A "-" in the table below: not measured by
  that run.

| metric | value |
|---|---|
{rows}

During training:

| step | {" | ".join(_CURVE_KEYS)} |
|---|---|---|---|---|---|
{curve}

## Limitations
Its {grid}x{grid} patch grid blurs object boundaries and misses small objects; the recommended shifts and PAMR,
sliding windows or zoom-in help there.
It has never seen a photograph.
"""


def _settings(infer: dict) -> str:
    return ", ".join(f"`{k}: {v}`" for k, v in infer.items())


def _machine(threads: int) -> str:
    name = "a CPU"
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.exists() else []:
        if line.startswith("model name"):
            name = line.split(":", 1)[1].strip()
            break
    return f"{name} ({threads} of {os.cpu_count()} cores, torch {torch.__version__.split('+')[0]})"
