"""Segment attention: the causal-plus-memory masked attention of one packed segment."""
