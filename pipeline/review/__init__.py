"""Visual review of a labeling run (or a fine-tune): a static HTML report, and the overlay pictures
that `clipdense segment` writes too."""

from pipeline.review.report import write_report

__all__ = ["write_report"]
