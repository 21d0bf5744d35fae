"""The trainer's parts, each owning its config and state (after torchtitan's components/): checkpointer,
lr_scheduler (with the optimizer), metrics, evaluator. distill/train.py wires them into one loop."""
