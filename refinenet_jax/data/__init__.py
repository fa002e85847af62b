"""Datasets. Only a built-in synthetic one for now, so the main job runs with no downloads."""
