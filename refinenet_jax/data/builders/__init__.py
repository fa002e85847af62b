"""TFDS builders, one module per dataset (see ``refinenet_jax.data.datasets`` for the table)."""
