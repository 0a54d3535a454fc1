"""The OpenAI-compatible HTTP server (`plait serve`).

config.py ServerConfig (the serve-only flags) · engine_loop.py the step loop and the HTTP side's handle on it ·
engine_process.py / engine_thread.py where the step loop runs (a process of its own, or a thread) ·
protocol.py request bodies · tokenizer.py the HTTP side's tokenizer · metrics.py Prometheus ·
errors.py OpenAI-style errors · streaming.py text deltas and SSE · completions.py / chat.py the two generation endpoints ·
state.py what every route reads, and the checks before the engine · app.py the FastAPI app and its gate ·
launch.py uvicorn with a draining SIGTERM.
"""
