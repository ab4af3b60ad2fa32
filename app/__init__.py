"""ftaas API: FastAPI routes, schemas, settings and the job store. Never imports torch."""
