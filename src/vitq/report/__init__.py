"""Reports: plain-text / markdown tables, CSV files, matplotlib plots and run provenance."""

from vitq.report.compare import CompareRun, FailedRun, write_compare_report
from vitq.report.plots import plot_compare
from vitq.report.runinfo import machine_summary, peak_rss_mb, sha256_prefix
from vitq.report.stats import format_mean_std, mean_std
from vitq.report.tables import format_value, markdown_table, text_table, write_csv

__all__ = ["CompareRun", "FailedRun", "format_mean_std", "format_value", "machine_summary", "markdown_table",
           "mean_std", "peak_rss_mb", "plot_compare", "sha256_prefix", "text_table", "write_compare_report",
           "write_csv"]
