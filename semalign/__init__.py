"""SemAlign: cross-scale knowledge transfer through latent semantic alignment.

Importing the package asks torch's CPU allocator for transparent huge pages (``THP_MEM_ALLOC_ENABLE``, read once, at
torch's first CPU allocation, hence set here, before any submodule imports torch; an explicit value wins). Every large
CPU buffer (a batch of 49k-vocabulary logits is ~1 GB) is otherwise mapped and zeroed 4 KiB page by page: on mini
that kernel time was a fifth of the default run's CPU time and more than half of an evaluation forward's. Only the
buffers' alignment changes, not a value. The workflow's jobs inherit it from the Snakemake process, which imports
the package, and so do the tests and benchmarks.
"""
import os

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
