"""AsyncEngine: the asyncio face of the engine thread.

INTERFACE CONTRACT (implementation in progress):

    engine = AsyncEngine.from_path(path, EngineConfig(...))   # loads model + tokenizer (blocking)
    await engine.start()          # starts the engine thread, binds to the running event loop
    engine.tokenizer              # realizar.tokenizer.Tokenizer
    engine.model_config           # realizar.config.ModelConfig
    engine.model_id: str          # e.g. "SmolLM2-135M-Instruct.Q4_1"
    engine.compute_mode: str      # "cpu" | "cuda"
    engine.max_model_len: int     # context limit (prompt + generated)
    engine.load_seconds: float

    stream = engine.submit(request)   # Request -> AsyncIterator[TokenOutput]
        raises EngineOverloaded (-> 503 + Retry-After) when the queue bounds are exceeded,
        raises EngineDead (-> 503) after a fatal engine error or after begin_shutdown(),
        raises ValueError when prompt + max_tokens exceeds max_model_len (-> 400).
        The last TokenOutput has finish_reason set. Tokens are pushed from the engine thread
        through loop.call_soon_threadsafe, so iterating never blocks the loop.
    engine.abort(request_id)          # idempotent; blocks freed on the next step
    engine.stats() -> EngineStats     # snapshot for /metrics and /health
    engine.healthy: bool              # False after a fatal engine error
    engine.begin_shutdown()           # stop admitting
    await engine.drain(timeout)       # wait for in-flight requests to finish
    await engine.stop()               # stop the thread
"""
