"""ClickHouse: one module per role (SQL and features, connection, native insert, schema,
landed offsets)."""
