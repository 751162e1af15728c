"""meliad_attention: built-in meliad plugin (being written)."""
