"""Runnable experiments for `jpc` (`python -m experiments.<name>`)."""
