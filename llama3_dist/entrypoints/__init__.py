"""How people reach the engine: the `llama3-dist` command (cli.py), the OpenAI-compatible server
(openai_server.py with openai_protocol.py and metrics.py) and its load test (bench.py)."""
