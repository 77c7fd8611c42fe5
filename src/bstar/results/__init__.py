"""What people look at: plots.py (figures and report.md of a run), report.py (redraw them from a run directory),
compare.py (--compare: several modes x seeds in one report, means with bootstrap intervals)."""
