"""Data pipeline: shapes demo data, aspect buckets (create_phase), the bucket index (create_indices),
the global batch schedule and random-access row reading."""
