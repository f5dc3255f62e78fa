"""dataweights: learning which training data to use, in JAX/Flax/Optax.

Submodules (dependencies flow one way, top to bottom):

  types, configs          aliases, dimension glossary, typed configs
  data, models            domains and corpora; NNX models
  methods                 hypergradients, data mixing, online filtering, ...
  train, sharding,        training loop, meshes, checkpoints
  checkpoint
  experiments             one package per chapter: results, plots, summaries
  results, book, cli      published results, the papermill runner, the CLI

Import what you need, e.g. ``from dataweights.methods import bilevel``;
importing the package itself is cheap and does not initialise JAX.
"""

__version__ = "0.1.0"
