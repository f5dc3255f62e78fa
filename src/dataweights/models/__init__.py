"""dataweights.models."""
