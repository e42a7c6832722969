# The Vigil worker and CLI, for docker-compose.yml and production. ClickHouse is reached over
# HTTP (VIGIL_CLICKHOUSE_DSN) and Kafka through VIGIL_KAFKA_BOOTSTRAP; nothing embedded runs here.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
COPY connectors ./connectors
COPY schemas ./schemas
RUN pip install --no-cache-dir -e .
USER nobody
ENTRYPOINT ["vigil"]
CMD ["worker"]
