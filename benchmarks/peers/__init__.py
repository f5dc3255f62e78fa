"""Peer implementations the LM benchmark compares against (not the library)."""
