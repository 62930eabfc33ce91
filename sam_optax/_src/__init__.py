"""Private implementation of sam_optax; import from `sam_optax` instead."""
