"""Operator notifications: events, their targets and delivery."""
