"""Benchmarks for xoauth2-proxy: ``python -m bench`` (see bench/README.md)."""
