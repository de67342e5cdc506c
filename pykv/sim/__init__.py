"""Deterministic simulation of the real code under seeded faults, and history checkers."""
