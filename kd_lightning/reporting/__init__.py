"""Reporting: plots of agreement, accuracy and training curves, and loggers."""
