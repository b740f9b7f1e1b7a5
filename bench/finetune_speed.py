"""Fine-tuning and student labeling speed, each against its reference, measured in one run.

1. `train`: `clipdense finetune` on a labeling run (in-process, `--steps` steps) gives its img/s from
   `metrics.jsonl` (the last progress line: data loading, augmentation, forward, backward, optimiser);
   `bare`: forward + backward + optimiser step of the same student on the same batch size and crop, on
   tensors made beforehand (the model alone). Target: train / bare >= 0.9 (the data never starves it).
2. `student` vs `maskclip`: labeling img/s (`DenseLabeler` call: forward, upsampling, labels) of the
   exported student and of shapes-clip's `maskclip` head with its recommended settings (2x2 shifts,
   10 PAMR steps) on the same decoded images, best of `--repeats`, interleaved. Target: student >= maskclip.

    python bench/finetune_speed.py LABEL_RUN [--steps 60] [--images 64] [--repeats 2] [--dir DIR] [k=v ...]

`k=v` are fine-tune config overrides (the defaults are `examples/finetune-shapes.yaml`'s).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from pipeline.config import ModelCfg, RunCfg, load_config  # noqa: E402
from pipeline.io.read import Sample, iter_samples  # noqa: E402
from pipeline.io.shards import expand_shards  # noqa: E402
from pipeline.models.precision import resolve_device, resolve_dtype  # noqa: E402
from pipeline.stages.infer import DenseLabeler  # noqa: E402
from pipeline.train import FinetuneCfg, finetune  # noqa: E402
from pipeline.train.loop import MasterCopy, attention_kernel  # noqa: E402
from pipeline.train.runs import open_runs  # noqa: E402
from pipeline.train.student import build, loss, teacher_model, trainable_groups  # noqa: E402

EXAMPLE = str(Path(__file__).resolve().parents[1] / "examples" / "finetune-shapes.yaml")


def bare_img_per_s(cfg: FinetuneCfg, steps: int) -> float:
    """Forward + backward + step of the student on fixed tensors, as the trainer runs them."""
    model, backbone = build(cfg)
    device = resolve_device(cfg.model.device)
    master = MasterCopy(model.to(device), resolve_dtype(cfg.model.precision, device))
    optimizer = torch.optim.AdamW(trainable_groups(model, 1e-4, 0.1), lr=1e-4)
    vocab = open_runs(cfg.labels)[0].vocab
    tokens = model.text.tokenize([n for names in vocab.names for n in names]).to(device)
    index = torch.tensor([c for c, names in enumerate(vocab.names) for _ in names], device=device)
    crop, b = cfg.data.crop or backbone.image_size[0], cfg.optim.batch_size
    images = torch.randn(b, 3, crop, crop, device=device).to(master.work.gamma.dtype)
    labels = torch.randint(0, len(vocab), (b, crop, crop), device=device)
    conf = torch.full((b, crop, crop), 255, dtype=torch.uint8, device=device)
    started = 0.0
    for step in range(steps + 3):
        if step == 3:  # warm-up steps are not timed
            started = time.perf_counter()
        with attention_kernel(device):
            scores, aux = master.work(images, tokens, index, len(vocab))
            value = loss(scores, aux, master.work.logit_scale, labels, conf, cfg.data, 0.4, cfg.student.tau, 255)
            master.work.zero_grad(set_to_none=True)
            value.backward()
        master.step(optimizer, [1e-4] * len(optimizer.param_groups))
    return steps * b / (time.perf_counter() - started)


def label_img_per_s(labeler: DenseLabeler, images: list, repeats: int) -> float:
    best = 0.0
    for _ in range(repeats):
        started = time.perf_counter()
        labeler(images)
        best = max(best, len(images) / (time.perf_counter() - started))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("labels", help="a labeling run's output (shapes-clip labels)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--images", type=int, default=64, help="images labeled per model")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dir", default=None, help="work folder (default: a temporary one)")
    parser.add_argument("overrides", nargs="*", metavar="k=v")
    args = parser.parse_args()
    work = Path(args.dir or tempfile.mkdtemp(prefix="finetune-speed-"))
    where = [f"labels=[{args.labels}]", f"output={work / 'student'}", "eval.truth=", f"optim.steps={args.steps}"]
    cfg = load_config(EXAMPLE, [*where, f"log_every={args.steps}", *args.overrides], cls=FinetuneCfg)
    cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, truth=""))
    summary = finetune(cfg)
    lines = [json.loads(x) for x in (work / "student" / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in lines if m["kind"] == "train"][-1]["img_per_s"]
    run = open_runs([args.labels])[0]
    bare = bare_img_per_s(dataclasses.replace(cfg, model=teacher_model(run.config.model, cfg.model)), args.steps)
    images = [s.image for url in expand_shards(run.config.input) for s in iter_samples(url) if isinstance(s, Sample)]
    images = images[: args.images]
    student = DenseLabeler(RunCfg(model=ModelCfg(name=str(work / "student" / "model"))), run.vocab)
    teacher = DenseLabeler(RunCfg(model=run.config.model, prompts=run.config.prompts), run.vocab)
    rates = {"student": 0.0, "maskclip": 0.0}
    for _ in range(args.repeats):  # interleaved: both see the same machine load
        rates["student"] = max(rates["student"], label_img_per_s(student, images, 1))
        rates["maskclip"] = max(rates["maskclip"], label_img_per_s(teacher, images, 1))
    report = {
        "train_img_per_s": train,
        "bare_img_per_s": round(bare, 1),
        "train_over_bare": round(train / bare, 3),
        "label_img_per_s": {k: round(v, 1) for k, v in rates.items()},
        "student_over_maskclip": round(rates["student"] / rates["maskclip"], 3),
        "steps": args.steps,
        "batch_size": cfg.optim.batch_size,
        "train_seconds": summary["train_seconds"],
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
