"""The PostgreSQL backend (``backend.py``), its schema and its connections.
Needs psycopg 3 (``pip install 'qlog[postgres]'``), imported only when a
database is opened."""
