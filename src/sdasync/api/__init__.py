"""The HTTP API (FastAPI), served by uvicorn or by AWS Lambda."""
