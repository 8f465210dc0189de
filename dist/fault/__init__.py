"""In-memory erasure-coded snapshots for fault tolerance (docs/fault.md)."""
