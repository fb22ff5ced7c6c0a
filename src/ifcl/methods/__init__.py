"""Continual-learning methods as functions on tensors, plus one-task training."""
