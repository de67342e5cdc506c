"""Composition root: builds a node from config, and the pykv command line."""
