"""Reinforcement learning parts for the GRPO objective (distill/objectives/grpo.py), one job per module:
rewards (named functions a recipe lists), advantages (group baselines: Magistral, pass@k), policy losses (clipped
ratio with truncated importance weights, asymmetric REINFORCE, per-group/token/sequence normalisation) and KL
estimators (k1 in the reward, k2 in the loss; the k3 form others use is kept only to test against)."""
