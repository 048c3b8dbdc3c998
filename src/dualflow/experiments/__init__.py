"""Experiment runners, reports, plots and the command-line interface.

This subpackage depends on the library (`dualflow`); the library never imports it.
"""
