"""meliad_jax: built-in meliad plugin (being written)."""
