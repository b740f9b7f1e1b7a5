"""Evaluation: how good are the label maps? mIoU, per-class, background and small-object IoU.

`truth` reads ground truth (ShapeWorld or any shards with `seg.png`, or a VOC-style folder),
`predictions` reads a labeling run's committed label maps, `metrics` accumulates the scores one map at
a time, and `diagnostics` splits a model's errors into recognition and localisation. `clipdense eval`
(jobs/eval.py) is the command line over them.
"""


def counted(n: int, noun: str, plural: str = "") -> str:
    """`n` and `noun`, in the plural (`plural`, else `noun` + "s") unless n is 1: "1 image", "3 classes"."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"
