"""Downstream evaluation of HEAR embedding models with the stock heareval (hear-eval-kit).

    python -m eval.run --models ssam_tiny,axlstm_tiny --tasks-dir TASKS --out OUT

Modules: run (the driver), predict (heareval predictions per seed), compat (fixes for running
heareval 2021.1.3 on torch >= 2.6 / pytorch-lightning 1.9.5), tasks (the papers' ten tasks and
task-folder checks), report (results.csv / results.md / results.png). See eval/README.md.
"""
