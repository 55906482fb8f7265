"""Programs written against tunrelay's public API; not part of the
installed package (see each one's README)."""
