"""The stores: ClickHouse (raw table, landed offsets) and the Redis dedup store."""
