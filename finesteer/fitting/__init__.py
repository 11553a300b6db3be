"""Fitting steerers: prompt sets, models, activations, gates, MoSE/CAA/CAST fits, recipes, layer selection, the
held-out split and the steerer cache. Imports the top, `finesteer.patching` and `finesteer.interop`; never
argparse, `finesteer.studies` or `finesteer.cli`."""
