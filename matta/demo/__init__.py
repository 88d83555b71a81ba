"""The main job, ``matta demo``: Teacher -> TA -> Students on real offline data, with a report.

Two tasks:

* **digits** (task A): classification with the MLP family on scikit-learn's
  bundled 8x8 handwritten digits;
* **text** (task B): character-level language modelling with the GPT-2-style
  Transformer family on the English help text of ``pydoc_data.topics``
  (ships with Python), held out by document.

Modules: :mod:`~matta.demo.data` (data sets and splits),
:mod:`~matta.demo.config` (sizes and recipes per mode),
:mod:`~matta.demo.teachers` (Teacher training and caching),
:mod:`~matta.demo.run` (the study), :mod:`~matta.demo.report` (tables, JSON,
plot) and :mod:`~matta.demo.cli` (the command).

Importing this package is cheap: scikit-learn, matplotlib, rich and the
deep-learning framework are imported inside the functions that need them, so
``import matta`` never pulls them in.
"""
