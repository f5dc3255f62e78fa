"""dataweights.methods."""
