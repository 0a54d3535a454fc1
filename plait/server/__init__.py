"""The OpenAI-compatible HTTP server (`plait serve`).

config.py ServerConfig (the serve-only flags) · engine_loop.py the engine thread · protocol.py request bodies ·
tokenizer.py the HTTP side's tokenizer · metrics.py Prometheus · errors.py OpenAI-style errors ·
streaming.py text deltas and SSE · completions.py / chat.py the two generation endpoints ·
state.py what every route reads, and the checks before the engine · app.py the FastAPI app and its gate ·
launch.py uvicorn with a draining SIGTERM.
"""
