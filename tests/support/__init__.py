"""Test-only helpers shared by several test directories (never imported by the package)."""
