"""Datasets: offline TFDS builders (``datasets``), numpy transforms and grain pipelines.

``python -m refinenet_jax.data --list`` shows every dataset and the layout it expects.
"""
