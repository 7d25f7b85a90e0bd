"""Datasets: formats, validation, token counts, conversations, preparing the training files."""
