"""Exports of compressed models to other runtimes (C for microcontrollers)."""
