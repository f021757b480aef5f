"""Operations: health endpoints, metrics, vitals, logs."""
