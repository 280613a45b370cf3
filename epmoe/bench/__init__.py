"""Benchmarks behind `epmoe bench`: one timing helper (core.bench), one module per stage."""
