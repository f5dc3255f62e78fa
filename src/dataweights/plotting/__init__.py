"""Plotting: one function per published figure, ``plot_x(data) -> Figure``.

Functions only read the JSON-able data of a result and compute nothing;
they build :class:`matplotlib.figure.Figure` objects directly (not pyplot),
so nothing is displayed twice in a notebook and no global state leaks.
"""

from dataweights.plotting import mixing

__all__ = ["mixing"]
