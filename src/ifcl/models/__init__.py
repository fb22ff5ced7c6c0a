"""Backbones with per-task parameter-efficient branches."""
