"""The API server's side of vLLM: the engine bridge (:mod:`.engine`), the store resolver
(:mod:`.resolver`) and start-up, which builds the typed state (:mod:`.state`)."""
