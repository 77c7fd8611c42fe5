"""An OpenAI-compatible server on the async engine: `bstar-engine serve --model PATH` (app.py: the
endpoints; protocol.py: OpenAI's bodies to and from SamplingParams and RequestOutputs)."""
