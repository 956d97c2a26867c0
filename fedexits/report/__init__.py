"""Reports for fedexits runs: tables, summary.json, figures and report.md.

Works on plain pandas DataFrames produced by the simulation; it never imports Flower, so reports
can be rebuilt or collected on a machine without the simulation stack running.
"""

from fedexits.report.run import load_run, read_result_csv, write_run_report
from fedexits.report.tables import exit_table, summarise, threshold_table

__all__ = [
    "exit_table",
    "load_run",
    "read_result_csv",
    "summarise",
    "threshold_table",
    "write_run_report",
]
