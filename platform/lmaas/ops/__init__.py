"""Operations: health checks, metrics and structured logs."""
