"""dataweights.train."""
