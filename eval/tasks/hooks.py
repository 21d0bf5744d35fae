"""Functions task YAMLs name with `!function hooks.<name>` (lm-eval resolves them next to the YAML)."""

from eval.humaneval import humaneval_results

__all__ = ["humaneval_results"]
