"""The OpenAI-compatible HTTP layer: protocol models, validation, the threaded async engine, serving
of chat/completions, metrics and the FastAPI app. Only this package imports FastAPI, uvicorn and
pydantic; the engine below it does not (engine_setup.py and text_stream.py need none of them).
"""
