"""The DenseCLIP student: a fine-tunable, open-vocabulary segmentation model around an open_clip CLIP."""

from pipeline.models.student.model import (
    STUDENT_FILE,
    DenseCLIP,
    clip_state,
    exported_options,
    load_student_state,
    read_student_state,
    student_state,
)

__all__ = [
    "STUDENT_FILE",
    "DenseCLIP",
    "clip_state",
    "exported_options",
    "load_student_state",
    "read_student_state",
    "student_state",
]
