"""`ponder view`: a web page over a results store (frontier, problems, traces)."""
