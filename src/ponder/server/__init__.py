"""``ponder serve``: the OpenAI API over the native engine and every strategy."""
