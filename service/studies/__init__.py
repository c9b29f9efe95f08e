"""Studies: sweep settings of a job or a federation across many runs, aggregate, plot, report."""
