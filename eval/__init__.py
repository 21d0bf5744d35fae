"""lm-eval suites run offline against the server or a checkpoint, with reports and plots."""
