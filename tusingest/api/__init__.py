"""The REST facade under /api: JSON in and out, errors as {"error": code, "message": text}."""
