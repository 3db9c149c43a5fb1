"""The run report: `posttrain report RUN_DIR [RUN_DIR ...]` writes report.html plus one PNG per figure.

    from posttrain.report import write_report
    write_report([Path("runs/quickstart")])            # -> runs/quickstart/report.html

data.py reads run directories tolerantly and computes pass@k for every k; figures.py draws the PNGs;
page.py writes the HTML.
"""

from posttrain.report.data import RunData, load_run, passk_curve
from posttrain.report.page import write_report

__all__ = ["RunData", "load_run", "passk_curve", "write_report"]
