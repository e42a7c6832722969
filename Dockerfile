# The Vigil worker, gateway and CLI, for docker-compose.yml and production. ClickHouse is reached
# over HTTP (VIGIL_CLICKHOUSE_DSN) and Kafka through VIGIL_KAFKA_BOOTSTRAP; nothing embedded runs
# here. vigil.yaml and its price catalog are mounted at /etc/vigil.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
COPY connectors ./connectors
COPY schemas ./schemas
COPY prices ./prices
RUN pip install --no-cache-dir -e . && mkdir -p /tmp/vigil && chown nobody /tmp/vigil
USER nobody
EXPOSE 4318 4317
ENTRYPOINT ["vigil"]
CMD ["worker"]
