"""Sharpness measurement: stateless helpers (public names in sam_optax.sharpness)."""
