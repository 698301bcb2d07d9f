"""conj-lite: train a small LLM into a pairwise judge with Con-J, ship it as GGUF."""

__version__ = "0.1.0"
