"""Reports: metric summaries, JSON records, terminal tables and image grids."""

from jaxleak.report.audit import REPORT_FORMATS, write_report
from jaxleak.report.grid import save_image_grid
from jaxleak.report.summary import format_table, summarize, write_metrics_json

__all__ = [
    "REPORT_FORMATS",
    "format_table",
    "save_image_grid",
    "summarize",
    "write_metrics_json",
    "write_report",
]
