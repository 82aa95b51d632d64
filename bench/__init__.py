"""Benchmarks and experiments, each a module run from the repository root:

    .venv/bin/python -m bench.<script> [options]      # e.g. python -m bench.train_step

(``make help`` lists the ones with a target; docs/BENCHMARKS.md gives their figures.) They import
the project's packages and, for shared builders (random batches, pretrained parts), ``tests.helpers``;
nothing here edits ``sys.path``. Functions the tests check are imported as ``bench.<script>``.
"""
