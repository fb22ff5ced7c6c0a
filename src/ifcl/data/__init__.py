"""Datasets: generated images, manifests, loaders and task splits."""
