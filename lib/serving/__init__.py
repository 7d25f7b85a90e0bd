"""Serving models: the model server on this host, Ray Serve, comparing models."""
