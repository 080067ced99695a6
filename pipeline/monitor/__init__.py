"""How a job is going: status from markers, live progress, metrics and reports."""
