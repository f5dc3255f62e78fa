"""dataweights.data."""
