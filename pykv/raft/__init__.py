"""Raft as a pure state machine: step/tick/propose in, a Ready batch out; no I/O, no clock."""
