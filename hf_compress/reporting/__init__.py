"""The compression report: size, sparsity, bits per parameter, latency and task quality of models side by side.

[`compression_report`] measures every model the same way (same batches, same metric function) and returns a
[`CompressionReport`] that renders as a Markdown table, saves JSON and draws a size-vs-quality plot.
[`CompressionReportCallback`] puts the student's size figures into the Trainer logs at evaluation time and into the
model card (README.md) of the saved model.
"""

# Every name the single-module `reporting.py` had stays importable from here.
from .callback import CompressionReportCallback
from .measure import (  # noqa: F401
    TASKS,
    WEIGHT_FILE_SUFFIXES,
    compression_report,
    disk_bytes,
    estimated_disk_bytes,
    evaluate_model,
    infer_report_task,
    load_model,
    measure_latency,
    memory_bytes,
    size_figures,
    weight_files,
)
from .render import (  # noqa: F401
    MODEL_CARD_BEGIN,
    MODEL_CARD_END,
    CompressionReport,
    ReportRow,
    model_card_section,
    write_model_card,
)

__all__ = [
    "CompressionReport",
    "CompressionReportCallback",
    "ReportRow",
    "compression_report",
    "disk_bytes",
    "estimated_disk_bytes",
    "measure_latency",
    "memory_bytes",
    "size_figures",
    "write_model_card",
]
