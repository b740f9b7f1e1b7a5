"""The model card (`card.md`) that `clipdense pretrain-shapes` writes beside the weights."""

from __future__ import annotations

from pathlib import Path


def write_card(
    model_cfg: dict, meta: dict, metrics: dict, cfg: dict, command: str, history: list, n_params: int
) -> str:
    """The model card: architecture, data, schedule, time, metrics and the command that reproduces them."""
    vis, txt = model_cfg["vision_cfg"], model_cfg["text_cfg"]
    rates = [h["img_s"] for h in history]
    rows = "\n".join(f"| {k} | {v} |" for k, v in metrics.items())
    curve = "\n".join(f"| {h['step']} | {h['loss']} | {h['minutes']} |" for h in history[:: max(1, len(history) // 12)])
    return f"""# shapes-clip

A small CLIP trained from scratch on ShapeWorld (`pipeline/data/shapeworld.py`) by `clipdense pretrain-shapes`.
It is the project's default model: small enough for CPU tests and demos, trained on a world whose exact class
maps make dense-label quality measurable.

## Architecture (`config.json`, open_clip `CLIP`)
- vision: ViT, {vis["image_size"]} px input, patch {vis["patch_size"]} ({vis["image_size"] // vis["patch_size"]}x{vis["image_size"] // vis["patch_size"]} grid), width {vis["width"]}, {vis["layers"]} layers, head width {vis.get("head_width", 64)}, pooling `{vis.get("pool_type", "tok")}`
- text: width {txt["width"]}, {txt["layers"]} layers, {txt["heads"]} heads, context {txt["context_length"]} tokens (open_clip's BPE tokenizer)
- embedding dimension {model_cfg["embed_dim"]}; {n_params / 1e6:.1f} M parameters, stored as fp16 in `weights.safetensors`
- inference extras (`meta.json`): template `{meta["templates"][0]}`, background offset {meta["background_offset"]} (added to the
  background class's cosine score), logit scale {meta["logit_scale"]}, CLIP mean/std normalisation

## Training
- data: ShapeWorld rendered from seed {cfg["seed"]} (seed streams 10-13; evaluation uses streams 20-22 and the background
  calibration 30-31, so no evaluation scene is ever trained on). Pools of {cfg["pool_scenes"]} scenes (1-3 objects, a quarter
  with objects under 3% of the image), {cfg["pool_singles"]} single objects and {cfg["pool_backgrounds"]} empty backgrounds; every
  draw gets a random flip or quarter turn.
- batches of {cfg["batch_size"]}: {min(cfg["batch_size"] // 8, 36)} single objects of distinct classes, {max(1, cfg["batch_size"] // 128)} empty
  background(s), the rest scenes. Captions use the prompt template with article "a" throughout:
  "a photo of a red circle and a orange star." (objects in random order), "a photo of a background.".
- loss: open_clip's symmetric contrastive `ClipLoss`, learnable temperature (capped at 100).
- schedule: {cfg["steps"]} steps, AdamW (betas 0.9/0.98, eps 1e-6, weight decay {cfg["weight_decay"]} on matrices), peak lr
  {cfg["lr"]}, {cfg["warmup"]} warm-up steps then cosine decay to 0, gradient norm clipped at 1.
- precision `{cfg["precision"]}` (bf16 forward/backward with an fp32 master copy on CPUs with native bf16), {cfg["threads"]} threads.
- time: {metrics["train_minutes"]} minutes (rendering included), {min(rates, default=0)}-{max(rates, default=0)} img/s on {_cpu_name()}.

Reproduce (weights match up to floating-point summation order):

    {command}

| step | loss | minutes |
|---|---|---|
{curve}

## Evaluation (held-out seeds; printed by the command above)
Zero-shot: {max(cfg["eval_n"], 360)} single objects, 36-way over "a photo of a {{colour shape}}.". Dense: MaskCLIP value path of
the last block (residual and MLP kept), cosine scores upsampled bilinearly, 37-class argmax with the background offset,
mIoU over {cfg["eval_n"]} scenes (`_small_objects`: scenes with objects under 3% of the image).

| metric | value |
|---|---|
{rows}

## Limitations
Trained only on ShapeWorld: it knows 6 colours, 6 shapes and "background", nothing else. Its {vis["image_size"] // vis["patch_size"]}x{vis["image_size"] // vis["patch_size"]}
patch grid blurs object boundaries and small objects; sliding windows or zoom-in help there.
"""


def _cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "this machine"
