"""Cascade distillation: prune a parent model and distill it into a family of children (coming next)."""
