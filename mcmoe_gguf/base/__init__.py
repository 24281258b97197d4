"""Content-keyed artifacts and the identity of our native sources."""
