"""Task patterns (TCESS), expert selection under a budget, and query -> pattern retrieval."""
