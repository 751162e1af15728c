"""meliad_vocab: built-in meliad plugin (being written)."""
