"""A self-contained demo: a small CNN on scikit-learn's bundled 8x8 digits (no download)."""
