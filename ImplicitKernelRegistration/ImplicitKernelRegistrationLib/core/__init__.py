"""Geometry, fields, correspondences, errors, filters and metrics: what every stage shares."""
