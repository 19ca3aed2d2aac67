"""all-MiniLM-L6-v2 (6-layer BERT sentence embeddings) on offline stdlib docstring text."""
