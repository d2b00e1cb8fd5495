"""The paper's ablation tables, re-run with one command (``polynext ablate``).

* ``rows``: the two tables' rows (``PAPER_ROWS``), their ``polynext.ABLATIONS`` switches and the
  paper's Δ top-1.
* ``runner``: cells (row × seed) keyed by their config, trained through ``polynext.train``,
  resumable, several at a time, spread over ``torchrun`` ranks.
* ``report``: the table with mean ± std and paired Δs beside the paper's, sign and order
  agreement, the Δ bar plot, learning curves, JSON and CSV.
* ``study``: ``make_plan`` / ``check_plan`` / ``run_ablation``, what the command calls.
"""
from .report import REPORT_FILES, format_table, summarise, write_report
from .rows import BASELINES, PAPER_ROWS, TABLES, PaperRow, select_rows
from .runner import AblationPlan, Cell, cell_key, load_result, train_cell
from .study import DEFAULT_RECIPE, check_plan, make_plan, run_ablation

__all__ = ['REPORT_FILES', 'format_table', 'summarise', 'write_report', 'BASELINES', 'PAPER_ROWS', 'TABLES',
           'PaperRow', 'select_rows', 'AblationPlan', 'Cell', 'cell_key', 'load_result', 'train_cell',
           'DEFAULT_RECIPE', 'check_plan', 'make_plan', 'run_ablation']
