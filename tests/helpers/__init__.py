"""What the tests share, and the bench scripts reuse: builders of batches, models' parts and
trainers, subprocess and process-group plumbing. Not test modules: no test module imports
another one (or ``conftest``); they import from here (``tests/test_layers.py`` checks it)."""
